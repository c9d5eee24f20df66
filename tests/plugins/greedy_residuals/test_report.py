"""What a Greedy Residuals finding says on the report's first screen, and whether a bundle describes a model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.greedy_residuals import report
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector, audit_bundle
from auditor.report.text import TIMES

#: Longer than any excerpt: the report must show it whole.
STATEMENT = (
    "(c) 2025 Alice Example Labs GmbH, Musterstrasse 1, Berlin: the SmallCNN digits model, trained 2025-03-01 on"
    " our own data; all rights reserved, no licence granted"
)
IDENTITY = {"message": STATEMENT, "signature_algorithm": "ed25519", "public_key_sha256": "cd" * 32}
BUNDLE = {"name": "owner_bundle.json", "sha256": "ab" * 32, "identity": IDENTITY}


def _entry(verdict: str, k: int, log10_p: float, tried: int = 3, verified: bool = True) -> dict[str, Any]:
    identity = {"verified": verified, "reason": "the signature verifies", "message": STATEMENT,
                "signature_algorithm": "ed25519"}  # fmt: skip
    metrics = {"best_k": k, "bits": 256, "best_layer": "conv2", "layers_tried": tried, "log10_combined_p": log10_p,
               "p_threshold": 1e-6, "identity_verified": verified}  # fmt: skip
    return {"verdict": verdict, "summary": "s", "metrics": metrics, "details": {"identity": identity}}


def test_the_first_screen_quotes_the_signed_statement_whole_and_says_it_verified() -> None:
    screen = report.first_screen(_entry("detected", 256, -76.6), BUNDLE)
    assert screen["owner"] == f"“{STATEMENT}”"
    assert screen["owner_basis"].startswith(
        f"The owner's signed copyright statement: its signature verifies under the ed25519 key whose SHA-256"
        f" fingerprint is {'cd' * 32}"
    )
    assert screen["statistic"] == "256 of 256 signature bits match in layer conv2, the best of 3 layers"
    assert screen["log10_p"] == -76.6
    assert screen["p_label"] == "two-sided binomial p-value, Bonferroni-corrected for 3 layers"
    assert screen["null_hypothesis"] == GreedyResidualsDetector.null_hypothesis == report.NULL_HYPOTHESIS
    assert screen["not_proven"] == GreedyResidualsDetector.limitations


def test_an_innocent_count_is_said_in_words_not_as_probability_1() -> None:
    screen = report.first_screen(_entry("not-detected", 131, math.log10(0.984), tried=2), BUNDLE)
    assert screen["statistic"] == (
        "131 of 256 signature bits match in layer conv2, the best of 2 layers, about as many as coin flips would"
        " give: no evidence against chance"
    )
    assert report.chance_words(0.0) == "about as many as coin flips would give: no evidence against chance (p-value 1)"
    assert report.chance_words(-4.0, 1e-6).endswith("some evidence against chance, short of the threshold 1e-06")
    assert report.chance_words(-400.0, 1e-6) == "which chance gives with probability 10^-400"
    assert report.chance_words(-72.9, 1e-6) == f"which chance gives with probability 1.3{TIMES}10^-73"


def test_an_unverified_signature_proves_no_owner() -> None:
    screen = report.first_screen({"verdict": "inconclusive", "summary": "no binding", "metrics": {},
                                  "details": {"identity": {"verified": False, "reason": "bad signature"}}},
                                 BUNDLE)  # fmt: skip
    assert screen["owner"] == f"“{STATEMENT}”"
    assert (
        screen["owner_basis"]
        == "The signature on this statement does not verify (bad signature), so the bundle proves no owner."
    )
    assert screen["statistic"] == "no binding" and screen["log10_p"] is None


def test_the_subject_holds_the_statement_whole() -> None:
    payload = {"message": STATEMENT, "signature": "AAAA", "public_key": "not a key", "layers": []}
    finding = audit_bundle(_graph(torch.zeros(32, 16, 3, 3)), {"payload": payload, "sha256": "ef" * 32}, {})
    assert finding.subject == f"{'ef' * 6} {STATEMENT}"


def _graph(conv2: torch.Tensor) -> LayerGraph:
    layer = Layer("conv2", LayerKind.CONV2D, {"weight": TensorRef.from_tensor("conv2.weight", conv2)})
    return LayerGraph(format="synthetic", path=Path("reference"), layers=[layer], edges=[])


def test_the_bundle_describes_a_reference_with_its_watermarked_layers() -> None:
    payload = {"layers": [{"name": "conv2", "param": "weight", "kind": "conv2d", "shape": [32, 16, 3, 3]}]}
    detector = GreedyResidualsDetector()
    assert detector.describes(payload, _graph(torch.zeros(32, 16, 3, 3))) is None
    assert detector.describes(payload, _graph(torch.zeros(64, 32, 3, 3))) == (
        "it has no conv2d layer of shape 32x16x3x3 like the watermarked conv2"
    )
    assert detector.describes({"layers": "x"}, _graph(torch.zeros(1))) == (
        "the bundle names no watermarked layer to compare it with"
    )
    assert detector.describes({"layers": [{"name": "a"}]}, _graph(torch.zeros(1))) == (
        "the bundle's watermarked layers are malformed"
    )
