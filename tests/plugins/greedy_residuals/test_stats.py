"""Greedy Residuals detector: statistics, identity and layer finding on synthetic graphs (no training)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats as sps

from auditor import keys
from auditor.audit.detect import run_detectors
from auditor.findings import Finding, Verdict
from auditor.graph import Edge, Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.greedy_residuals import stats
from auditor.plugins.greedy_residuals.detector import (
    GreedyResidualsDetector,
    find_layer,
    forging_check,
)
from auditor.plugins.greedy_residuals.scheme import GRParams, alpha_from_signature, match_bits, penalty_term, residuals
from auditor.report.text import TIMES

PARAMS = GRParams()
MESSAGE = "(c) 2025 Alice Example Labs. All rights reserved."
CONV2 = (32, 16, 3, 3)


# --- statistics ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 100, 128, 129, 168, 200, 251, 255, 256])
def test_binomial_tail_is_exact(k: int) -> None:
    tail = stats.binomial_tail(k, 256)
    reference = float(sps.binom.sf(k - 1, 256, 0.5))
    assert tail.value == pytest.approx(reference, rel=1e-9)
    assert tail.log10 == pytest.approx(math.log10(reference), abs=1e-9)


def test_tail_in_log_space_for_all_bits() -> None:
    assert stats.binomial_tail(256, 256).log10 == pytest.approx(-256 * math.log10(2), abs=1e-12)
    # Far beyond float range, log10 stays exact where the float underflows.
    huge = stats.binomial_tail(4096, 4096)
    assert huge.value is None  # no float holds it: never a 0 (or a denormal) that pretends to be exact
    assert huge.log10 == pytest.approx(-4096 * math.log10(2), rel=1e-12)
    assert huge.words() == f"9.6{TIMES}10^-1234"
    assert stats.two_sided_p(4096, 4096).log10 == pytest.approx(-4095 * math.log10(2), rel=1e-12)


@pytest.mark.parametrize("b", [256, 255, 7, 1])
def test_two_sided_p_matches_binomtest(b: int) -> None:
    ks = {0, 1, b // 5, b // 2 - 1, b // 2, (b + 1) // 2, b // 2 + 1, 2 * b // 3, b - 1, b}
    for k in sorted(ks & set(range(b + 1))):
        p = stats.two_sided_p(k, b)
        reference = sps.binomtest(k, b, 0.5, alternative="two-sided").pvalue
        assert p.value == pytest.approx(reference, rel=1e-9), (k, b)
        assert p.log10 == pytest.approx(math.log10(min(1.0, reference)), abs=1e-9), (k, b)
        assert stats.two_sided_p(b - k, b).log10 == pytest.approx(p.log10)  # symmetric: inverted counts


def test_threshold_needs_168_of_256_in_one_layer() -> None:
    """The documented threshold: p < 1e-6 needs k >= 168 or k <= 88 in a single layer."""
    passing = [k for k in range(257) if stats.two_sided_p(k, 256).log10 < -6]
    assert min(k for k in passing if k > 128) == 168
    assert max(k for k in passing if k < 128) == 88
    # Three layers tried (the default owner marks three): Bonferroni needs k >= 169.
    assert min(k for k in range(129, 257) if stats.bonferroni([stats.two_sided_p(k, 256).log10] * 3).log10 < -6) == 169


def test_forging_bound_is_proposition_1() -> None:
    # The paper's example: 256 bits, 18 layers of 64,768 cells: P <= 4e-74.
    bound = stats.forging_bound(256, 256, layers=18, cells=64768)
    assert bound.value == pytest.approx(18 * 253 / 2**256, rel=1e-12)
    assert bound.value is not None and bound.value <= 4e-74
    assert bound.log10 == pytest.approx(math.log10(18 * 253) - 256 * math.log10(2))
    # Generalised to k matches, either sign, capped at 1.
    k = 200
    expected = 5 * 253 * sps.binom.sf(k - 1, 256, 0.5)
    assert stats.forging_bound(k, 256, layers=5, cells=PARAMS.cells).value == pytest.approx(expected, rel=1e-9)
    assert stats.forging_bound(256 - k, 256, layers=5, cells=PARAMS.cells).value == pytest.approx(expected, rel=1e-9)
    assert stats.forging_bound(140, 256, layers=5, cells=PARAMS.cells).value == 1.0


def test_bonferroni_and_fisher() -> None:
    combined = stats.bonferroni([math.log10(1e-3), math.log10(0.5), 0.0])
    assert combined.value == pytest.approx(3e-3)
    assert stats.bonferroni([math.log10(0.6), math.log10(0.7)]).value == 1.0
    ps = [1e-3, 0.1, 0.6]
    fisher = stats.fisher([math.log10(p) for p in ps])
    assert fisher.value == pytest.approx(sps.combine_pvalues(ps, method="fisher").pvalue, rel=1e-9)
    deep = stats.fisher([-76.8, -76.8, -60.0])  # no underflow
    assert math.isfinite(deep.log10) and deep.log10 < -200
    assert stats.Probability.from_log10(-60.3).words() == f"5{TIMES}10^-61"


@pytest.mark.parametrize(
    ("log10", "value"),
    [(-300.0, 1e-300), (-307.0, 1e-307), (-308.0, None), (-320.0, None), (-330.0, None), (-1e4, None)],
)
def test_a_probability_below_the_smallest_normal_float_has_no_float(log10: float, value: float | None) -> None:
    """Denormals (5e-324 and up to 2.2e-308) lose digits and 0 is a lie: both are stored as None, beside the
    exact log10."""
    p = stats.Probability.from_log10(log10)
    assert p.log10 == log10
    assert p.value == (pytest.approx(value, rel=1e-12) if value is not None else None)
    assert stats.two_sided_p(1100, 1100).value is None and stats.two_sided_p(1100, 1100).log10 < -330


# --- signature bits ------------------------------------------------------------------


def test_alpha_is_sha256_of_signature_msb_first() -> None:
    signature = bytes(range(64))
    digest = hashlib.sha256(signature).digest()
    bits = [(digest[i // 8] >> (7 - i % 8)) & 1 for i in range(256)]
    assert alpha_from_signature(signature).tolist() == [1.0 if b else -1.0 for b in bits]


# --- synthetic owner and suspects ----------------------------------------------------


def _mark(weight: torch.Tensor, alpha: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """A weight whose residual signs carry alpha: Adam on the embedding term alone."""
    w = weight.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = penalty_term(w, alpha, PARAMS)
        if float(loss.detach()) == 0.0:
            break
        loss.backward()
        opt.step()
    return w.detach()


@pytest.fixture(scope="module")
def owner() -> dict[str, Any]:
    key = keys.ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    signature = keys.sign(key, MESSAGE.encode())
    alpha = alpha_from_signature(signature)
    gen = torch.Generator().manual_seed(1)
    marked = _mark(torch.randn(CONV2, generator=gen) * 0.1, alpha)
    assert match_bits(residuals(marked, PARAMS), alpha) == 256
    payload = {
        "params": PARAMS.to_dict(),
        "message": MESSAGE,
        "signature": base64.b64encode(signature).decode(),
        "signature_algorithm": keys.signature_algorithm(key),
        "public_key": keys.public_pem(key),
        "layers": [
            {
                "name": "conv2",
                "param": "weight",
                "kind": "conv2d",
                "shape": list(CONV2),
                "kind_index": 1,
                "release_rate": 1.0,
            },
        ],
        "model": {"sha256": "0" * 64, "file": "model.safetensors", "parameters": 0, "architecture": "cnn"},
    }
    return {"payload": payload, "marked": marked, "alpha": alpha, "signature_b64": payload["signature"]}


def _graph(layers: list[Layer], edges: list[Edge] | None = None) -> LayerGraph:
    return LayerGraph(format="synthetic", path=Path("suspect"), layers=layers, edges=edges or [])


def _layer(name: str, kind: LayerKind, **params: torch.Tensor) -> Layer:
    return Layer(name, kind, {role: TensorRef.from_tensor(f"{name}.{role}", t) for role, t in params.items()})


def _cnn(conv2: torch.Tensor, *, names: tuple[str, str, str] = ("conv1", "conv2", "fc"), **extra: Any) -> LayerGraph:
    gen = torch.Generator().manual_seed(2)
    return _graph(
        [
            _layer(names[0], LayerKind.CONV2D, weight=torch.randn(16, 1, 3, 3, generator=gen)),
            _layer(names[1], LayerKind.CONV2D, weight=conv2, **extra),
            _layer(names[2], LayerKind.LINEAR, weight=torch.randn(10, 32 * 16, generator=gen)),
        ]
    )


def _bundle(payload: dict[str, Any]) -> dict[str, Any]:
    return {"scheme": "greedy-residuals", "payload": payload, "sha256": "ab" * 32}


def _detect(suspect: LayerGraph, payload: dict[str, Any], **options: Any) -> Finding:
    (finding,) = GreedyResidualsDetector().detect(suspect, bundle=_bundle(payload), context={"options": options})
    json.dumps(finding.to_dict(), allow_nan=False)  # JSON-ready, always
    return finding


def _free_text(finding: Finding) -> str:
    notes = [str(r["note"]) for r in finding.details.get("layers", [])]
    return " ".join([finding.summary, finding.subject, finding.details["identity"]["reason"], *notes])


# --- detection -------------------------------------------------------------------------


def test_watermarked_layer_is_detected_with_exact_numbers(owner: dict[str, Any]) -> None:
    finding = _detect(_cnn(owner["marked"]), owner["payload"])
    assert finding.verdict is Verdict.DETECTED
    assert finding.subject == f"{'ab' * 6} {MESSAGE}"
    (row,) = finding.details["layers"]
    assert row["found_by"] == "by name" and row["suspect_name"] == "conv2"
    assert (row["k"], row["bits"], row["rate"], row["inverted"]) == (256, 256, 1.0, False)
    assert row["log10_p"] == pytest.approx(-255 * math.log10(2))
    assert row["forging_bound"] == pytest.approx(3 * 253 / 2**256, rel=1e-12)  # M = 3 layers in the suspect
    assert finding.metrics["combined_p"] == pytest.approx(2**-255, rel=1e-9)
    assert finding.metrics["layers_tried"] == 1 and finding.metrics["suspect_layers_m"] == 3
    assert finding.summary == (
        "The suspect carries the owner's signature: in layer conv2, 256 of 256 signature bits match;"
        f" a match this strong happens by chance with probability 1.7{TIMES}10^-77."
    )
    assert owner["signature_b64"] not in json.dumps(finding.to_dict())


def test_negated_layer_is_detected_and_inverted(owner: dict[str, Any]) -> None:
    finding = _detect(_cnn(-owner["marked"]), owner["payload"])
    assert finding.verdict is Verdict.DETECTED
    (row,) = finding.details["layers"]
    assert (row["k"], row["inverted"], row["detection_rate"]) == (0, True, 1.0)
    assert "negated" in finding.summary and "still counts" in finding.summary


def test_innocent_layer_is_not_detected(owner: dict[str, Any]) -> None:
    innocent = torch.randn(CONV2, generator=torch.Generator().manual_seed(3))
    finding = _detect(_cnn(innocent), owner["payload"])
    assert finding.verdict is Verdict.NOT_DETECTED
    assert finding.metrics["combined_p"] >= 1e-6
    assert finding.summary.startswith("The suspect does not show the owner's signature: in its best layer, conv2,")
    assert "probability 1 " not in finding.summary and "probability 1." not in finding.summary
    if finding.metrics["combined_p"] >= 0.05:
        assert "about as many as coin flips would give: no evidence against chance (p-value" in finding.summary


def test_threshold_comes_from_context(owner: dict[str, Any]) -> None:
    finding = _detect(_cnn(owner["marked"]), owner["payload"], p_threshold=1e-80)
    assert finding.verdict is Verdict.NOT_DETECTED
    assert finding.metrics["p_threshold"] == 1e-80


def test_stored_bits_are_never_trusted(owner: dict[str, Any]) -> None:
    payload = {**owner["payload"], "alpha": [-1.0] * 256, "bits": [0] * 256}
    assert _detect(_cnn(owner["marked"]), payload).details["layers"][0]["k"] == 256


# --- identity -----------------------------------------------------------------------------

NO_BINDING = "The owner bundle does not bind the signature bits to the owner: "


def test_tampered_message_is_inconclusive(owner: dict[str, Any]) -> None:
    payload = {**owner["payload"], "message": "(c) 2025 Mallory"}
    finding = _detect(_cnn(owner["marked"]), payload)
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert finding.summary == (
        NO_BINDING + "the signature does not verify under the public key for the message,"
        " so it supports no ownership claim."
    )
    assert "layers" not in finding.details and "combined_p" not in finding.metrics
    assert owner["signature_b64"] not in _free_text(finding)


def test_swapped_public_key_is_inconclusive(owner: dict[str, Any]) -> None:
    other = keys.ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    payload = {**owner["payload"], "public_key": keys.public_pem(other)}
    finding = _detect(_cnn(owner["marked"]), payload)
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert finding.summary.startswith(NO_BINDING)
    assert finding.metrics["identity_verified"] is False


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"signature": "not base64!"}, "the bundle's signature is not valid base64"),
        ({"public_key": "garbage"}, "the bundle's public key cannot be read"),
        ({"signature_algorithm": "rsa-pkcs1v15-sha256"}, "the bundle names algorithm"),
        ({"message": None}, "the bundle lacks its message, signature or public key"),
    ],
)
def test_broken_identity_fields(owner: dict[str, Any], change: dict[str, Any], reason: str) -> None:
    finding = _detect(_cnn(owner["marked"]), {**owner["payload"], **change})
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert finding.summary.startswith(NO_BINDING + reason)


# --- finding layers ---------------------------------------------------------------------


def test_found_by_kind_shape_and_order(owner: dict[str, Any]) -> None:
    suspect = _cnn(owner["marked"], names=("/conv1/Conv", "/conv2/Conv", "/fc/Gemm"))
    finding = _detect(suspect, owner["payload"])
    (row,) = finding.details["layers"]
    assert (row["found_by"], row["suspect_name"]) == ("by kind, shape and order", "/conv2/Conv")
    assert finding.verdict is Verdict.DETECTED
    assert "in layer conv2 (found as /conv2/Conv)" in finding.summary


def test_order_picks_among_equal_shapes(owner: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(4)
    decoy = torch.randn(CONV2, generator=gen)
    suspect = _graph(
        [
            _layer("a", LayerKind.CONV2D, weight=decoy),
            _layer("b", LayerKind.CONV2D, weight=owner["marked"]),
            _layer("c", LayerKind.CONV2D, weight=decoy.clone()),
        ]
    )
    match = find_layer(suspect, owner["payload"]["layers"][0])
    assert match.layer is not None and match.layer.name == "b"


def test_same_name_other_shape_is_not_a_name_match(owner: dict[str, Any]) -> None:
    entry = owner["payload"]["layers"][0]
    suspect = _graph(
        [
            _layer("conv2", LayerKind.CONV2D, weight=torch.zeros(8, 1, 3, 3)),
            _layer("x", LayerKind.CONV2D, weight=owner["marked"]),
        ]
    )
    match = find_layer(suspect, entry)
    assert match.layer is not None and match.layer.name == "x" and match.found_by == "by kind, shape and order"


def test_missing_layer_is_inconclusive(owner: dict[str, Any]) -> None:
    suspect = _graph([_layer("fc", LayerKind.LINEAR, weight=torch.zeros(10, 64))])
    finding = _detect(suspect, owner["payload"])
    assert finding.verdict is Verdict.INCONCLUSIVE
    (row,) = finding.details["layers"]
    assert row["found_by"] == "missing" and row["k"] is None
    assert finding.summary == (
        "None of the owner's watermarked layers (conv2) could be found in the suspect,"
        " so the signature could not be checked."
    )


def test_cut_off_channels_need_the_restore_stage(owner: dict[str, Any]) -> None:
    cut = owner["marked"][:30]  # two output channels removed
    finding = _detect(_cnn(cut), owner["payload"])
    assert finding.verdict is Verdict.INCONCLUSIVE
    (row,) = finding.details["layers"]
    assert row["found_by"] == "missing"
    assert "[30, 16, 3, 3]" in row["note"] and "restore stage" in row["note"]
    assert "run the restore stage" in finding.summary


def test_folded_layer_reports_the_rate_shift(owner: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(32, 1, 1, 1, generator=gen) + 0.5  # gamma / sqrt(var + eps), all positive
    suspect = _cnn(owner["marked"] * scale, bias=torch.randn(32, generator=gen))
    finding = _detect(suspect, owner["payload"])
    (row,) = finding.details["layers"]
    assert row["folded"] is True
    assert row["rate_shift"] == pytest.approx(row["rate"] - 1.0)
    assert f"folding moved the rate by {row['rate_shift']:+.4f}" in row["note"]
    # The same conv followed by a batch-norm is not folded.
    layers = [*suspect.layers, _layer("bn2", LayerKind.BATCH_NORM, weight=torch.ones(32))]
    unfolded = _graph(layers, [Edge("conv2", "bn2")])
    assert _detect(unfolded, owner["payload"]).details["layers"][0]["folded"] is False


# --- forging check and the plugin ---------------------------------------------------


def test_random_signatures_score_about_half(owner: dict[str, Any]) -> None:
    rates = forging_check(_cnn(owner["marked"]), _bundle(owner["payload"]), n=200, seed=0)
    assert len(rates) == 200
    mean = sum(rates) / len(rates)
    assert 0.45 <= mean <= 0.55
    assert max(rates) < 0.66  # none comes near the threshold (168 / 256)
    finding = _detect(_cnn(owner["marked"]), owner["payload"], forging_check=True)
    assert finding.details["forging_check"]["signatures"] == 200
    assert finding.details["forging_check"]["mean_rate"] == pytest.approx(mean)


def test_registered_and_run_through_the_core(owner: dict[str, Any]) -> None:
    findings = run_detectors(_cnn(owner["marked"]), bundles=[_bundle(owner["payload"])])
    (finding,) = [f for f in findings if f.detector == "greedy-residuals"]
    assert finding.verdict is Verdict.DETECTED and finding.scheme == "greedy-residuals"
    bad = run_detectors(
        _cnn(owner["marked"]),
        bundles=[_bundle(owner["payload"])],
        options={"greedy-residuals": {"p_threshold": 2.0}},
    )
    assert [f.verdict for f in bad if f.detector == "greedy-residuals"] == [Verdict.ERROR]


def test_rsa_identity_verifies_and_binds(owner: dict[str, Any], tmp_path: Path) -> None:
    key = keys.load_private_key(keys.generate_keypair(tmp_path, algorithm="rsa").private)
    signature = keys.sign(key, MESSAGE.encode())
    payload = {
        **owner["payload"],
        "signature": base64.b64encode(signature).decode(),
        "signature_algorithm": "rsa-pkcs1v15-sha256",
        "public_key": keys.public_pem(key),
    }
    finding = _detect(_cnn(owner["marked"]), payload)
    assert finding.details["identity"]["verified"] is True
    assert finding.details["identity"]["signature_algorithm"] == "rsa-pkcs1v15-sha256"
    assert finding.verdict is Verdict.NOT_DETECTED  # the weights carry Alice's Ed25519 bits, not these
    forged = _detect(_cnn(owner["marked"]), {**payload, "message": MESSAGE + " "})
    assert forged.verdict is Verdict.INCONCLUSIVE and forged.summary.startswith(NO_BINDING)
