"""restore-dummies against neuron-clique and neuron-split: the owners' CNNs (Greedy Residuals, HufuNet)
widened with dummy units whose fan-outs cancel, or with units split into scaled copies, published as
safetensors or ONNX (batch-norm folded). Not found before restore; the dummies removed and the copies
merged, found after; an innocent model widened the same way is left alone; the ResNet comes back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Verdict
from auditor.graph import LayerGraph
from auditor.plugin_manager import registered
from auditor.plugins.hufunet.detector import TAU_ACC, audit_bundle
from auditor.plugins.restore import guard
from auditor.plugins.restore.dummies import DummyRestorer, parallel_groups, remove_dummies
from auditor.toolkit import equivalent
from auditor.toolkit import models as zoo
from auditor.toolkit.modelio import export_onnx
from auditor.toolkit.recognise import Runnable

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = {"conv1": 16, "conv2": 32, "conv3": 64}


def widen(model: Path, out: Path, aid: str, **options: Any) -> Path:
    registered("attacks")[aid].component.apply(model, out, options={"seed": 3, **options})
    return out


def gr_verdict(graph: LayerGraph, owner: SimpleNamespace) -> Verdict:
    (finding,) = [f for f in run_detectors(graph, bundles=[owner.bundle]) if f.detector == "greedy-residuals"]
    return finding.verdict


def dummy_log(log: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = [e for e in log if e["restorer"] == "restore-dummies"]
    assert entry["status"] == "ok", entry
    return dict(entry["log"])


@pytest.mark.parametrize(("aid", "options"), [("neuron-clique", {"dummies": 4}), ("neuron-split", {"units": 8})])
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_greedy_residuals_found_only_after_the_dummies_go(
    gr_owner: SimpleNamespace, tmp_path: Path, aid: str, options: dict[str, Any], suffix: str
) -> None:
    suspect = load_model(widen(gr_owner.files["safetensors"], tmp_path / f"s{suffix}", aid, **options))
    assert gr_verdict(suspect, gr_owner) is not Verdict.DETECTED
    restored, log = run_restorers(suspect, load_model(gr_owner.files["safetensors"]))
    entry = dummy_log(log)
    assert entry["acted"] and entry["evidence"]["score"] >= guard.THRESHOLD, entry
    removals = {r["reference"]: r for r in entry["removals"]}
    assert {name: r["width_after"] for name, r in removals.items()} == WIDTHS
    assert all(r["residual"] < 1e-5 for r in removals.values())
    if aid == "neuron-clique":
        assert all(len(r["cliques_removed"]) == 2 and not r["splits_merged"] for r in removals.values())
    else:
        assert all(len(r["splits_merged"]) == 8 and not r["cliques_removed"] for r in removals.values())
    assert gr_verdict(restored, gr_owner) is Verdict.DETECTED
    if suffix == ".safetensors":  # copies merged, then restore-scale divides the kept copy's factor out
        for name in WIDTHS:
            owner = gr_owner.model.state_dict()[f"{name}.weight"]
            assert torch.allclose(restored.layer(name).params["weight"].read(), owner, atol=1e-5)


@pytest.mark.parametrize(("aid", "suffix"), [("neuron-clique", ".onnx"), ("neuron-split", ".safetensors")])
def test_hufunet_reads_its_kernels_back_after_the_dummies_go(
    hufunet_owner: SimpleNamespace, tmp_path: Path, aid: str, suffix: str
) -> None:
    suspect = load_model(widen(hufunet_owner.model_file, tmp_path / f"s{suffix}", aid))
    before = audit_bundle(suspect, hufunet_owner.bundle, {})
    assert before.verdict is not Verdict.DETECTED
    restored, log = run_restorers(suspect, load_model(hufunet_owner.model_file))
    assert dummy_log(log)["acted"]
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert after.verdict is Verdict.DETECTED and after.metrics["diff_acc"] < TAU_ACC, after.summary


def test_an_innocent_widened_model_is_left_alone(gr_owner: SimpleNamespace, tmp_path: Path, clean_model: Any) -> None:
    clean = clean_model(tmp_path / "clean.safetensors", seed=1)
    suspect = load_model(widen(clean, tmp_path / "i.safetensors", "neuron-clique"))
    reference = load_model(gr_owner.files["safetensors"])
    restored, log = run_restorers(suspect, reference)
    entry = dummy_log(log)
    assert (
        not entry["acted"]
        and entry["reason"].startswith("left alone: ")
        and "but not demonstrably derived" in entry["reason"]
    )
    assert entry["evidence"]["score"] < guard.THRESHOLD and len(entry["removals"]) == 3
    assert gr_verdict(restored, gr_owner) is not Verdict.DETECTED
    unguarded, _ = DummyRestorer(guard=False).restore(suspect, reference)
    assert unguarded is not suspect  # the guard decided, not a failure to find the dummies
    untouched = load_model(clean)
    assert remove_dummies(untouched, reference)[0] is None  # an innocent of the reference's widths: nothing to do


def test_without_the_reference_the_structure_suffices(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    suspect = load_model(widen(gr_owner.files["pt"], tmp_path / "s.onnx", "neuron-clique", dummies=6, group=3))
    cleaned, removals, why = remove_dummies(suspect)
    assert cleaned is not None, why
    assert [r.width_after for r in removals] == [64, 32, 16]  # from the output side back
    assert all(len(r.cliques) == 2 and all(len(c) == 3 for c in r.cliques) for r in removals)


def test_dummies_and_an_expansion_go_together(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    widen(gr_owner.files["safetensors"], tmp_path / "c.safetensors", "neuron-clique", layers="conv2")
    widen(tmp_path / "c.safetensors", tmp_path / "s.safetensors", "expand", layer="conv2", extra=3)
    suspect = load_model(tmp_path / "s.safetensors")
    cleaned, removals, why = remove_dummies(suspect, load_model(gr_owner.files["safetensors"]))
    # the expansion's units, read by nobody, go too: 32 + 4 + 3 -> 32
    assert cleaned is not None and [(r.producer, r.width_before, r.width_after) for r in removals] == [
        ("conv2", 39, 32)
    ], why
    assert len(removals[0].zero_fan_out) == 3 and len(removals[0].cliques) == 2


def test_what_does_not_explain_the_width_is_left_alone(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    """Two of conv2's channels cut off, then four dummies added: removing the dummies would leave fewer
    units than the reference has, so nothing is removed (the later steps pad the cut-off), and the log says why."""
    widen(gr_owner.files["safetensors"], tmp_path / "c.safetensors", "cut-off", fraction=0.05)
    widen(tmp_path / "c.safetensors", tmp_path / "s.safetensors", "neuron-clique", layers="conv2")
    suspect = load_model(tmp_path / "s.safetensors")
    cleaned, removals, why = remove_dummies(suspect, load_model(gr_owner.files["safetensors"]))
    assert cleaned is None and removals == []
    assert "conv2: removing 34 -> 30 units: 2 clique(s) removed" in why, why
    assert why.endswith("would leave 30 units where the reference has 32: left alone)")


@pytest.mark.parametrize("edit", ["neuron_clique", "neuron_split"])
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_the_resnet_comes_back(tmp_path: Path, edit: str, suffix: str) -> None:
    model = zoo.build("resnet", seed=0).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    edited, added = getattr(equivalent, edit)(model, seed=2)
    path = tmp_path / f"s{suffix}"
    if suffix == ".onnx":
        export_onnx(Runnable(edited.eval(), "resnet", (1, 8, 8)), path)
    else:
        save_file({k: v.contiguous() for k, v in edited.state_dict().items()}, str(path))
    reference = load_model(tmp_path / "ref.safetensors")
    restored, log = run_restorers(load_model(path), reference)
    entry = dummy_log(log)
    assert entry["acted"] and sorted(r["reference"] for r in entry["removals"]) == sorted(added)
    assert all(e["status"] == "ok" for e in log)
    if suffix == ".safetensors":
        for name in ("layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"):
            owner = model.state_dict()[f"{name}.weight"]
            assert torch.allclose(restored.layer(name).params["weight"].read(), owner, atol=1e-5)


def _resnet_owner(out: Path) -> SimpleNamespace:
    """A SmallResNet carrying both watermarks (Greedy Residuals and HufuNet), trained on digits."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.bundle import load_bundle
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
    from auditor.plugins.hufunet.owner import plant, write_bundle
    from auditor.toolkit import data as datasets
    from auditor.toolkit import training

    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    hmac_key = hashlib.sha256(b"restore-dummies test: HufuNet key").digest()
    generate_hufunet(out=out / "hufunet_secret.json", seed=0, hmac_key=hmac_key)
    net, secret = load_hufunet(out / "hufunet_secret.json")
    model = zoo.build("resnet", seed=0)
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) 2025 Alice: SmallResNet")
    hufunet = plant(model, net, hmac_key)
    try:
        config = training.TrainConfig(epochs=6, lr=1e-2, seed=0)
        training.train(model, datasets.digits(split_seed=0).train, config, penalty=wm.penalty,
                       after_step=hufunet.frozen.after_step)  # fmt: skip
    finally:
        hufunet.frozen.detach()
    model.eval()
    files = training.save_model(model, out, "model")
    wm.save_bundle(out / "gr.json", model, model_file=files["safetensors"], architecture="resnet")
    write_bundle(out / "hufunet.json", model, hufunet, net, secret, files=files, architecture="resnet")
    return SimpleNamespace(files=files, bundles=[load_bundle(out / "gr.json"), load_bundle(out / "hufunet.json")])


