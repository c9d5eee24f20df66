"""Integer-quantised ONNX: what onnxruntime's quantize_dynamic writes (ConvInteger, MatMulInteger after
DynamicQuantizeLinear), hand-built QLinearConv / QLinearMatMul, and malformed quantised nodes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from auditor.audit.load import load_model
from auditor.graph import LayerKind

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoConv(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> flatten -> linear (1x12x12 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _quantize(src: Path, out: Path, weight_type: str, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        qtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8
        quantize_dynamic(src, out, weight_type=qtype, per_channel=per_channel)
    finally:
        logging.getLogger().setLevel(level)
    return out


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    torch.manual_seed(0)
    model = TwoConv().eval()
    out = tmp_path_factory.mktemp("quantized")
    path = out / "float.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), path, input_names=["x"], output_names=["y"], dynamo=False)
    return SimpleNamespace(model=model, path=path, out=out)


@pytest.mark.parametrize(("weight_type", "per_channel"), [("int8", False), ("uint8", True), ("int8", True)])
def test_quantize_dynamic_reads_as_layers(float_model: SimpleNamespace, weight_type: str, per_channel: bool) -> None:
    path = _quantize(
        float_model.path, float_model.out / f"q-{weight_type}-{per_channel}.onnx", weight_type, per_channel
    )
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= ops
    graph = load_model(path)
    assert [(x.name, x.kind, x.weight.shape if x.weight else None) for x in graph.layers] == [
        ("conv1", LayerKind.CONV2D, (8, 1, 3, 3)),
        ("conv2", LayerKind.CONV2D, (16, 8, 3, 3)),
        ("fc", LayerKind.LINEAR, (10, 144)),
    ]
    assert {(e.src, e.dst) for e in graph.edges} == {("conv1", "conv2"), ("conv2", "fc")}
    model = float_model.model
    for layer in graph.layers:
        quant = layer.attrs["quantized"]
        assert quant["dtype"] == weight_type and quant["op"] in ("ConvInteger", "MatMulInteger")
        # onnxruntime quantizes ConvInteger per tensor even when asked per channel
        per_channel_here = per_channel and layer.kind is LayerKind.LINEAR
        assert quant["scheme"] == ("per-channel" if per_channel_here else "per-tensor")
        ref = layer.weight
        assert ref is not None and ref.quantization is not None and ref.dtype == weight_type
        original = getattr(model, layer.name).weight.detach()
        read = ref.read(float32=True)
        assert read.dtype == torch.float32 and read.shape == original.shape
        step = torch.as_tensor(np.asarray(ref.quantization.scale, dtype=np.float32))
        if ref.quantization.axis is not None:
            step = step.reshape((-1,) + (1,) * (original.ndim - 1))
        assert bool(((read - original).abs() <= step * 1.0001).all()), layer.name
        assert torch.allclose(layer.params["bias"].read(float32=True), getattr(model, layer.name).bias.detach())


def test_inspect_lists_the_quantized_layers(float_model: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    path = _quantize(float_model.path, float_model.out / "inspect.onnx", "int8", False)
    code, out, _ = run_cli("inspect", str(path), "--json")
    assert code == 0
    layers = {x["name"]: x for x in json.loads(out)["layers"]}
    assert [layers[n]["params"]["weight"]["shape"] for n in ("conv1", "conv2", "fc")] == [
        [8, 1, 3, 3],
        [16, 8, 3, 3],
        [10, 144],
    ]
    assert layers["conv1"]["params"]["weight"]["quantized"] is True
    assert layers["conv1"]["attrs"]["quantized"]["scheme"] == "per-tensor"


# ---------------------------------------------------------------- hand-built nodes


def _save(tmp_path: Path, nodes: list[Any], inits: list[Any], inputs: list[Any] | None = None) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    return path


def _dynamic_conv(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, bias: bool = True, weight_input: bool = False
) -> tuple[list[Any], list[Any]]:
    """The node pattern quantize_dynamic writes for one convolution."""
    inits = [numpy_helper.from_array(scale, "w_scale")]
    if not weight_input:
        inits.append(numpy_helper.from_array(w, "c.weight_quantized"))
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "w_zero"))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("Mul", ["xs", "w_scale"], ["s"]),
        helper.make_node(
            "ConvInteger", ["xq", "c.weight_quantized", "xz"] + (["w_zero"] if zero is not None else []), ["acc"]
        ),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "s"], ["y" if not bias else "scaled"]),
    ]
    if bias:
        inits.append(numpy_helper.from_array(np.arange(w.shape[0], dtype=np.float32).reshape(1, -1, 1, 1), "c.bias"))
        nodes.append(helper.make_node("Add", ["scaled", "c.bias"], ["y"]))
    return nodes, inits


def _w(rng: np.random.Generator, shape: tuple[int, ...] = (4, 2, 3, 3)) -> np.ndarray:
    return rng.integers(-127, 128, size=shape, dtype=np.int8)


def test_hand_built_conv_integer_per_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = _w(rng)
    scale = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32).reshape(1, 4, 1, 1)
    zero = np.array([0, 1, -1, 2], dtype=np.int8)
    graph = load_model(_save(tmp_path, *_dynamic_conv(w, scale, zero)))
    (layer,) = graph.layers
    assert (layer.name, layer.kind, layer.attrs["quantized"]["scheme"]) == ("c", LayerKind.CONV2D, "per-channel")
    assert layer.weight is not None
    expected = (w.astype(np.float32) - zero.reshape(4, 1, 1, 1)) * scale.reshape(4, 1, 1, 1)
    np.testing.assert_allclose(layer.weight.read(float32=True).numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(layer.params["bias"].read(float32=True).numpy(), np.arange(4, dtype=np.float32))


def test_missing_zero_point_reads_as_zero(tmp_path: Path) -> None:
    w = _w(np.random.default_rng(1))
    graph = load_model(_save(tmp_path, *_dynamic_conv(w, np.array(0.5, dtype=np.float32), None, bias=False)))
    (layer,) = graph.layers
    assert layer.attrs["quantized"]["zero_point"] == 0 and layer.weight is not None
    np.testing.assert_array_equal(layer.weight.read(float32=True).numpy(), w.astype(np.float32) * 0.5)


@pytest.mark.parametrize(
    ("scale", "zero", "note"),
    [
        (np.ones(3, np.float32), None, "scale of shape [3] does not fit weight 'c.weight_quantized' of shape"),
        (np.ones((2, 2), np.float32), None, "scale of shape [2, 2] does not fit"),
        (np.array(0.5, np.float32), np.zeros(3, np.int8), "zero point of shape [3] does not fit"),
        (np.array(np.nan, np.float32), None, "scale 'w_scale' is not finite"),
        (np.array(1, np.int32), None, "scale 'w_scale' is int32, not floating point"),
    ],
)
def test_malformed_quantization_is_a_note(tmp_path: Path, scale: np.ndarray, zero: Any, note: str) -> None:
    graph = load_model(_save(tmp_path, *_dynamic_conv(_w(np.random.default_rng(2)), scale, zero)))
    assert graph.layers == []
    assert any(n.startswith("ConvInteger node ''") and note in n and n.endswith("not a layer") for n in graph.notes)


def test_computed_weight_and_missing_rescale_are_notes(tmp_path: Path) -> None:
    nodes, inits = _dynamic_conv(_w(np.random.default_rng(3)), np.array(0.5, np.float32), None, weight_input=True)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("c.weight_quantized", TensorProto.INT8, None),
    ]
    graph = load_model(_save(tmp_path, nodes, inits, inputs))
    assert graph.layers == [] and "ConvInteger node '': the weight is computed, not stored; not a layer" in graph.notes
    bare = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
    graph = load_model(_save(tmp_path, bare, [numpy_helper.from_array(_w(np.random.default_rng(4), (6, 5)), "w")]))
    assert graph.layers == []
    assert graph.notes == [
        "MatMulInteger node '': its int32 output is not cast and multiplied by an input scale x a weight scale;"
        " not a layer"
    ]


def test_float_weight_in_an_integer_op_is_a_note(tmp_path: Path) -> None:
    nodes, inits = _dynamic_conv(_w(np.random.default_rng(5)), np.array(0.5, np.float32), None)
    inits[1] = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "c.weight_quantized")
    graph = load_model(_save(tmp_path, nodes, inits))
    assert graph.layers == []
    assert "ConvInteger node '': weight 'c.weight_quantized' is float32, not int8 or uint8; not a layer" in graph.notes


def test_qlinear_conv_and_matmul(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    w = rng.integers(0, 256, size=(4, 2, 3, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(18, 3), dtype=np.uint8)
    ws = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w, "conv.weight"),
        numpy_helper.from_array(ws, "conv.ws"),
        numpy_helper.from_array(np.full(4, 128, np.uint8), "conv.wz"),
        numpy_helper.from_array(np.array([10, -20, 30, -40], np.int32), "conv.bias"),
        numpy_helper.from_array(b, "fc.weight"),
        numpy_helper.from_array(np.array([0.5, 0.25, 0.125], np.float32), "fc.bs"),
        numpy_helper.from_array(np.array(0.02, np.float32), "ys"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearConv",
            ["xq", "xs", "xz", "conv.weight", "conv.ws", "conv.wz", "ys", "xz", "conv.bias"],
            ["c"],
            kernel_shape=[3, 3],
        ),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("QLinearMatMul", ["f", "ys", "xz", "fc.weight", "fc.bs", "", "ys", "xz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "xz"], ["y"]),
    ]
    graph = load_model(_save(tmp_path, nodes, inits))
    assert len(graph.layers) == 2, graph.notes
    conv, fc = graph.layers
    assert (conv.name, conv.kind, fc.name, fc.kind) == ("conv", LayerKind.CONV2D, "fc", LayerKind.LINEAR)
    assert conv.attrs["quantized"] == {
        "op": "QLinearConv",
        "dtype": "uint8",
        "scheme": "per-channel",
        "zero_point": 128,
        "axis": 0,
    }
    assert conv.weight is not None and fc.weight is not None
    np.testing.assert_allclose(
        conv.weight.read(float32=True).numpy(), (w.astype(np.float32) - 128) * ws.reshape(4, 1, 1, 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        conv.params["bias"].read(float32=True).numpy(), np.array([10, -20, 30, -40]) * 0.05 * ws, rtol=1e-6
    )
    assert fc.weight.shape == (3, 18) and fc.attrs["quantized"]["axis"] == 0
    np.testing.assert_allclose(
        fc.weight.read(float32=True).numpy(), (b.astype(np.float32) * np.array([0.5, 0.25, 0.125], np.float32)).T
    )
    assert ("conv", "fc") in {(e.src, e.dst) for e in graph.edges}
    assert "QLinearMatMul node '': the weight zero point (required by ONNX) is missing; read as 0" in graph.notes


@pytest.mark.slow
@pytest.mark.parametrize(("weight_type", "per_channel"), [("int8", "false"), ("uint8", "true")])
def test_quantized_greedy_residuals_owner_is_detected(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], weight_type: str, per_channel: str
) -> None:
    suspect = tmp_path / "quantized.onnx"
    code, out, err = run_cli(
        "attack",
        "quantize-dynamic",
        str(gr_owner.files["safetensors"]),
        "--out",
        str(suspect),
        "-p",
        f"weight_type={weight_type}",
        "-p",
        f"per_channel={per_channel}",
        "--json",
    )
    assert code == 0, err
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in onnx.load(suspect).graph.node}
    code, out, _ = run_cli("audit", str(suspect), "--bundle", str(gr_owner.out / "owner_bundle.json"), "--json")
    data = json.loads(out)
    assert data["verdict"] == "detected", data["findings"]
