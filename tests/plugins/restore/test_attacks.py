"""Restore against each function-preserving edit of the watermarked SmallCNN, for each scheme's owner
(the ``gr_owner`` and ``hufunet_owner`` fixtures).

Each edit is made with the same channel operations restore uses (their graph
from an unfolded ONNX export, so that its edges are real), saved the way a
thief would publish it (safetensors, or ONNX for batch-norm folding) and
loaded with ``load_model``. The reference is the owner's released
safetensors file. Every edit must keep the model's outputs (max logit
difference below 1e-4), and after restore the owner's detector must
give the verdict it gives on the unattacked model (detected), with the weights back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Verdict
from auditor.graph import LayerGraph
from auditor.plugins.restore.plugin import ChannelRestorer, FoldRestorer, ScaleRestorer
from auditor.toolkit import edits as attacks
from auditor.toolkit import models as zoo
from auditor.toolkit.channels import Tensors, graph_with_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

RESTORERS = (ChannelRestorer(), FoldRestorer(), ScaleRestorer())
MARKED = ("conv2", "conv3")  # the layers Greedy Residuals marks in SmallCNN


@pytest.fixture(scope="module", params=["greedy-residuals", "hufunet"])
def case(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    onnx_export: Callable[..., Path],
    cnn_from: Callable[[Tensors], nn.Module],
) -> SimpleNamespace:
    """The watermarked SmallCNN of either scheme's owner (``gr_owner``: width 1; ``hufunet_owner``: width 2)."""
    if request.param == "greedy-residuals":
        owner = request.getfixturevalue("gr_owner")
        model, released = owner.model, owner.files["safetensors"]
    else:
        owner = request.getfixturevalue("hufunet_owner")
        model, released = zoo.build("cnn", width=2), owner.model_file
        model.load_state_dict(load_file(released))
    out = tmp_path_factory.mktemp("restore_attacks")
    graph = load_model(onnx_export(model, out / "unfolded.onnx", fold=False))
    x = owner.data.test.tensors[0]
    with torch.no_grad():
        logits = model.eval()(x)
    reference = load_model(released)
    return SimpleNamespace(owner=owner, model=model, out=out, graph=graph, x=x, logits=logits, reference=reference,
                           baseline=verdict(reference, owner), cnn_from=cnn_from)  # fmt: skip


def verdict(graph: LayerGraph, owner: SimpleNamespace) -> Verdict:
    (finding,) = run_detectors(graph, bundles=[owner.bundle])
    return finding.verdict


def publish(case: SimpleNamespace, tensors: Tensors, name: str) -> tuple[LayerGraph, float]:
    """Save the edited model as safetensors, load it as a suspect; also the max logit difference."""
    model = case.cnn_from(tensors)
    with torch.no_grad():
        diff = float((model(case.x) - case.logits).abs().max())
    path = case.out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_model(path), diff


def weights(graph: LayerGraph, name: str) -> torch.Tensor:
    return graph.layer(name).params["weight"].read(float32=True)


def _expand_then_permute(g: LayerGraph, t: Tensors) -> Tensors:
    grown = attacks.expand(g, t, "conv2", 32, seed=3)  # paper Appendix B: conv2 doubled, conv3 reads zeros
    return attacks.permute(graph_with_tensors(g, grown), grown, seed=4)[0]