@pytest.mark.slow
def test_the_watermarked_resnet_is_found_after_every_structural_edit(tmp_path: Path) -> None:
    """Both schemes on a SmallResNet owner: each of the four edits, alone and after permute + scale +
    bn-fold, as safetensors and as ONNX, is not found before restore and found after (Greedy Residuals
    detected, HufuNet DiffAcc below tau)."""
    owner = _resnet_owner(tmp_path)
    reference = load_model(owner.files["safetensors"])
    attacks = registered("attacks")
    composed = owner.files["pt"]
    for i, (aid, options) in enumerate((("permute", {"seed": 5}), ("scale", {"seed": 6}), ("bn-fold", {}))):
        attacks[aid].component.apply(composed, tmp_path / f"c{i}.pt", options=options)
        composed = tmp_path / f"c{i}.pt"
    for base, model in (("alone", owner.files["safetensors"]), ("composed", composed)):
        for aid in ("split-outputs", "split-inputs", "neuron-clique", "neuron-split"):
            for suffix in (".safetensors", ".onnx"):
                suspect = load_model(widen(model, tmp_path / f"{base}-{aid}{suffix}", aid))
                before = {f.detector: f for f in run_detectors(suspect, bundles=owner.bundles)}
                assert Verdict.DETECTED not in {before[d].verdict for d in ("greedy-residuals", "hufunet")}, aid
                restored, log = run_restorers(suspect, reference)
                assert all(e["status"] == "ok" for e in log), log
                after = {f.detector: f for f in run_detectors(restored, bundles=owner.bundles)}
                where = (base, aid, suffix)
                assert after["greedy-residuals"].verdict is Verdict.DETECTED, (where, after["greedy-residuals"])
                assert after["hufunet"].metrics["diff_acc"] < TAU_ACC, (where, after["hufunet"].summary)


def test_parallel_fan_ins_are_found_across_blocks() -> None:
    """The cosine matrix is built in blocks of rows: copies far apart (units 3, 700 and 1100 of 1200) are
    still one group, a negative copy is not, and a unit with no weights joins nobody."""
    fan_in = torch.randn(1200, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fan_in[700], fan_in[1100], fan_in[900] = 2.5 * fan_in[3], 0.1 * fan_in[3], -fan_in[3]
    fan_in[5, :-1] = fan_in[6, :-1] = 0.0
    assert parallel_groups(fan_in) == [[3, 700, 1100]]
