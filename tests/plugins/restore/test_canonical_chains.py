"""restore-canonical on chains longer than two, batch-norms between, identity layers: the attacks
``insert-identity``, ``bn-between`` and ``chain`` on both CNN owners (Greedy Residuals: ``gr_owner``;
HufuNet, width 2: ``hufunet_owner``), written as safetensors (a bare state dict: the names show the chain)
and as ONNX (a real graph, batch-norm folded by the export). Each copy computes the owner's function
within 1e-4, is not found before restore, and is found after; an innocent model edited the same way
passes every new step untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Verdict
from auditor.graph import LayerGraph
from auditor.plugin_manager import registered
from auditor.plugins.hufunet.detector import TAU_ACC, audit_bundle
from auditor.plugins.restore import guard
from auditor.plugins.restore.plugin import (
    BasisRestorer,
    CanonicalRestorer,
    ChannelRestorer,
    FoldRestorer,
    ScaleRestorer,
)
from auditor.toolkit import edits
from auditor.toolkit.modelio import predictor

pytestmark = pytest.mark.usefixtures("one_thread")

REST = (ChannelRestorer(), FoldRestorer(), ScaleRestorer())
ALL = (CanonicalRestorer(), BasisRestorer(), *REST)
EDITS = ("insert-identity", "bn-between", "chain")
#: The edits that hide the watermark from the detectors on their own. An inserted identity leaves every
#: original weight where it was (under a new name, ``conv2.0``), and both detectors still find it there.
HIDING = ("bn-between", "chain")
SUFFIXES = (".safetensors", ".onnx")


def attack(name: str, model: Path, out: Path, **options: Any) -> dict[str, Any]:
    return registered("attacks")[name].component.apply(model, out, options={"seed": 5, **options})


def logits_change(path: Path, owner_model: torch.nn.Module, x: torch.Tensor) -> float:
    run = predictor(path)
    assert run is not None, path
    with torch.no_grad():
        return float((run(x) - owner_model.eval()(x)).abs().max())


def gr_verdict(graph: LayerGraph, owner: SimpleNamespace, restorers: tuple[Any, ...]) -> Verdict:
    restored, _ = run_restorers(graph, load_model(owner.files["safetensors"]), restorers=restorers)
    (finding,) = run_detectors(restored, bundles=[owner.bundle])
    return finding.verdict


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("edit", EDITS)
def test_gr_owner_edited_is_found_only_after_fusion(
    gr_owner: SimpleNamespace, tmp_path: Path, edit: str, suffix: str
) -> None:
    suspect = tmp_path / f"{edit}{suffix}"
    summary = attack(edit, gr_owner.files["safetensors"], suspect)
    assert summary["max_output_change"] <= 1e-4 and summary["edited"] == ["conv1", "conv2", "conv3", "head"]
    if suffix == ".onnx":  # the file itself runs: its logits are the owner's
        assert logits_change(suspect, gr_owner.model, gr_owner.data.test.tensors[0]) <= 1e-4
    graph = load_model(suspect)
    assert len(graph.layers) > len(load_model(gr_owner.files["safetensors"]).layers)
    before = gr_verdict(graph, gr_owner, REST)
    assert (before is not Verdict.DETECTED) if edit in HIDING else (before is Verdict.DETECTED)
    restored, log = run_restorers(graph, load_model(gr_owner.files["safetensors"]), restorers=ALL)
    canonical = log[0]["log"]
    assert canonical["acted"] and canonical["evidence"]["derived"], canonical["reason"]
    assert all(f["residual"] < 1e-6 for f in canonical["fusions"])
    (finding,) = run_detectors(restored, bundles=[gr_owner.bundle])
    assert finding.verdict is Verdict.DETECTED, finding.summary
    # conv2, where the watermark is, is the owner's again (up to the export's folding, undone by restore-fold)
    owner = gr_owner.model.state_dict()["conv2.weight"]
    assert torch.allclose(restored.layer("conv2").params["weight"].read(), owner, atol=1e-4)


def test_fusion_log_names_every_link(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    attack("bn-between", gr_owner.files["safetensors"], tmp_path / "s.safetensors")
    suspect, reference = load_model(tmp_path / "s.safetensors"), load_model(gr_owner.files["safetensors"])
    fused, log = CanonicalRestorer().restore(suspect, reference)
    assert [f["chain"] for f in log["fusions"]] == [
        [f"{n}.0", f"{n}.1", f"{n}.2"] for n in ("conv1", "conv2", "conv3", "head")
    ]
    assert [f["name"] for f in log["fusions"]] == ["conv1", "conv2", "conv3", "head"]
    assert all("consecutive entries" in f["edges"] for f in log["fusions"])
    assert "bias" not in fused.layer("conv2").params  # the fused bias went into bn2's running mean
    assert not torch.equal(
        fused.layer("bn2").params["running_mean"].read(), reference.layer("bn2").params["running_mean"].read()
    )
    assert len(fused.layers) == len(reference.layers)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("edit", EDITS)
def test_hufunet_owner_edited_is_found_only_after_fusion(
    hufunet_owner: SimpleNamespace, tmp_path: Path, edit: str, suffix: str
) -> None:
    suspect = tmp_path / f"{edit}{suffix}"
    summary = attack(edit, hufunet_owner.model_file, suspect, layers="conv1, conv2, conv3")
    assert summary["max_output_change"] <= 1e-4
    graph = load_model(suspect)
    reference = load_model(hufunet_owner.model_file)
    before = audit_bundle(run_restorers(graph, reference, restorers=REST)[0], hufunet_owner.bundle, {})
    assert (before.verdict is not Verdict.DETECTED) if edit in HIDING else (before.verdict is Verdict.DETECTED)
    restored, log = run_restorers(graph, reference, restorers=ALL)
    assert log[0]["log"]["acted"], log[0]["log"]["reason"]
    after = audit_bundle(restored, hufunet_owner.bundle, {})
    assert after.verdict is Verdict.DETECTED, after.summary
    assert after.metrics["diff_acc"] < TAU_ACC


@pytest.mark.parametrize("edit", EDITS)
def test_innocent_edited_models_pass_every_new_step_untouched(
    gr_owner: SimpleNamespace, tmp_path: Path, clean_model: Callable[..., Path], edit: str
) -> None:
    innocent = tmp_path / f"innocent-{edit}.safetensors"
    attack(edit, clean_model(tmp_path / "clean.safetensors", seed=2), innocent)
    graph, reference = load_model(innocent), load_model(gr_owner.files["safetensors"])
    restored, log = run_restorers(graph, reference, restorers=ALL)
    canonical, basis = log[0]["log"], log[1]["log"]
    assert not canonical["acted"] and canonical["fusions"]  # fused, then the guard refused
    assert canonical["evidence"]["score"] < guard.THRESHOLD and canonical["reason"].startswith("left alone")
    assert not basis["acted"] and restored is graph
    assert gr_verdict(graph, gr_owner, ALL) is not Verdict.DETECTED


def test_torchscript_file_is_fused_too(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    """A TorchScript archive keeps module order and names: the chain is as evident as in a state dict."""
    module, _ = edits.factor_chain(gr_owner.model, seed=4)
    torch.jit.script(module.eval()).save(str(tmp_path / "chain.pt"))
    graph = load_model(tmp_path / "chain.pt")
    _, log = CanonicalRestorer().restore(graph, load_model(gr_owner.files["safetensors"]))
    assert log["acted"] and len(log["fusions"]) == 4, log["reason"]
    assert gr_verdict(graph, gr_owner, ALL) is Verdict.DETECTED


def test_a_gap_in_the_names_is_not_a_chain(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    """``conv2.0`` then ``conv2.2``: a parameter-free module sat at ``conv2.1`` (it may be a ReLU), so a bare
    state dict does not show the two are linear; nothing is fused and the log says so."""
    attack("insert-identity", gr_owner.files["safetensors"], tmp_path / "i.safetensors", layers="conv2")
    state = load_file(tmp_path / "i.safetensors")
    state = {k.replace("conv2.1.", "conv2.2."): v for k, v in state.items()}
    save_file(state, str(tmp_path / "gap.safetensors"))
    graph = load_model(tmp_path / "gap.safetensors")
    same, log = CanonicalRestorer().restore(graph, load_model(gr_owner.files["safetensors"]))
    assert same is graph and not log["acted"]
    assert log["reason"] == "no chain of linear layers without a nonlinearity between them"


def test_onnx_matmul_add_chain_through_an_identity_node_is_fused(tmp_path: Path) -> None:
    """A hand-written ONNX graph: ``MatMul + Add`` (a linear layer with its bias), an ``Identity`` node, a
    second ``MatMul + Add`` mixing the 32 features by an orthogonal ``Q``, a ReLU, the head as a ``Gemm``.
    The reference is the plain two-layer MLP as a state dict; the first two operations are fused back into
    its first layer, named as the reference's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen)
    w2, b2 = torch.randn(10, 32, generator=gen), torch.randn(10, generator=gen)
    save_file({"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}, str(tmp_path / "reference.safetensors"))
    q = edits.random_orthogonal(32, generator=gen).float()
    inits = {"a1": (q.T @ w1).T, "c1": q.T @ b1, "a2": q.T, "c2": torch.zeros(32), "w2": w2, "b2": b2}
    nodes = [
        helper.make_node("MatMul", ["x", "a1"], ["h1"]), helper.make_node("Add", ["h1", "c1"], ["h2"]),
        helper.make_node("Identity", ["h2"], ["h3"]), helper.make_node("MatMul", ["h3", "a2"], ["h4"]),
        helper.make_node("Add", ["h4", "c2"], ["h5"]), helper.make_node("Relu", ["h5"], ["h6"]),
        helper.make_node("Gemm", ["h6", "w2", "b2"], ["y"], transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(t.contiguous().numpy(), name) for name, t in inits.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "suspect.onnx"))
    suspect, reference = load_model(tmp_path / "suspect.onnx"), load_model(tmp_path / "reference.safetensors")
    assert len([x for x in suspect.layers if x.kind.value == "linear"]) == 3
    fused, log = CanonicalRestorer().restore(suspect, reference)
    assert log["acted"] and "the file's graph" in log["fusions"][0]["edges"], log["reason"]
    layer = fused.layer("0")
    assert torch.allclose(layer.params["weight"].read(), w1, atol=1e-5)
    assert torch.allclose(layer.params["bias"].read(), b1, atol=1e-5)
