"""What a HufuNet finding says on the report's first screen, its p-value's float, and whether a bundle
describes a model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.hufunet import report
from auditor.plugins.hufunet.detector import HufuNetDetector, _binomial_tail

BUNDLE = {"name": "owner_bundle.json", "sha256": "ab" * 32, "host_architecture": "cnn"}
METRICS = {"acc_combined": 0.9721, "acc_original": 0.9721, "diff_acc": 0.0, "tau_acc": 0.15, "chance": 0.1,
           "test_size": 359, "correct": 349, "log10_binomial_p": -330.52, "binomial_p": None}  # fmt: skip


def test_the_binomial_tail_keeps_a_float_only_where_one_holds_it() -> None:
    p, log10 = _binomial_tail(349, 359, 10)
    assert p is None and -331 < log10 < -330  # a float would underflow to a denormal or 0
    p, log10 = _binomial_tail(60, 359, 10)
    assert p is not None and p >= sys.float_info.min and math.log10(p) == log10
    assert _binomial_tail(0, 359, 10) == (1.0, 0.0)


def test_the_first_screen_says_that_holding_the_bundle_is_the_claim() -> None:
    screen = HufuNetDetector().first_screen({"verdict": "detected", "metrics": METRICS}, BUNDLE)
    assert (
        screen["owner"]
        == f"Whoever holds the secret owner bundle owner_bundle.json (SHA-256 {'ab' * 32}), made for a cnn host"
    )
    assert "holding the secret bundle is the claim" in screen["owner_basis"]
    assert screen["statistic"] == (
        "The rebuilt HufuNet classifies 97.21% of 359 public test images correctly (the owner's: 97.21%;"
        " DiffAcc 0.000 against tau_acc 0.15)"
    )
    assert screen["log10_p"] == -330.52
    assert screen["p_label"] == "binomial tail of 349 or more correct answers by guessing among 10 classes"
    assert screen["null_hypothesis"] == HufuNetDetector.null_hypothesis == report.NULL_HYPOTHESIS
    assert screen["not_proven"] == HufuNetDetector.limitations


def test_guessing_level_accuracy_is_said_in_words() -> None:
    metrics = METRICS | {"acc_combined": 0.1, "diff_acc": 0.897, "correct": 36, "log10_binomial_p": -0.2}
    screen = report.first_screen({"verdict": "not-detected", "metrics": metrics}, BUNDLE)
    assert screen["statistic"].endswith(", no better than guessing: no evidence against chance")
    inconclusive = report.first_screen({"verdict": "inconclusive", "summary": "not read", "metrics": {}}, None)
    assert inconclusive["statistic"] == "not read" and inconclusive["log10_p"] is None
    assert inconclusive["owner"] == "Whoever holds the secret owner bundle"


def test_the_bundle_describes_a_reference_with_its_host_layers() -> None:
    def graph(shape: tuple[int, ...]) -> LayerGraph:
        layer = Layer("conv1", LayerKind.CONV2D, {"weight": TensorRef.from_tensor("conv1.weight", torch.zeros(shape))})
        return LayerGraph(format="synthetic", path=Path("reference"), layers=[layer], edges=[])

    payload = {"host": {"layers": [{"name": "conv1", "param": "weight", "kind": "conv2d", "shape": [32, 1, 3, 3]}]}}
    assert HufuNetDetector().describes(payload, graph((32, 1, 3, 3))) is None
    assert HufuNetDetector().describes(payload, graph((16, 1, 3, 3))) == (
        "it has no conv2d layer of shape 32x1x3x3 like the host layer conv1"
    )
    assert (
        HufuNetDetector().describes({"host": {}}, graph((1,))) == "the bundle records no host layer to compare it with"
    )
