"""The ONNX loader: torch.onnx exports (both exporters, with and without constant folding),
hand-built quantized, external-data and If models, and hostile files."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from auditor.audit.load import detect_format, load_model
from auditor.errors import InputError, UnsafeInputError
from auditor.formats import onnx as onnx_format
from auditor.graph import EdgeSource, LayerKind

ASSETS = Path(__file__).resolve().parents[1] / "assets"


# ---------------------------------------------------------------- models and export


class CNN(nn.Module):
    """conv+bn -> relu -> conv+bn -> relu, residual add, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.c1(x)))
        z = torch.relu(self.bn2(self.c2(y))) + y
        return self.fc(torch.flatten(z, 1))


class Recurrent(nn.Module):
    def __init__(self, cls: type[nn.Module], **kwargs: object) -> None:
        super().__init__()
        self.rnn = cls(4, 3, batch_first=True, **kwargs)
        self.fc = nn.Linear(3 * (2 if kwargs.get("bidirectional") else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


class Branches(nn.Module):
    """Two conv branches concatenated on channels, then a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 3, padding=1)
        self.dw = nn.Conv2d(9, 9, 3, groups=9, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(torch.cat([self.a(x), torch.relu(self.b(x))], 1))


class Tokens(nn.Module):
    """Embedding, layer norm, and linear layers on a 3-D input (exported as MatMul + Add)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln = nn.Embedding(10, 8), nn.LayerNorm(8)
        self.fc, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc(self.ln(self.emb(x)))))


def _random_bn(model: nn.Module) -> nn.Module:
    # Random statistics: default ones (1, 0) would be deduplicated by the exporter, and would make folding invisible.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 2.0)
                module.weight[0] = -module.weight[0]  # a negative gamma: folding flips that channel's sign
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


EXPORTS = {
    "legacy": {"dynamo": False},
    "legacy-nofold": {"dynamo": False, "do_constant_folding": False},
    "dynamo": {"dynamo": True},
    "dynamo-nofold": {"dynamo": True, "do_constant_folding": False},
}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``export(model, example, how)``: the path of an ONNX export, cached per (model, how)."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("exports")

    def run(key: str, model: nn.Module, example: torch.Tensor, how: str) -> Path:
        if (key, how) not in cache:
            path = folder / f"{key}-{how}.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), **EXPORTS[how])  # type: ignore[arg-type]
            cache[key, how] = path
        return cache[key, how]

    return run


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return _random_bn(CNN())


def _edges(graph) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {(e.src, e.dst) for e in graph.edges}


# ---------------------------------------------------------------- CNN: batch-norm kept and folded


def test_default_exporter_is_dynamo(export, cnn) -> None:  # type: ignore[no-untyped-def]
    """torch 2.13's default ``torch.onnx.export`` is the dynamo exporter: ir_version 10, version with +cpu."""
    path = export("cnn", cnn, torch.randn(1, 3, 4, 4), "dynamo")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(cnn, (torch.randn(1, 3, 4, 4),), str(path.with_name("default.onnx")))
    default = onnx_format.load(path.with_name("default.onnx"))
    dynamo = onnx_format.load(path)
    assert default.metadata["ir_version"] == dynamo.metadata["ir_version"]
    assert [layer.name for layer in default] == [layer.name for layer in dynamo] == ["c1", "c2", "fc"]


