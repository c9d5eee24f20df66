"""Attacks that train or forge, on the trained owners of tests/conftest.py: fine-tuning, overwriting with the
adversary's own watermark, and the forging attacks of both papers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.bases import Attack
from auditor.bundle import load_bundle
from auditor.findings import Finding, Verdict
from auditor.plugin_manager import registered
from auditor.plugins.hufunet.attacks import MATCH_RANGES
from auditor.toolkit.modelio import predictor

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every test here trains or forges


def attack(name: str) -> Attack:
    return registered("attacks")[name].component


def audit(path: Path, bundle: object) -> Finding:
    (finding,) = run_detectors(load_model(path), bundles=[bundle])
    return finding


def accuracy(path: Path, owner: SimpleNamespace) -> float:
    run = predictor(path)
    assert run is not None
    x, y = owner.data.test.tensors
    return float((run(x).argmax(1) == y).float().mean())


def test_fine_tune_with_a_new_head_keeps_greedy_residuals(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "tuned.safetensors"
    summary = attack("fine-tune").apply(gr_owner.files["safetensors"], out, options={
        "new_head": True, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0, "epochs": 5, "seed": 3})  # fmt: skip
    assert summary["new_head"] == "head" and summary["train_size"] == len(gr_owner.data.train) // 2
    head = load_file(out)["head.weight"]
    assert not torch.allclose(head, gr_owner.model.head.weight.detach(), atol=1e-2)  # a new head, trained
    assert accuracy(out, gr_owner) > 0.9
    assert audit(out, gr_owner.bundle).verdict is Verdict.DETECTED


def test_fine_tuning_is_seeded_and_the_anneal_attack_anneals(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        runs[name] = tmp_path / f"{name}.safetensors"
        attack("fine-tune").apply(gr_owner.files["pt"], runs[name], options={"epochs": 1, "seed": seed})
    a, b, c = (load_file(runs[k])["conv2.weight"] for k in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    summary = attack("fine-tune-anneal").apply(gr_owner.files["pt"], tmp_path / "anneal.pt", options={"epochs": 1})
    assert (summary["options"]["lr"], summary["options"]["schedule"]) == (0.05, "cosine")


@pytest.mark.parametrize("with_data", [True, False])
def test_overwriting_greedy_residuals_leaves_the_owners_detected(
    gr_owner: SimpleNamespace, tmp_path: Path, with_data: bool
) -> None:
    """Paper 000 Table 7: the adversary's signature on the same layers, with and without the data."""
    out, theirs = tmp_path / "overwritten.safetensors", tmp_path / "adversary.json"
    options = {"with_data": with_data, "optimizer": "adam", "lr": 1e-3, "epochs": 10, "adversary_bundle": str(theirs)}
    summary = attack("overwrite-gr").apply(gr_owner.files["safetensors"], out, options=options)
    assert summary["adversary_layers"] == gr_owner.wm.layer_names  # the very layers the owner marked
    owner = audit(out, gr_owner.bundle)
    assert owner.verdict is Verdict.DETECTED, owner.summary
    assert owner.metrics["best_detection_rate"] > 0.8  # measured: 0.87 to 1.0 on this small model
    adversary = load_bundle(theirs)
    assert adversary.payload["message"] == "(c) the adversary"
    rates = {row["name"]: row["rate"] for row in audit(out, adversary).details["layers"]}
    assert rates == pytest.approx({n.rpartition(".")[0]: r for n, r in summary["adversary_rates"].items()})
    assert audit(gr_owner.files["safetensors"], adversary).verdict is Verdict.NOT_DETECTED


def test_overwriting_hufunet_the_original_model_resolves_the_dispute(
    hufunet_owner: SimpleNamespace, tmp_path: Path
) -> None:
    """Paper 002 section 5.7: the adversary's HufuNet is found in the stolen copy, never in the owner's
    original, which only the owner can present."""
    out, theirs = tmp_path / "overwritten.safetensors", tmp_path / "adversary.json"
    summary = attack("overwrite-hufunet").apply(hufunet_owner.model_file, out, options={
        "with_data": False, "adversary_bundle": str(theirs), "seed": 4})  # fmt: skip
    adversary = load_bundle(theirs)
    assert adversary.payload["hufunet"]["hmac_key"] != hufunet_owner.bundle.payload["hufunet"]["hmac_key"]
    assert summary["adversary_eph_kernels"] == adversary.payload["host"]["eph_kernels"]
    assert audit(out, adversary).verdict is Verdict.DETECTED
    assert audit(hufunet_owner.model_file, adversary).verdict is Verdict.NOT_DETECTED
    assert audit(hufunet_owner.model_file, hufunet_owner.bundle).verdict is Verdict.DETECTED


def test_forging_greedy_residuals_finds_only_chance(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "forged.safetensors"
    summary = attack("forge-gr").apply(gr_owner.files["safetensors"], out, options={
        "bundle": str(gr_owner.out / "owner_bundle.json"), "signatures": 200, "seed": 5})  # fmt: skip
    assert 0.45 < summary["mean_rate"] < 0.55 and summary["claims"] == 0
    before = load_file(gr_owner.files["safetensors"])
    assert all(torch.equal(before[k], v) for k, v in load_file(out).items())
    with pytest.raises(Exception, match="forge-gr needs the owner's bundle"):
        attack("forge-gr").apply(gr_owner.files["safetensors"], tmp_path / "x.pt", options={})


def test_forging_hufunet_first_correlation_then_accuracy(hufunet_owner: SimpleNamespace, tmp_path: Path) -> None:
    summary = attack("forge-hufunet").apply(hufunet_owner.model_file, tmp_path / "f.safetensors",
                                            options={"keys": 20, "epochs": 3, "seed": 1})  # fmt: skip
    assert summary["host_kernels"] == hufunet_owner.bundle.payload["host"]["kernels"]
    assert summary["max_correlated_kernels"] <= 10  # about one kernel per key is expected
    assert summary["accuracy"] < 0.5 and summary["claim"] is False


def test_forging_hufunet_first_accuracy_then_correlation(hufunet_owner: SimpleNamespace, tmp_path: Path) -> None:
    summary = attack("forge-hufunet").apply(hufunet_owner.model_file, tmp_path / "f.safetensors",
                                            options={"method": "accuracy", "seed": 2})  # fmt: skip
    found = [summary["found"][f"{n:.0%}"] for n in MATCH_RANGES]
    assert found == sorted(found) and found[-1] > found[0]  # a wider range finds more
    assert summary["claim"] is False and summary["accuracy"] < 0.5
