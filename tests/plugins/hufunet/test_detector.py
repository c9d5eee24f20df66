"""The HufuNet detector: integrity on innocent models (paper Table 9), forging (section 5.7),
kernel-count mismatch, unavailable data, determinism and hostile bundles."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.findings import Verdict
from auditor.plugins.hufunet.detector import TAU_ACC, audit_bundle
from auditor.plugins.hufunet.forging import correlated_kernels, forge
from auditor.plugins.hufunet.owner import host_layers, host_view
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.models import model_graph


def _bundle_for(owner: SimpleNamespace, model: torch.nn.Module, architecture: str) -> dict[str, Any]:
    """The owner's HufuNet and key claimed against another host architecture (its own N and layers)."""
    payload = copy.deepcopy(owner.bundle.payload)
    entries = host_layers(model)
    payload["host"].update(architecture=architecture, layers=entries, kernels=sum(e["kernels"] for e in entries))
    return {"scheme": "hufunet", "payload": payload, "sha256": "0" * 64}


@pytest.fixture(scope="module")
def innocents(hufunet_owner: SimpleNamespace, one_thread: None) -> list[torch.nn.Module]:
    """Ten width-2 SmallCNNs trained on the same digits without EPH, seeds 1..10 (short training)."""
    models = []
    for seed in range(1, 11):
        torch.manual_seed(seed)
        model = zoo.build("cnn", width=2)
        training.train(model, hufunet_owner.data.train, training.TrainConfig(epochs=3, lr=1e-2, seed=seed))
        models.append(model.eval())
    return models


@pytest.mark.slow
def test_innocent_hosts_of_the_same_architecture_are_never_claimed(
    hufunet_owner: SimpleNamespace, innocents: list[torch.nn.Module]
) -> None:
    accs = []
    for model in innocents:
        assert training.evaluate(model, hufunet_owner.data.test) > 0.9  # real, working innocents
        finding = audit_bundle(model_graph(model), hufunet_owner.bundle, {})
        assert finding.verdict is Verdict.NOT_DETECTED, finding.summary
        assert finding.metrics["bit_identical_fraction"] < 0.01
        accs.append(finding.metrics["acc_combined"])
    # about chance (paper Table 9: 9%-14%); far below the claim line (1 - tau) * Acc_original
    assert max(accs) < 0.3, accs
    assert max(accs) < (1 - TAU_ACC) * hufunet_owner.payload["acc_original"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "lstm"])
def test_innocents_of_other_architectures_are_never_claimed(
    hufunet_owner: SimpleNamespace, arch: str, one_thread: None
) -> None:
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = zoo.build(arch, width=2)
        training.train(model, hufunet_owner.data.train, training.TrainConfig(epochs=2, lr=1e-2, seed=seed))
        finding = audit_bundle(model_graph(model.eval()), _bundle_for(hufunet_owner, model, arch), {})
        assert finding.verdict is Verdict.NOT_DETECTED, finding.summary
        assert finding.metrics["acc_combined"] < 0.3


def test_forging_with_100_random_keys_finds_a_handful_of_kernels_and_no_claim(
    hufunet_owner: SimpleNamespace, one_thread: None
) -> None:
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(hufunet_owner.model_file))
    view = host_view(model, host_layers(model))
    attempts = forge(view, widths=hufunet_owner.net.widths, data=hufunet_owner.data, keys=100, epochs=5)
    counts = [a.correlated for a in attempts]
    # one expected per key (probability 1/N for each of N kernels); the paper saw at most 3 in VGG11
    assert 0.3 < sum(counts) / len(counts) < 3.0
    assert max(counts) <= 10
    forged = max(a.accuracy for a in attempts if a.accuracy == a.accuracy)
    assert forged < (1 - TAU_ACC) * hufunet_owner.payload["acc_original"]


def test_correlation_is_the_placement_rule(hufunet_owner: SimpleNamespace) -> None:
    from auditor.plugins.hufunet.placement import kernel_message, position

    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(hufunet_owner.model_file))
    view = host_view(model, host_layers(model))
    key = bytes(range(32))
    found = correlated_kernels(view, key)
    assert found == [j for j in range(view.n) if position(key, kernel_message(view.read(j), j + 1), view.n) == j]