def test_cnn_without_folding_keeps_batch_norm(export, cnn) -> None:  # type: ignore[no-untyped-def]
    graph = onnx_format.load(export("cnn", cnn, torch.randn(1, 3, 4, 4), "legacy-nofold"))
    assert graph.format == "onnx" and graph.edge_source is EdgeSource.GRAPH
    assert [(layer.name, layer.kind) for layer in graph] == [
        ("c1", LayerKind.CONV2D),
        ("bn1", LayerKind.BATCH_NORM),
        ("c2", LayerKind.CONV2D),
        ("bn2", LayerKind.BATCH_NORM),
        ("fc", LayerKind.LINEAR),
    ]
    for name in ("c1", "c2", "fc"):
        module = getattr(cnn, name)
        assert torch.equal(graph.layer(name).params["weight"].read(), module.weight.detach())
        assert torch.equal(graph.layer(name).params["bias"].read(), module.bias.detach())
    bn = graph.layer("bn2")
    for role, tensor in (
        ("weight", cnn.bn2.weight),
        ("bias", cnn.bn2.bias),
        ("running_mean", cnn.bn2.running_mean),
        ("running_var", cnn.bn2.running_var),
    ):
        assert torch.equal(bn.params[role].read(), tensor.detach())
    assert bn.attrs["eps"] == pytest.approx(1e-5)
    assert graph.layer("c1").attrs == {
        "groups": 1,
        "stride": [1, 1],
        "dilation": [1, 1],
        "kernel_size": [3, 3],
        "padding": [1, 1],
    }
    by_pair = {(e.src, e.dst): e for e in graph.edges}
    assert by_pair["c1", "bn1"].via == () and by_pair["c1", "bn1"].offset == 0
    assert by_pair["bn1", "c2"].via == ("Relu",)
    assert by_pair["c2", "bn2"].via == ()
    # Both sides of the residual add reach the linear layer through the flatten.
    assert by_pair["bn2", "fc"].via == ("Relu", "Add", "Flatten")
    assert by_pair["bn1", "fc"].via == ("Relu", "Add", "Flatten")
    assert len(graph.edges) == 5
    assert graph.metadata["producer_name"] == "pytorch" and graph.metadata["opset_imports"]["ai.onnx"] >= 17


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """What batch-norm folding does to a conv: out channel o scaled by gamma_o / sqrt(var_o + eps), bias shifted.

    This is the transformation a later restore stage has to undo (docs/design/restore.md).
    """
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    weight = conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
    bias = (conv.bias.detach() - bn.running_mean) * factor + bn.bias.detach()
    return weight, bias


@pytest.mark.parametrize("how", ["legacy", "dynamo", "dynamo-nofold"])
def test_cnn_batch_norm_folded_into_conv(export, cnn, how) -> None:  # type: ignore[no-untyped-def]
    """In eval mode, folding removes the batch-norm layers; the conv weights are rescaled per output channel."""
    graph = onnx_format.load(export("cnn", cnn, torch.randn(1, 3, 4, 4), how))
    assert [layer.kind for layer in graph] == [LayerKind.CONV2D, LayerKind.CONV2D, LayerKind.LINEAR]
    c1, c2, fc = graph.layers
    if how == "legacy":
        # The legacy exporter renames folded weights (onnx::Conv_N): the layer takes the node's name.
        assert (c1.name, c2.name) == ("/c1/Conv", "/c2/Conv")
        assert c1.params["weight"].name.startswith("onnx::Conv_")
    else:
        # The dynamo exporter keeps the original names on the folded values: a name match proves nothing.
        assert (c1.name, c2.name) == ("c1", "c2")
        assert c1.params["weight"].name == "c1.weight"
    assert fc.name == "fc"
    for layer, conv, bn in ((c1, cnn.c1, cnn.bn1), (c2, cnn.c2, cnn.bn2)):
        weight, bias = _folded(conv, bn)
        torch.testing.assert_close(layer.params["weight"].read(), weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.params["bias"].read(), bias, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer.params["weight"].read(), conv.weight.detach())
    assert torch.equal(fc.params["weight"].read(), cnn.fc.weight.detach())
    by_pair = {(e.src, e.dst): e for e in graph.edges}
    assert by_pair[c1.name, c2.name].via == ("Relu",)
    flatten = "Flatten" if how == "legacy" else "Reshape"
    assert by_pair[c2.name, "fc"].via == ("Relu", "Add", flatten)
    assert by_pair[c1.name, "fc"].via == ("Relu", "Add", flatten)


# ---------------------------------------------------------------- recurrent layers


