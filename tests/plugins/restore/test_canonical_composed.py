"""restore-canonical and restore-basis on linear edits composed with the per-channel ones, as a thief chains
them: ``permute -> scale -> bn-fold -> the edit``, against a reference given as a bare state dict.

Such a reference lists its layers by name (``head``, ``layer1.conv1``, ..., ``stem``), not in the order they
run, and its guessed edges make ``layer2.conv1`` look grouped; pairing a fused ResNet's layers by position then
crossed them (``layer2.conv1`` with ``layer2.conv2``) and the fusion was refused. And an invertible map between
two linear layers whose input channels were permuted first (restore-basis runs before channel alignment) was
not explained by any map, and left alone. Real models with random batch-norm statistics (no training: the
weights' values are what restore reads); an independent model edited the same way is never touched."""

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
    return _saved(zoo.build("resnet", seed=seed), seed, folder, f"resnet{seed}")


def _saved(model: torch.nn.Module, seed: int, folder: Path, stem: str) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
    return training.save_model(model.eval(), folder, stem)["safetensors"]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _resnet(0, tmp_path_factory.mktemp("owner"))


def _steal(
    model: Path, edit: str, work: Path, suffix: str = ".onnx", factory: str | None = None, *, before_norm: bool = True
) -> Path:
    current = model
    for i, attack in enumerate((*COMPOSED, edit)):
        out = work / f"{i}-{attack}{suffix if attack == edit else '.safetensors'}"
        options: dict[str, Any] = {"seed": 3 + i, "overwrite": True, **({"model_factory": factory} if factory else {})}
        if attack == "scale":  # the batch-norm's output scaled and the readers' input channels divided back
            options["before_norm"] = before_norm
        registered("attacks")[attack].component.apply(current, out, options=options)
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


# --- restore-basis: a map between two linear layers, behind permuted channels ---------------------------------

#: Architectures with linear pairs (each 3x3 convolution followed directly by a 1x1 one), for the attacks'
#: ``--model-factory``: in the CNN every pair reads the pair before it; in the ResNet inside residual blocks.
FACTORIES = """
from torch import nn
from auditor.toolkit import models as zoo

def _paired(conv):
    return nn.Sequential(conv, nn.Conv2d(conv.out_channels, conv.out_channels, 1, bias=False))

def cnn():
    m = zoo.SmallCNN()
    m.conv1, m.conv2, m.conv3 = _paired(m.conv1), _paired(m.conv2), _paired(m.conv3)
    return m

def resnet():
    m = zoo.SmallResNet()
    for block in (m.layer1, m.layer2):
        block.conv1, block.conv2 = _paired(block.conv1), _paired(block.conv2)
    return m
"""
FIRSTS = {"cnn": ("conv1.0", "conv2.0", "conv3.0"),
          "resnet": ("layer1.conv1.0", "layer1.conv2.0", "layer2.conv1.0", "layer2.conv2.0")}  # fmt: skip


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The factory module and a function building one of its models."""
    import importlib.util

    folder = tmp_path_factory.mktemp("paired")
    path = folder / "paired_models.py"
    path.write_text(FACTORIES)
    spec = importlib.util.spec_from_file_location("paired_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _paired_model(paired: tuple[Path, Any], arch: str, seed: int, folder: Path) -> Path:
    torch.manual_seed(seed)
    return _saved(getattr(paired[1], arch)(), seed, folder, f"paired_{arch}{seed}")


@pytest.mark.parametrize(
    ("arch", "suffix", "before_norm"),
    [("cnn", ".safetensors", True), ("cnn", ".onnx", True), ("resnet", ".safetensors", True),
     ("resnet", ".onnx", True), ("cnn", ".onnx", False)],
)  # fmt: skip
def test_a_map_behind_permuted_channels_is_removed(
    paired: tuple[Path, Any], tmp_path: Path, arch: str, suffix: str, before_norm: bool
) -> None:
    """The map of every pair is removed, the pairs' first layers back to the reference's; with ``before_norm``
    false the pairs' input channels are scaled too (the scale is fitted with the map)."""
    factory = f"{paired[0]}:{arch}"
    owner = _paired_model(paired, arch, 0, tmp_path)
    suspect = _steal(owner, "invertible-map", tmp_path, suffix, factory, before_norm=before_norm)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    run_owner, run_suspect = predictor(owner, model_factory=factory), predictor(suspect, model_factory=factory)
    assert run_owner is not None and run_suspect is not None
    assert float((run_owner(x) - run_suspect(x)).abs().max()) <= 1e-4
    reference = load_model(owner)
    restored, log = run_restorers(load_model(suspect), reference, restorers=ALL)
    entry = _entry(log, "restore-basis")
    assert entry["acted"] and entry["evidence"]["score"] >= 0.99, entry["reason"]
    fits = {f["first"]: f for f in entry["maps"]}
    assert set(fits) == set(FIRSTS[arch]), fits
    assert all(f["acted"] and f["residual"] < 1e-3 and 1 < f["condition"] < 100 for f in fits.values()), fits
    # Every pair but the first reads permuted channels: its map was found with the channel order taken out.
    assert all("around the channel order" in fits[a]["method"] for a in FIRSTS[arch][1:]), fits
    mine, theirs = _weights(restored), _weights(reference)
    for name in FIRSTS[arch]:  # the 3x3 convolutions, channels and all, are the reference's again
        error = float((mine[name] - theirs[name]).norm() / theirs[name].norm())
        assert error < 1e-4, (name, error)


def test_an_independent_paired_model_mapped_alike_is_left_alone(paired: tuple[Path, Any], tmp_path: Path) -> None:
    factory = f"{paired[0]}:cnn"
    owner = _paired_model(paired, "cnn", 0, tmp_path)
    suspect = _steal(_paired_model(paired, "cnn", 7, tmp_path), "invertible-map", tmp_path, ".safetensors", factory)
    graph = load_model(suspect)
    restored, log = run_restorers(graph, load_model(owner), restorers=ALL)
    entry = _entry(log, "restore-basis")
    assert entry["maps"] and not entry["acted"]
    assert all(not f["acted"] and f["residual"] > 0.3 for f in entry["maps"]), entry["maps"]
    assert restored is graph and not any(e["log"]["acted"] for e in log)
