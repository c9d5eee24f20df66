"""restore-branches against split-outputs and split-inputs: the owners' CNNs (Greedy Residuals, HufuNet)
with layers computed as parallel branches, published as safetensors (branch names, edges guessed) or ONNX
(Concat, or Split and Add, in the graph). Not found before restore; merged back into the owner's layers
and found after; an innocent model split the same way is left alone; the ResNet's layers come back exactly."""

from __future__ import annotations

import json
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
from auditor.plugins.restore.branches import BranchRestorer, merge_branches
from auditor.toolkit import equivalent
from auditor.toolkit import models as zoo
from auditor.toolkit.modelio import export_onnx
from auditor.toolkit.recognise import Runnable

pytestmark = pytest.mark.usefixtures("one_thread")


def split(model: Path, out: Path, aid: str, **options: Any) -> Path:
    registered("attacks")[aid].component.apply(model, out, options={"seed": 3, **options})
    return out


def gr_verdict(graph: LayerGraph, owner: SimpleNamespace) -> Verdict:
    (finding,) = [f for f in run_detectors(graph, bundles=[owner.bundle]) if f.detector == "greedy-residuals"]
    return finding.verdict


def branch_log(log: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = [e for e in log if e["restorer"] == "restore-branches"]
    assert entry["status"] == "ok", entry
    return dict(entry["log"])


@pytest.mark.parametrize("aid", ["split-outputs", "split-inputs"])
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_greedy_residuals_found_only_after_the_merge(
    gr_owner: SimpleNamespace, tmp_path: Path, aid: str, suffix: str
) -> None:
    suspect = load_model(split(gr_owner.files["safetensors"], tmp_path / f"s{suffix}", aid))
    assert gr_verdict(suspect, gr_owner) is not Verdict.DETECTED
    reference = load_model(gr_owner.files["safetensors"])
    restored, log = run_restorers(suspect, reference)
    entry = branch_log(log)
    assert entry["acted"] and entry["evidence"]["score"] >= guard.THRESHOLD, entry
    merged = {m["name"]: m for m in entry["merges"]}
    assert set(merged) == (
        {"conv1", "conv2", "conv3", "head"} if aid == "split-outputs" else {"conv2", "conv3", "head"}
    )
    assert all(m["mode"] == ("outputs" if aid == "split-outputs" else "inputs") for m in merged.values())
    assert all(m["residual"] == 0.0 and m["reference"] == name for name, m in merged.items())
    assert gr_verdict(restored, gr_owner) is Verdict.DETECTED
    if suffix == ".safetensors":  # nothing else to undo: the owner's weights, exactly
        for name in merged:
            owner = gr_owner.model.state_dict()[f"{name}.weight"]
            assert torch.equal(restored.layer(name).params["weight"].read(), owner)


@pytest.mark.parametrize(("aid", "suffix"), [("split-outputs", ".onnx"), ("split-inputs", ".safetensors")])
def test_hufunet_reads_its_kernels_back_after_the_merge(
    hufunet_owner: SimpleNamespace, tmp_path: Path, aid: str, suffix: str
) -> None:
    suspect = load_model(split(hufunet_owner.model_file, tmp_path / f"s{suffix}", aid))
    before = audit_bundle(suspect, hufunet_owner.bundle, {})
    assert before.verdict is not Verdict.DETECTED
    restored, log = run_restorers(suspect, load_model(hufunet_owner.model_file))
    assert branch_log(log)["acted"]
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert after.verdict is Verdict.DETECTED and after.metrics["diff_acc"] < TAU_ACC, after.summary


def test_an_innocent_split_model_is_left_alone(gr_owner: SimpleNamespace, tmp_path: Path, clean_model: Any) -> None:
    suspect = load_model(split(clean_model(tmp_path / "clean.safetensors", seed=1), tmp_path / "i.onnx",
                               "split-outputs"))  # fmt: skip
    reference = load_model(gr_owner.files["safetensors"])
    restored, log = run_restorers(suspect, reference)
    entry = branch_log(log)
    assert (
        not entry["acted"]
        and entry["reason"].startswith("left alone: ")
        and "but not demonstrably derived" in entry["reason"]
    )
    assert entry["evidence"]["score"] < guard.THRESHOLD and len(entry["merges"]) == 4
    assert gr_verdict(restored, gr_owner) is not Verdict.DETECTED
    unguarded, _ = BranchRestorer(guard=False).restore(suspect, reference)
    assert unguarded is not suspect  # the guard decided, not a failure to merge


def test_an_unsplit_model_has_no_branches(gr_owner: SimpleNamespace) -> None:
    graph = load_model(gr_owner.files["safetensors"])
    merged, merges, why = merge_branches(graph, graph)
    assert merged is None and merges == [] and why == "no layer split into parallel branches"


def test_without_the_reference_names_and_shapes_suffice(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    suspect = load_model(split(gr_owner.files["safetensors"], tmp_path / "s.safetensors", "split-outputs", k=3))
    merged, merges, _ = merge_branches(suspect)
    assert merged is not None and [m.name for m in merges] == ["conv1", "conv2", "conv3", "head"]
    assert all(m.reference is None and len(m.members) == 3 for m in merges)
    assert torch.equal(merged.layer("conv3").params["weight"].read(), gr_owner.model.state_dict()["conv3.weight"])


def test_a_reference_with_no_layer_of_the_merged_shape_is_left_alone(gr_owner: SimpleNamespace,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    suspect = load_model(split(gr_owner.files["safetensors"], tmp_path / "s.safetensors", "split-outputs", k=3))
    other = zoo.build("resnet", seed=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "r.safetensors"))
    merged, _, why = merge_branches(suspect, load_model(tmp_path / "r.safetensors"))
    assert merged is None and why.endswith("a shape no layer of the reference has: left alone")


@pytest.mark.parametrize("edit", ["split_outputs", "split_inputs"])
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_the_resnet_layers_come_back(tmp_path: Path, edit: str, suffix: str) -> None:
    model = zoo.build("resnet", seed=0).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    edited, names = getattr(equivalent, edit)(model, k=2)
    path = tmp_path / f"s{suffix}"
    if suffix == ".onnx":
        export_onnx(Runnable(edited.eval(), "resnet", (1, 8, 8)), path)
    else:
        save_file({k: v.contiguous() for k, v in edited.state_dict().items()}, str(path))
    reference = load_model(tmp_path / "ref.safetensors")
    restored, log = run_restorers(load_model(path), reference)
    entry = branch_log(log)
    assert entry["acted"] and sorted(m["reference"] for m in entry["merges"]) == sorted(names)
    assert all(e["status"] == "ok" for e in log)
    for name in names:
        layer = restored.layer(name)
        assert layer.weight is not None and layer.weight.shape == reference.layer(name).weight.shape  # type: ignore[union-attr]
        if suffix == ".safetensors":
            assert torch.equal(layer.params["weight"].read(), model.state_dict()[f"{name}.weight"])


def test_the_audit_report_logs_the_merges(gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Any) -> None:
    suspect = split(gr_owner.files["pt"], tmp_path / "s.onnx", "split-inputs")
    code, out, err = run_cli("audit", suspect, "--bundle", gr_owner.out / "owner_bundle.json", "--reference",
                             gr_owner.files["safetensors"], "--out", tmp_path / "r.html")  # fmt: skip
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    (entry,) = [e for e in report["restore"]["entries"] if e["restorer"] == "restore-branches"]
    assert entry["log"]["acted"] and entry["log"]["evidence"]["derived"]
    merges = entry["log"]["merges"]
    assert [m["name"] for m in merges] == ["conv2", "conv3", "head"] and {m["mode"] for m in merges} == {"inputs"}
    assert merges[0]["members"] == ["conv2.0", "conv2.1"] and merges[0]["evidence"].startswith("the file's graph")
    assert "restore-branches" in (tmp_path / "r.html").read_text()


def test_an_anonymised_onnx_file_is_merged_from_its_concats(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    """Every weight and node renamed (``t0``, ``n6``): the branches reaching one Concat at consecutive
    offsets from the same input are still groups, and take the reference's names. The head's two branches
    concatenate into the model's output, which no edge shows: they stay, and the watermark is found anyway."""
    import onnx

    model = onnx.load(str(split(gr_owner.files["pt"], tmp_path / "s.onnx", "split-outputs")))
    renamed = {init.name: f"t{i}" for i, init in enumerate(model.graph.initializer)}
    for init in model.graph.initializer:
        init.name = renamed[init.name]
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
        node.input[:] = [renamed.get(x, x) for x in node.input]
    onnx.save(model, str(tmp_path / "anon.onnx"))
    suspect = load_model(tmp_path / "anon.onnx")
    assert not {"conv1.0", "conv2", "conv2.0"} & {x.name for x in suspect.layers}
    assert gr_verdict(suspect, gr_owner) is not Verdict.DETECTED
    restored, log = run_restorers(suspect, load_model(gr_owner.files["safetensors"]))
    entry = branch_log(log)
    assert entry["acted"] and [m["name"] for m in entry["merges"]] == ["conv1", "conv2", "conv3"]
    assert all(m["evidence"] == "the file's graph (Concat at consecutive offsets)" for m in entry["merges"])
    assert gr_verdict(restored, gr_owner) is Verdict.DETECTED


@pytest.mark.parametrize("aid", ["split-outputs", "split-inputs"])
def test_a_permuted_then_split_onnx_copy_is_found(gr_owner: SimpleNamespace, tmp_path: Path, aid: str) -> None:
    """Composed with a permutation, the merged layers must keep the graph's edges (the head reads conv3
    through a flatten, in blocks from offset 0), or conv3's channels could not be put back in order."""
    registered("attacks")["permute"].component.apply(gr_owner.files["pt"], tmp_path / "p.pt", options={"seed": 5})
    suspect = load_model(split(tmp_path / "p.pt", tmp_path / "s.onnx", aid))
    restored, log = run_restorers(suspect, load_model(gr_owner.files["safetensors"]))
    entry = branch_log(log)
    assert entry["acted"] and min(entry["evidence"]["layers"].values()) > 0.99, entry["evidence"]
    assert [e["restorer"] for e in log if e["log"]["acted"]][:2] == ["restore-branches", "restore-channels"]
    assert gr_verdict(restored, gr_owner) is Verdict.DETECTED


@pytest.mark.parametrize("aid", ["split-outputs", "split-inputs"])
def test_a_permuted_then_split_resnet_comes_back(tmp_path: Path, aid: str) -> None:
    """The branches of an input split read a residual sum: two sources through an Add, both from offset 0."""
    model = zoo.build("resnet", seed=0).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    registered("attacks")["permute"].component.apply(tmp_path / "m.pt", tmp_path / "p.pt", options={"seed": 5})
    suspect = load_model(split(tmp_path / "p.pt", tmp_path / "s.onnx", aid))
    _, log = run_restorers(suspect, load_model(tmp_path / "m.safetensors"))
    entry = branch_log(log)
    assert entry["acted"] and min(entry["evidence"]["layers"].values()) > 0.99, entry["evidence"]
    assert len(entry["merges"]) == (7 if aid == "split-outputs" else 6)
    assert [e["log"]["acted"] for e in log if e["restorer"] == "restore-channels"] == [True]