ATTACKS: dict[str, tuple[Callable[[LayerGraph, Tensors], Tensors], bool, float]] = {
    # name: (edit, whether it defeats the detector on its own, tolerance of the restored weights)
    "permutation": (lambda g, t: attacks.permute(g, t, seed=1)[0], True, 1e-6),
    "positive scaling": (lambda g, t: attacks.scale(g, t, seed=2), False, 1e-5),
    "scaling before batch-norm": (lambda g, t: attacks.scale(g, t, seed=3, before_norm=True), False, 1e-5),
    "negation through batch-norm": (lambda g, t: attacks.negate(g, t, seed=4), True, 1e-6),
    "expansion, then permutation": (_expand_then_permute, True, 1e-6),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_edit_keeps_the_function_and_restore_brings_the_watermark_back(case: SimpleNamespace, name: str) -> None:
    edit, defeats, tolerance = ATTACKS[name]
    edited = edit(case.graph, attacks.module_tensors(case.model))
    suspect, diff = publish(case, edited, name.replace(" ", "_").replace(",", ""))
    assert diff < 1e-4
    assert case.baseline is Verdict.DETECTED
    if defeats:
        assert verdict(suspect, case.owner) is not Verdict.DETECTED
    restored, log = run_restorers(suspect, case.reference, restorers=RESTORERS)
    assert all(e["status"] == "ok" for e in log), log
    assert verdict(restored, case.owner) is case.baseline
    for layer in MARKED:
        got, want = weights(restored, layer), weights(case.reference, layer)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= tolerance * float(want.abs().max()), layer


def test_positive_scaling_is_logged_per_channel(case: SimpleNamespace) -> None:
    scaled = attacks.scale(case.graph, attacks.module_tensors(case.model), seed=2, low=2.0, high=4.0)
    suspect, _ = publish(case, scaled, "scaled")
    _, log = run_restorers(suspect, case.reference, restorers=RESTORERS)
    scale_log = log[2]["log"]
    assert scale_log["acted"] and scale_log["evidence"]["derived"]
    rows = {row["name"]: row for row in scale_log["layers"]}
    assert set(rows) == {"bn1", "bn2", "bn3"}  # the space outputs; readers were compensated
    assert rows["bn2"]["scaled"] == weights(case.reference, "conv2").shape[0] and rows["bn2"]["negated"] == 0
    assert 2.0 - 1e-3 <= rows["bn2"]["scale"]["min"] <= rows["bn2"]["scale"]["max"] <= 4.0 + 1e-3


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_batch_norm_folding_by_the_onnx_exporter_is_undone(
    case: SimpleNamespace, dynamo: bool, onnx_export: Callable[..., Path]
) -> None:
    # The legacy export also carries a permutation and negated channels, which make some folded factors negative.
    permuted, _ = attacks.permute(case.graph, attacks.module_tensors(case.model), seed=5)
    edited = attacks.negate(case.graph, permuted, seed=6)
    model = case.cnn_from(edited) if not dynamo else case.model
    path = onnx_export(model, case.out / f"folded_{dynamo}.onnx", fold=True, dynamo=dynamo)
    suspect = load_model(path)
    assert not [x for x in suspect.layers if x.kind.value == "batch-norm"], "the exporter was expected to fold"
    restored, log = run_restorers(suspect, case.reference, restorers=RESTORERS)
    fold_log = log[1]["log"]
    assert fold_log["acted"] and [row["name"] for row in fold_log["layers"] if row["unfolded"]] == [
        x.name for x in suspect.layers if x.kind.value == "conv2d"
    ]
    assert verdict(restored, case.owner) is case.baseline
    convs = [x.name for x in restored.layers if x.kind.value == "conv2d"]
    for conv, original in zip(convs, ("conv1", "conv2", "conv3"), strict=True):
        assert "bias" not in restored.layer(conv).params
        assert torch.allclose(weights(restored, conv), weights(case.reference, original), atol=1e-5)
        for role in ("weight", "bias", "running_mean", "running_var"):  # the batch-norm is back, same values
            bn = original.replace("conv", "bn")
            got = restored.layer(bn).params[role].read(float32=True)
            assert torch.allclose(got, case.reference.layer(bn).params[role].read(float32=True), atol=1e-4)


def test_cut_off_channels_are_padded_and_still_verify(case: SimpleNamespace) -> None:
    cut, removed = attacks.cut_off(case.graph, attacks.module_tensors(case.model), 0.05, seed=7)
    suspect, _ = publish(case, cut, "cut_off")
    assert verdict(suspect, case.owner) is not Verdict.DETECTED  # layers no longer match the bundle's shapes
    restored, log = run_restorers(suspect, case.reference, restorers=RESTORERS)
    rows = {row["name"]: row for row in log[0]["log"]["layers"]}
    for layer in ("conv1", "conv2", "conv3"):
        assert rows[layer]["padded_channels"] == removed[layer]
        padded = weights(restored, layer)[removed[layer]]
        assert padded.numel() and not padded.any()
    assert verdict(restored, case.owner) is case.baseline
