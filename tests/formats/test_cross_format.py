"""One network saved five ways loads into graphs whose layers correspond one to one.

The network has a convolution with batch-norm, a residual add, an LSTM and a
linear layer. Saved as a PyTorch state dict, TorchScript, ONNX (the default
dynamo exporter and the legacy one, each with and without constant folding)
and safetensors, every graph must hold the same layers with the same weights,
except where the ONNX exporter folded batch-norm into the convolution: there
the folded weights must equal the original ones scaled per output channel by
gamma / sqrt(var + eps), which is exactly what the restore stage undoes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from auditor.audit.load import load_model
from auditor.graph import LayerGraph, LayerKind

WEIGHTED = (LayerKind.CONV2D, LayerKind.LINEAR, LayerKind.LSTM)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.lstm = nn.LSTM(6 * 8, 12, batch_first=True)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))  # residual add
        out, _ = self.lstm(h.permute(0, 2, 1, 3).flatten(2))  # image rows as a sequence
        return self.fc(out[:, -1])


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(1)
    model = Net()
    with torch.no_grad():  # non-trivial statistics so that folding visibly changes the weights
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def files(net: Net, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("forms")
    example = torch.randn(1, 1, 8, 8)
    paths = {
        "state_dict": out / "net.pt",
        "torchscript": out / "net.ts",
        "safetensors": out / "net.safetensors",
        "onnx_dynamo_folded": out / "dyn_fold.onnx",
        "onnx_dynamo_unfolded": out / "dyn_nofold.onnx",
        "onnx_legacy_folded": out / "leg_fold.onnx",
        "onnx_legacy_unfolded": out / "leg_nofold.onnx",
    }
    torch.save(net.state_dict(), paths["state_dict"])
    torch.jit.trace(net, example).save(str(paths["torchscript"]))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths["safetensors"]))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for dynamo in (True, False):
            for fold in (True, False):
                key = f"onnx_{'dynamo' if dynamo else 'legacy'}_{'folded' if fold else 'unfolded'}"
                # The dynamo exporter folds in its optimizer pass; the legacy one in do_constant_folding.
                options = {"optimize": fold} if dynamo else {}
                torch.onnx.export(net, (example,), str(paths[key]), dynamo=dynamo, do_constant_folding=fold, **options)
    return paths


def weighted(graph: LayerGraph) -> list:
    return [layer for layer in graph.layers if layer.kind in WEIGHTED]


def folded(net: Net) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each conv's weight and bias after folding its batch-norm in."""
    result = {}
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        c, b = getattr(net, conv), getattr(net, bn)
        scale = b.weight / torch.sqrt(b.running_var + b.eps)
        result[conv] = (
            (c.weight * scale[:, None, None, None]).detach(),
            (b.bias - b.running_mean * scale).detach(),
        )
    return result


def test_every_form_loads_in_its_own_format(files: dict[str, Path]) -> None:
    formats = {key: load_model(path).format for key, path in files.items()}
    assert formats == {
        "state_dict": "pytorch",
        "torchscript": "pytorch",
        "safetensors": "safetensors",
        "onnx_dynamo_folded": "onnx",
        "onnx_dynamo_unfolded": "onnx",
        "onnx_legacy_folded": "onnx",
        "onnx_legacy_unfolded": "onnx",
    }


@pytest.mark.parametrize("key", ["state_dict", "torchscript", "safetensors"])
def test_named_forms_equal_the_state_dict(net: Net, files: dict[str, Path], key: str) -> None:
    graph = load_model(files[key])
    state = net.state_dict()
    read = {f"{layer.name}.{role}": ref.read() for layer in graph.layers for role, ref in layer.params.items()}
    assert set(read) == set(state)
    for name, value in state.items():
        assert torch.equal(read[name], value), name
    kinds = {layer.name: layer.kind for layer in graph.layers}
    assert kinds == {
        "conv1": LayerKind.CONV2D,
        "bn1": LayerKind.BATCH_NORM,
        "conv2": LayerKind.CONV2D,
        "bn2": LayerKind.BATCH_NORM,
        "lstm": LayerKind.LSTM,
        "fc": LayerKind.LINEAR,
    }


