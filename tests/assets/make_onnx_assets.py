"""Regenerate the hand-built ONNX assets (``onnx_*``) deterministically: ``python tests/assets/make_onnx_assets.py``.

Every asset is built with ``onnx.helper`` from seeded numpy values, so the
bytes only change when onnx's serialisation does. They stay tiny (< 50 KB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = [helper.make_opsetid("", 17)]


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="make_onnx_assets", producer_version="1")
    model.ir_version = 8
    return model


def tiny() -> onnx.ModelProto:
    """Conv(4x3x3x3) -> Relu -> Flatten -> Gemm(5x64): the smallest model with an edge."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.bias")
    fw = numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "fc.weight")
    fb = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc.bias")
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [w, b, fw, fb],
    )
    return _model(graph)


def quantized(per_axis: bool) -> onnx.ModelProto:
    """int8 weight -> DequantizeLinear -> Conv, per-tensor or per output channel (axis 0)."""
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, size=(4, 3, 3, 3), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, size=4 if per_axis else ()).astype(np.float32)
    zero = rng.integers(-5, 5, size=4 if per_axis else (), dtype=np.int8)
    inits = [
        numpy_helper.from_array(q, "qconv.weight_quantized"),
        numpy_helper.from_array(scale, "qconv.weight_scale"),
        numpy_helper.from_array(zero, "qconv.weight_zero_point"),
    ]
    dq = helper.make_node(
        "DequantizeLinear",
        ["qconv.weight_quantized", "qconv.weight_scale", "qconv.weight_zero_point"],
        ["w"],
        name="dq",
        axis=0,
    )
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="qconv")
    graph = helper.make_graph(
        [dq, conv],
        "quantized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        inits,
    )
    return _model(graph)


def if_branch() -> onnx.ModelProto:
    """An If whose then-branch holds its own conv weight initializer."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "branch_conv.weight")
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "branch_conv.weight"], ["t"], name="branch_conv")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [w],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="passthrough")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node],
        "if_branch",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return _model(graph)


def main() -> None:
    """Write every asset next to this script."""
    onnx.save_model(tiny(), HERE / "onnx_tiny.onnx")
    onnx.save_model(quantized(False), HERE / "onnx_quant_tensor.onnx")
    onnx.save_model(quantized(True), HERE / "onnx_quant_axis.onnx")
    onnx.save_model(if_branch(), HERE / "onnx_if_branch.onnx")
    data = (HERE / "onnx_tiny.onnx").read_bytes()
    (HERE / "onnx_truncated.onnx").write_bytes(data[: len(data) // 2])
    (HERE / "onnx_external.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
    # External data: the model names onnx_external.bin, which lies next to it.
    onnx.save_model(
        tiny(),
        HERE / "onnx_external.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="onnx_external.bin",
        size_threshold=0,
    )


if __name__ == "__main__":
    main()