def _torch_rnn_params(rnn: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """PyTorch layer ``k``'s tensors under the names auditor gives each ONNX node's layer (``*_l0``)."""
    return {
        name.replace(f"_l{k}", "_l0"): tensor.detach() for name, tensor in rnn.named_parameters() if f"_l{k}" in name
    }


@pytest.mark.parametrize("how", ["legacy", "legacy-nofold", "dynamo"])
def test_two_layer_bidirectional_lstm(export, how) -> None:  # type: ignore[no-untyped-def]
    """nn.LSTM(num_layers=2) exports as two LSTM nodes: two auditor layers, the k-th holding torch's *_l{k}."""
    torch.manual_seed(1)
    model = Recurrent(nn.LSTM, num_layers=2, bidirectional=True).eval()
    graph = onnx_format.load(export("lstm", model, torch.randn(2, 5, 4), how))
    lstms = graph.of_kind(LayerKind.LSTM)
    assert len(lstms) == 2
    for k, layer in enumerate(lstms):
        expected = _torch_rnn_params(model.rnn, k)
        assert sorted(layer.params) == sorted(expected)
        for role, tensor in expected.items():
            assert torch.equal(layer.params[role].read(), tensor), (k, role)
        assert layer.attrs["hidden_size"] == 3 and layer.attrs["bidirectional"] is True
        assert layer.attrs["num_layers"] == 1
        assert layer.out_channels == 6
    assert lstms[0].in_channels == 4 and lstms[1].in_channels == 6
    assert (lstms[0].name, lstms[1].name) in _edges(graph)
    assert (lstms[1].name, "fc") in _edges(graph)
    if how == "legacy-nofold":
        assert [layer.name for layer in lstms] == ["rnn", "rnn_1"]


@pytest.mark.parametrize("how", ["legacy", "legacy-nofold", "dynamo"])
def test_gru_gate_order(export, how) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = Recurrent(nn.GRU).eval()
    graph = onnx_format.load(export("gru", model, torch.randn(2, 5, 4), how))
    (gru,) = graph.of_kind(LayerKind.GRU)
    expected = _torch_rnn_params(model.rnn, 0)
    assert sorted(gru.params) == sorted(expected)
    for role, tensor in expected.items():
        assert torch.equal(gru.params[role].read(), tensor), role
    assert gru.attrs["linear_before_reset"] == 1 and gru.attrs["bidirectional"] is False
    assert (gru.name, "fc") in _edges(graph)


# ---------------------------------------------------------------- linear, embedding, concat, groups


@pytest.mark.parametrize("how", ["legacy", "dynamo"])
def test_matmul_add_is_linear_with_bias(export, how) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    model = Tokens().eval()
    graph = onnx_format.load(export("tokens", model, torch.tensor([[1, 2, 3]]), how))
    kinds = [layer.kind for layer in graph]
    assert kinds == [LayerKind.EMBEDDING, LayerKind.LAYER_NORM, LayerKind.LINEAR, LayerKind.LINEAR]
    emb, ln, fc, fc2 = graph.layers
    assert (emb.name, ln.name, fc.name) == ("emb", "ln", "fc")
    assert torch.equal(emb.params["weight"].read(), model.emb.weight.detach())
    assert torch.equal(ln.params["weight"].read(), model.ln.weight.detach())
    assert torch.equal(fc.params["weight"].read(), model.fc.weight.detach())  # (out, in), transposed on read
    assert torch.equal(fc.params["bias"].read(), model.fc.bias.detach())  # the Add after the MatMul
    assert torch.equal(fc2.params["weight"].read(), model.fc2.weight.detach())
    assert "bias" not in fc2.params
    assert _edges(graph) == {("emb", "ln"), ("ln", "fc"), ("fc", fc2.name)}


@pytest.mark.parametrize("how", ["legacy", "dynamo"])
def test_concat_offsets_and_depthwise(export, how) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(4)
    model = Branches().eval()
    graph = onnx_format.load(export("branches", model, torch.randn(1, 3, 4, 4), how))
    assert [layer.name for layer in graph] == ["a", "b", "dw"]
    dw = graph.layer("dw")
    assert dw.attrs["groups"] == 9 and dw.in_channels == 9
    assert torch.equal(dw.params["weight"].read(), model.dw.weight.detach())
    edges = {(e.src, e.dst): e for e in graph.edges}
    assert edges["a", "dw"].offset == 0 and edges["a", "dw"].via == ("Concat",)
    assert edges["b", "dw"].offset == 4 and edges["b", "dw"].via == ("Relu", "Concat")


def _save(tmp_path: Path, nodes, inits, name="m.onnx", inputs=None, outputs=None) -> Path:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        outputs if outputs is not None else [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save_model(model, path)
    return path


def test_gemm_trans_b_zero_alpha_beta(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    b = rng.standard_normal((6, 4)).astype(np.float32)  # (in, out) because transB=0
    c = rng.standard_normal(4).astype(np.float32)
    path = _save(
        tmp_path,
        [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="g", alpha=2.0, beta=0.5)],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(c, "C")],
    )
    (layer,) = onnx_format.load(path).layers
    assert layer.name == "g" and layer.kind is LayerKind.LINEAR
    assert layer.attrs == {"alpha": 2.0, "beta": 0.5, "transA": 0, "transB": 0}
    np.testing.assert_allclose(layer.params["weight"].read().numpy(), 2.0 * b.T)
    np.testing.assert_allclose(layer.params["bias"].read().numpy(), 0.5 * c)
    assert (layer.in_channels, layer.out_channels) == (6, 4)


def test_typed_fields_fp16_and_int8(tmp_path: Path) -> None:
    """Values stored in int32_data (fp16 bit patterns, int8) instead of raw_data are read per the ONNX spec."""
    w16 = np.arange(24, dtype=np.float16).reshape(2, 3, 4) / 8
    fp16 = TensorProto(name="w.weight", data_type=TensorProto.FLOAT16, dims=[2, 3, 4])
    fp16.int32_data.extend(w16.view(np.uint16).astype(np.int32).ravel().tolist())  # bit patterns, as the spec says
    i8 = helper.make_tensor("e.weight", TensorProto.INT8, [3, 2], [-128, -1, 0, 1, 5, 127])
    nodes = [
        helper.make_node("Conv", ["x", "w.weight"], ["c"], name="conv"),
        helper.make_node("Gather", ["e.weight", "idx"], ["y"], name="gather"),
    ]
    path = _save(tmp_path, nodes, [fp16, i8])
    graph = onnx_format.load(path)
    w = graph.layer("w").params["weight"]
    assert w.dtype == "float16" and torch.equal(w.read(), torch.from_numpy(w16))
    assert graph.layer("w").kind is LayerKind.CONV1D
    e = graph.layer("e").params["weight"].read()
    assert e.dtype == torch.int8 and e.flatten().tolist() == [-128, -1, 0, 1, 5, 127]


# ---------------------------------------------------------------- quantized weights


@pytest.mark.parametrize("asset", ["onnx_quant_tensor.onnx", "onnx_quant_axis.onnx"])
def test_dequantize_linear_weights(asset: str) -> None:
    model = onnx.load(ASSETS / asset)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale, zero = (inits[f"qconv.weight_{k}"] for k in ("quantized", "scale", "zero_point"))
    (layer,) = onnx_format.load(ASSETS / asset).layers
    weight = layer.params["weight"]
    assert layer.name == "qconv" and weight.dtype == "int8" and weight.quantization is not None
    assert torch.equal(weight.read(), torch.from_numpy(q.copy()))
    per = (slice(None), None, None, None) if scale.ndim else ()
    expected = (q.astype(np.float32) - zero[per].astype(np.float32)) * scale[per]
    np.testing.assert_allclose(weight.read(float32=True).numpy(), expected, rtol=1e-6)
    assert weight.quantization.axis == (0 if scale.ndim else None)


def test_per_axis_quantization_follows_the_transpose(tmp_path: Path) -> None:
    """MatMul weight (in, out) quantized per output column (axis 1): canonical (out, in) has the scale on axis 0."""
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, size=(6, 4), dtype=np.uint8)
    scale = rng.uniform(0.01, 0.1, size=4).astype(np.float32)
    zero = rng.integers(100, 150, size=4, dtype=np.uint8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    path = _save(tmp_path, nodes, [numpy_helper.from_array(a, n) for a, n in ((q, "q"), (scale, "s"), (zero, "z"))])
    (layer,) = onnx_format.load(path).layers
    weight = layer.params["weight"]
    assert weight.shape == (4, 6) and weight.dtype == "uint8" and weight.quantization.axis == 0
    assert torch.equal(weight.read(), torch.from_numpy(q.T.copy()))
    expected = ((q.astype(np.float32) - zero.astype(np.float32)) * scale).T
    np.testing.assert_allclose(weight.read(float32=True).numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------- subgraphs


def test_initializer_inside_if_branch_is_found() -> None:
    graph = onnx_format.load(ASSETS / "onnx_if_branch.onnx")
    (layer,) = graph.layers
    assert layer.name == "branch_conv" and layer.kind is LayerKind.CONV2D and layer.source == "branch_conv"
    assert layer.attrs["subgraph"] == "If node 'choose' attribute then_branch of main graph"
    model = onnx.load(ASSETS / "onnx_if_branch.onnx")
    then = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    expected = numpy_helper.to_array(then.initializer[0])
    assert np.array_equal(layer.params["weight"].read().numpy(), expected)
    assert graph.metadata["subgraphs"] == 2


# ---------------------------------------------------------------- external data


def _external_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("onnx_external.onnx", "onnx_external.bin"):
        shutil.copy(ASSETS / name, folder / name)
    return folder / "onnx_external.onnx"


def _retarget(path: Path, location: str, *, length_extra: int = 0) -> None:
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
            if entry.key == "length" and length_extra:
                entry.value = str(int(entry.value) + length_extra)
    path.write_bytes(model.SerializeToString())


def test_external_data_loads_and_reads_equal_values() -> None:
    graph = onnx_format.load(ASSETS / "onnx_external.onnx")
    inline = onnx_format.load(ASSETS / "onnx_tiny.onnx")
    assert graph.files == [ASSETS / "onnx_external.onnx", (ASSETS / "onnx_external.bin").resolve()]
    for a, b in zip(graph.layers, inline.layers, strict=True):
        assert a.name == b.name
        for role in a.params:
            assert torch.equal(a.params[role].read(), b.params[role].read())
    assert [(e.src, e.dst, e.via) for e in graph.edges] == [("conv", "fc", ("Relu", "Flatten"))]


def test_external_data_is_mapped_copy_on_write(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    before = (path.parent / "onnx_external.bin").read_bytes()
    weight = onnx_format.load(path).layer("conv").params["weight"].read()
    weight.mul_(0)  # a plugin scribbling on a tensor must never reach the file
    assert (path.parent / "onnx_external.bin").read_bytes() == before


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        (
            "../outside.bin",
            "external data of tensor 'conv.weight' points outside the model's folder ('../outside.bin')",
        ),
        (
            "/etc/passwd",
            "external data of tensor 'conv.weight' points to the absolute path '/etc/passwd'; "
            "only files inside the model's folder are read",
        ),
        ("link.bin", "external data of tensor 'conv.weight' 'link.bin' is a link that leaves the model's folder"),
    ],
)
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str, problem: str) -> None:
    path = _external_copy(tmp_path)
    (tmp_path / "outside.bin").write_bytes((path.parent / "onnx_external.bin").read_bytes())
    (path.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    _retarget(path, location)
    with pytest.raises(UnsafeInputError) as info:
        onnx_format.load(path)
    assert str(info.value) == f"{path}: {problem}"


def test_external_data_missing_or_too_short(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    _retarget(path, "absent.bin")
    with pytest.raises(InputError, match=r"external data of tensor 'conv.weight' 'absent.bin' does not exist next to"):
        onnx_format.load(path)
    _retarget(path, "onnx_external.bin")
    (path.parent / "onnx_external.bin").write_bytes((ASSETS / "onnx_external.bin").read_bytes()[:400])
    with pytest.raises(InputError) as info:
        onnx_format.load(path)
    assert type(info.value) is InputError
    assert str(info.value) == (
        f"{path}: external data of tensor 'conv.weight' needs bytes 0..432 "
        "but onnx_external.bin holds only 400 bytes (truncated?)"
    )


def test_external_data_length_disagreeing_with_shape(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    _retarget(path, "onnx_external.bin", length_extra=10**9)
    with pytest.raises(
        InputError, match=r"length 1000000432 at offset 0 does not match shape \[4, 3, 3, 3\] of float32"
    ):
        onnx_format.load(path)


def _stat(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


def test_cli_exit_codes_and_files_untouched(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    outside = _external_copy(tmp_path)
    _retarget(outside, "../onnx_external.bin")
    shutil.copy(ASSETS / "onnx_external.bin", tmp_path / "onnx_external.bin")
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    files = [outside, outside.parent / "onnx_external.bin", tmp_path / "onnx_external.bin", noise]
    before = [_stat(f) for f in files]
    unsafe = run_cli("inspect", str(outside))
    assert unsafe.code == 5
    assert unsafe.stderr == (
        f"error: {outside}: external data of tensor 'conv.weight' points outside the model's folder "
        "('../onnx_external.bin')\n"
    )
    broken = run_cli("inspect", str(noise))
    assert broken.code == 4 and broken.stderr.count("\n") == 1 and broken.stderr.startswith(f"error: {noise}: ")
    assert [_stat(f) for f in files] == before


# ---------------------------------------------------------------- sniffing


def test_sniff_accepts_onnx_and_refuses_other_formats(tmp_path: Path, export, cnn) -> None:  # type: ignore[no-untyped-def]
    def head_of(data: bytes) -> tuple[Path, bytes]:
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        return path, data[:64]

    for path in (
        ASSETS / "onnx_tiny.onnx",
        export("cnn", cnn, torch.randn(1, 3, 4, 4), "legacy"),
        export("cnn", cnn, torch.randn(1, 3, 4, 4), "dynamo"),
    ):
        assert onnx_format.sniff(path, path.read_bytes()[:64])
        assert detect_format(path).id == "onnx"
    safetensors_header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    samples = [
        len(safetensors_header).to_bytes(8, "little") + safetensors_header + b"\0" * 4,
        b"PK\x03\x04" + b"\0" * 60,  # zip (torch.save, TorchScript)
        b"\x80\x02}q\x00." + b"\0" * 20,  # pickle protocol 2
        b"\x80\x04\x95" + b"\0" * 30,  # pickle protocol 4
        b"",
    ]
    for data in samples:
        assert not onnx_format.sniff(*head_of(data)), data[:8]
    assert not onnx_format.sniff(tmp_path, b"")
    # Truncated ONNX is still recognised, so the user hears "truncated" rather than "unknown format".
    assert onnx_format.sniff(ASSETS / "onnx_truncated.onnx", (ASSETS / "onnx_truncated.onnx").read_bytes()[:64])


# ---------------------------------------------------------------- hostile files


def test_truncated_and_random_files() -> None:
    with pytest.raises(InputError) as info:
        load_model(ASSETS / "onnx_truncated.onnx")
    assert str(info.value) == (
        f"{ASSETS / 'onnx_truncated.onnx'}: not a valid ONNX model: the protobuf does not parse "
        "(truncated: field graph at byte 23 needs 2054 bytes, the file ends 1017 later)"
    )


def test_no_graph_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"\x08\x07")  # ir_version 7 and nothing else
    with pytest.raises(InputError, match="not an ONNX model: it has no ir_version or no graph"):
        onnx_format.load(path)


def test_over_two_gib_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.onnx"
    with path.open("wb") as fh:
        fh.write(b"\x08\x07")
        fh.truncate(onnx_format.MAX_PROTOBUF + 1)  # sparse: costs no disk
    with pytest.raises(InputError, match="over protobuf's 2 GiB limit"):
        onnx_format.load(path)


def test_absurd_dims_fail_before_allocation(tmp_path: Path) -> None:
    huge = TensorProto(name="w.weight", data_type=TensorProto.FLOAT, dims=[10**6, 10**6], raw_data=b"\0" * 16)
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "w.weight"], ["y"])], [huge])
    with pytest.raises(
        InputError, match=r"tensor 'w.weight': shape \[1000000, 1000000\] of float32 needs 4000000000000"
    ):
        onnx_format.load(path)
    negative = TensorProto(name="n", data_type=TensorProto.FLOAT, dims=[-1, 4])
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "n"], ["y"])], [negative])
    with pytest.raises(InputError, match=r"tensor 'n': negative dimension in \[-1, 4\]"):
        onnx_format.load(path)