@pytest.mark.parametrize("key", ["onnx_dynamo_unfolded", "onnx_legacy_unfolded"])
def test_unfolded_onnx_keeps_every_layer_and_weight(net: Net, files: dict[str, Path], key: str) -> None:
    graph = load_model(files[key])
    layers = [layer for layer in graph.layers if layer.kind is not LayerKind.OTHER]
    assert [layer.kind for layer in layers] == [
        LayerKind.CONV2D,
        LayerKind.BATCH_NORM,
        LayerKind.CONV2D,
        LayerKind.BATCH_NORM,
        LayerKind.LSTM,
        LayerKind.LINEAR,
    ]
    modules = ["conv1", "bn1", "conv2", "bn2", "lstm", "fc"]
    for layer, module_name in zip(layers, modules, strict=True):
        module = getattr(net, module_name)
        for role, ref in layer.params.items():
            expected = getattr(module, role)
            assert torch.equal(ref.read(float32=True), expected.detach()), (key, module_name, role)


@pytest.mark.parametrize("key", ["onnx_dynamo_folded", "onnx_legacy_folded"])
def test_folded_onnx_equals_scaled_conv_weights(net: Net, files: dict[str, Path], key: str) -> None:
    graph = load_model(files[key])
    assert not graph.of_kind(LayerKind.BATCH_NORM), "batch-norm was expected to be folded away"
    layers = weighted(graph)
    assert [layer.kind for layer in layers] == [LayerKind.CONV2D, LayerKind.CONV2D, LayerKind.LSTM, LayerKind.LINEAR]
    expected = folded(net)
    for layer, conv in zip(layers[:2], ("conv1", "conv2"), strict=True):
        weight, bias = expected[conv]
        assert torch.allclose(layer.params["weight"].read(), weight, atol=1e-6), (key, conv)
        assert torch.allclose(layer.params["bias"].read(), bias, atol=1e-6), (key, conv)
        original = getattr(net, conv).weight.detach()
        assert not torch.allclose(layer.params["weight"].read(), original, atol=1e-3), "folding changed nothing?"
    lstm, fc = layers[2], layers[3]
    for role in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert torch.equal(lstm.params[role].read(), getattr(net.lstm, role).detach()), role
    assert torch.equal(fc.params["weight"].read(), net.fc.weight.detach())
    assert torch.equal(fc.params["bias"].read(), net.fc.bias.detach())


def test_dynamo_keeps_the_conv_name_on_folded_values(files: dict[str, Path]) -> None:
    """A name match proves nothing about the values (docs/design/restore.md)."""
    dynamo = [layer.name for layer in weighted(load_model(files["onnx_dynamo_folded"]))]
    legacy = [layer.params["weight"].name for layer in weighted(load_model(files["onnx_legacy_folded"]))[:2]]
    assert dynamo[:2] == ["conv1", "conv2"]
    assert all(name.startswith("onnx::Conv_") for name in legacy), legacy


@pytest.mark.parametrize(
    "key", ["onnx_dynamo_unfolded", "onnx_legacy_unfolded", "onnx_dynamo_folded", "onnx_legacy_folded"]
)
def test_onnx_edges_follow_the_residual_add(files: dict[str, Path], key: str) -> None:
    graph = load_model(files[key])
    names = [layer.name for layer in weighted(graph)]
    conv1, conv2, lstm, fc = names
    feeds = {(e.src, e.dst) for e in graph.edges}
    first = "bn1" if "bn1" in graph else conv1
    second = "bn2" if "bn2" in graph else conv2
    assert (first, conv2) in feeds
    # Both branches of the residual add reach the LSTM: the skip path (first) and conv2's path (second).
    assert (first, lstm) in feeds and (second, lstm) in feeds
    assert (lstm, fc) in feeds
    add_edge = next(e for e in graph.edges if e.src == first and e.dst == lstm)
    assert "Add" in add_edge.via
