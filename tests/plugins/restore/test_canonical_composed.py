"""restore-canonical (and restore-basis) on linear edits composed with the per-channel ones, as a thief chains
them: ``permute -> scale -> bn-fold -> the edit``, the edit writing ONNX (its export last), against a reference
given as a bare state dict. Such a reference lists its layers by name (``head``, ``layer1.conv1``, ...,
``stem``), not in the order they run, and its guessed edges make ``layer2.conv1`` look grouped; pairing the
fused ResNet's layers by position then crossed them (``layer2.conv1`` with ``layer2.conv2``) and the fusion
was refused. Real SmallResNets with random batch-norm statistics (no training: the weights' values are what
restore reads); an independent model edited the same way is never touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.graph import LayerGraph
from auditor.plugin_manager import registered
from auditor.plugins.restore.plugin import (
    BasisRestorer,
    CanonicalRestorer,
    ChannelRestorer,
    FoldRestorer,
    ScaleRestorer,
)
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.modelio import predictor

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = (CanonicalRestorer(), BasisRestorer(), ChannelRestorer(), FoldRestorer(), ScaleRestorer())
COMPOSED = ("permute", "scale", "bn-fold")
EDITS = ("factor-linear", "chain", "bn-between", "insert-identity")
#: The layers every ResNet edit factors, by the module each replaced.
CONVS = ("stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0")


def _resnet(seed: int, folder: Path) -> Path:
    """A SmallResNet with random batch-norm statistics and affine parameters, saved as safetensors."""
    model = zoo.build("resnet", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
    return training.save_model(model.eval(), folder, f"resnet{seed}")["safetensors"]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _resnet(0, tmp_path_factory.mktemp("owner"))


def _steal(model: Path, edit: str, work: Path) -> Path:
    current = model
    for i, attack in enumerate((*COMPOSED, edit)):
        out = work / f"{i}-{attack}{'.onnx' if attack == edit else '.safetensors'}"
        registered("attacks")[attack].component.apply(current, out, options={"seed": 3 + i, "overwrite": True})
        current = out
    return current


def _weights(graph: LayerGraph) -> dict[str, torch.Tensor]:
    return {x.name: x.weight.read(float32=True) for x in graph.layers if x.weight is not None}  # type: ignore[union-attr]


def _entry(log: list[dict[str, Any]], restorer: str) -> dict[str, Any]:
    entry = next(e for e in log if e["restorer"] == restorer)
    assert entry["status"] == "ok", entry
    inner: dict[str, Any] = entry["log"]
    return inner


@pytest.mark.parametrize("edit", EDITS)
def test_composed_resnet_onnx_is_fused_into_the_reference_layers(owner: Path, tmp_path: Path, edit: str) -> None:
    suspect = _steal(owner, edit, tmp_path)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    run_owner, run_suspect = predictor(owner), predictor(suspect)
    assert run_owner is not None and run_suspect is not None
    assert float((run_owner(x) - run_suspect(x)).abs().max()) <= 1e-4
    reference = load_model(owner)
    restored, log = run_restorers(load_model(suspect), reference, restorers=ALL)
    canonical = _entry(log, "restore-canonical")
    assert canonical["acted"], canonical["reason"]
    assert canonical["evidence"]["score"] >= 0.99
    # Each chain fused into the layer its module replaced, whatever order the reference lists them in.
    fused = {f["reference"]: f["chain"] for f in canonical["fusions"]}
    assert set(CONVS) <= set(fused), fused
    for name in CONVS:
        assert all(_module_of(member).startswith(name + ".") for member in fused[name]), (name, fused[name])
    assert all(_entry(log, r)["acted"] for r in ("restore-channels", "restore-fold")), log
    # The convolutions are the reference's again: permutation, scale and fold undone after the fusion.
    mine, theirs = _weights(restored), _weights(reference)
    for name in CONVS:
        error = float((mine[name] - theirs[name]).norm() / theirs[name].norm())
        assert error < 1e-4, (name, error)


def _module_of(name: str) -> str:
    """An ONNX node's module path (``/layer2/shortcut/shortcut.0/shortcut.0.0/Conv``: ``layer2.shortcut.0.0``,
    the exporter's scopes each extending the one before); a tensor's name as it is."""
    if not name.startswith("/"):
        return name
    scopes = name.strip("/").split("/")[:-1]
    return ".".join(s for i, s in enumerate(scopes) if i + 1 == len(scopes) or not scopes[i + 1].startswith(s + "."))


def test_an_independent_resnet_edited_alike_is_left_alone(owner: Path, tmp_path: Path) -> None:
    suspect = _steal(_resnet(7, tmp_path), "bn-between", tmp_path)
    graph = load_model(suspect)
    restored, log = run_restorers(graph, load_model(owner), restorers=ALL)
    canonical = _entry(log, "restore-canonical")
    assert canonical["fusions"] and not canonical["acted"]  # fused, then refused by the guard
    assert canonical["evidence"]["score"] < 0.5
    assert restored is graph and not any(e["log"]["acted"] for e in log)