def test_unsupported_dtype_is_skipped_with_a_note(tmp_path: Path) -> None:
    s = helper.make_tensor("s", TensorProto.STRING, [1], [b"hello"])
    path = _save(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [s])
    graph = onnx_format.load(path)
    assert graph.layers == [] and any("ONNX element type 8" in n for n in graph.notes)


def test_long_chain_is_traced_iteratively(tmp_path: Path) -> None:
    """100,000 Relu nodes between two convs: no recursion, one edge, well within the time budget."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "a.weight")
    v = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "b.weight")
    n = 100_000
    nodes = [helper.make_node("Conv", ["x", "a.weight"], ["t0"])]
    nodes += [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Conv", [f"t{n}", "b.weight"], ["y"]))
    graph = onnx_format.load(_save(tmp_path, nodes, [w, v]))
    (edge,) = graph.edges
    assert (edge.src, edge.dst, len(edge.via)) == ("a", "b", n)


def test_cycle_and_undefined_values_give_notes(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "a.weight")
    nodes = [
        helper.make_node("Relu", ["loop_b"], ["loop_a"]),
        helper.make_node("Relu", ["loop_a"], ["loop_b"]),
        helper.make_node("Conv", ["loop_b", "a.weight"], ["c"]),
        helper.make_node("Add", ["c", "nowhere"], ["y"]),
    ]
    graph = onnx_format.load(_save(tmp_path, nodes, [w]))
    assert [layer.name for layer in graph] == ["a"] and graph.edges == []
    assert any("on a cycle" in note for note in graph.notes)
    assert any("1 value(s) that nothing defines ('nowhere')" in note for note in graph.notes)


def test_out_of_order_nodes_are_reordered(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "a.weight")
    v = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "b.weight")
    nodes = [
        helper.make_node("Conv", ["r", "b.weight"], ["y"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["x", "a.weight"], ["c"]),
    ]
    graph = onnx_format.load(_save(tmp_path, nodes, [w, v]))
    assert [(e.src, e.dst, e.via) for e in graph.edges] == [("a", "b", ("Relu",))]
    assert any("not in topological order" in note for note in graph.notes)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or length-delimited (bytes) payload."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_deeply_nested_if_is_an_input_error(tmp_path: Path) -> None:
    """If nodes nested beyond protobuf's recursion limit (written byte by byte, since the protobuf
    runtime refuses to build them): an InputError, never RecursionError or DecodeError."""
    graph = _field(1, _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity"))  # GraphProto.node
    for _ in range(300):
        attribute = _field(1, b"then_branch") + _field(6, graph) + _field(20, 5)  # name, g, type GRAPH
        graph = _field(1, _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute))
    path = tmp_path / "deep.onnx"
    path.write_bytes(_field(1, 8) + _field(7, graph) + _field(8, _field(2, 17)))
    with pytest.raises(InputError) as info:
        onnx_format.load(path)
    assert type(info.value) is InputError and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: not a valid ONNX model: the protobuf does not parse")


def test_duplicate_names_are_made_unique(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "shared.weight")
    nodes = [
        helper.make_node("Conv", ["x", "shared.weight"], ["c"], name="first"),
        helper.make_node("Conv", ["c", "shared.weight"], ["y"], name="second"),
    ]
    graph = onnx_format.load(_save(tmp_path, nodes, [w]))
    assert [(layer.name, layer.source) for layer in graph] == [("shared", "first"), ("shared_1", "second")]
    assert _edges(graph) == {("shared", "shared_1")}