def test_cut_off_channels_defer_to_restore(tmp_path: Path, hufunet_owner: SimpleNamespace) -> None:
    tensors = load_file(hufunet_owner.model_file)
    tensors["conv2.weight"] = tensors["conv2.weight"][:60].clone()  # 64 -> 60 output channels
    save_file(tensors, tmp_path / "cut.safetensors")
    finding = audit_bundle(load_model(tmp_path / "cut.safetensors"), hufunet_owner.bundle, {})
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert "conv2.weight" in finding.summary and "--reference" in finding.summary
    assert "acc_combined" not in finding.metrics  # nothing read at shifted positions


def test_unavailable_public_data_is_inconclusive(hufunet_owner: SimpleNamespace) -> None:
    bundle = copy.deepcopy(hufunet_owner.bundle.payload)
    bundle["hufunet"]["dataset"]["test_sha256"] = "f" * 64
    finding = audit_bundle(load_model(hufunet_owner.model_file), bundle, {})
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert "not the one the owner measured on" in finding.summary
    bundle["hufunet"]["dataset"]["name"] = "fashion-mnist"
    finding = audit_bundle(load_model(hufunet_owner.model_file), bundle, {})
    assert "Fashion-MNIST" in finding.summary


def test_same_audit_twice_gives_the_same_finding(hufunet_owner: SimpleNamespace) -> None:
    first = run_detectors(load_model(hufunet_owner.model_file), bundles=[hufunet_owner.bundle])
    second = run_detectors(load_model(hufunet_owner.model_file), bundles=[hufunet_owner.bundle])
    assert [f.to_dict() for f in first] == [f.to_dict() for f in second]
    assert [f.detector for f in first] == ["hufunet"]


def test_finding_never_shows_the_secrets(hufunet_owner: SimpleNamespace) -> None:
    finding = audit_bundle(load_model(hufunet_owner.model_file), hufunet_owner.bundle, {})
    text = json.dumps(finding.to_dict(), default=str)
    section = hufunet_owner.bundle.payload["hufunet"]
    for secret in (section["hmac_key"], section["sph"]["weight"], section["sph"]["bias"], section["eph"]["data"]):
        assert secret not in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["host"].update(layers=[{"name": "conv2"}]), "host layers are malformed"),
        (lambda p: p["host"].update(layers=[]), "records no host layers"),
        (lambda p: p["hufunet"].update(hmac_key="c2hvcnQ="), "must be 32 bytes"),
        (lambda p: p.pop("hufunet"), "no HufuNet section"),
    ],
)
def test_a_broken_bundle_becomes_an_error_finding(hufunet_owner: SimpleNamespace, edit: Any, message: str) -> None:
    payload = copy.deepcopy(hufunet_owner.bundle.payload)
    edit(payload)
    findings = run_detectors(load_model(hufunet_owner.model_file), bundles=[{"scheme": "hufunet", "payload": payload}])
    assert [f.verdict for f in findings] == [Verdict.ERROR]
    assert message in findings[0].summary


def test_host_layers_read_in_the_bundles_order_whatever_the_file_order(
    tmp_path: Path, hufunet_owner: SimpleNamespace
) -> None:
    tensors = load_file(hufunet_owner.model_file)
    renamed = {("zz_" + k if k.startswith("conv1") else k): v for k, v in reversed(list(tensors.items()))}
    save_file(renamed, tmp_path / "reordered.safetensors")
    finding = audit_bundle(load_model(tmp_path / "reordered.safetensors"), hufunet_owner.bundle, {})
    assert finding.verdict is Verdict.DETECTED, finding.summary
    assert finding.metrics["bit_identical_fraction"] == 1.0
    rows = {r["name"]: r for r in finding.details["host_layers"]}
    assert rows["conv1.weight"]["found_by"] == "by kind, shape and order"


def test_public_data_option_reaches_the_detector_and_the_reproduce_command(tmp_path: Path) -> None:
    from auditor.audit.pipeline import AuditInputs, parse_detector_options
    from auditor.plugins.hufunet.detector import HufuNetDetector

    options = parse_detector_options([f"hufunet.public_data={tmp_path / 'fmnist'}"])
    assert options == {"hufunet": {"public_data": tmp_path / "fmnist"}}
    inputs = AuditInputs(bundles=[], options=options)
    assert f"--option 'hufunet.public_data={tmp_path / 'fmnist'}'" in inputs.command(Path("suspect.onnx")) or (
        f"--option hufunet.public_data={tmp_path / 'fmnist'}" in inputs.command(Path("suspect.onnx"))
    )
    detector = HufuNetDetector()
    assert detector.settings({"options": options["hufunet"]})["public_data"] == tmp_path / "fmnist"
    assert detector.settings({})["public_data"] is None
    assert "--option" not in AuditInputs(bundles=[]).command(Path("suspect.onnx"))
