"""Issue 14, defence in depth: an ONNX file's parse is bounded whatever it holds.

The protobuf runtime spends about 500 bytes per message it builds; before it runs, a walk of the
wire format (auditor/formats/_onnx_wire.py) counts what it would build and refuses a file over the
budget, or malformed, with one line and exit 4. The hostile files are written byte by byte, since
building them with the protobuf classes would cost what the budget prevents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.errors import EXIT_INPUT, InputError
from auditor.formats import _onnx_wire
from auditor.formats import onnx as onnx_format

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUDGET = "auditor's budget for one ONNX file"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or length-delimited (bytes) payload."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _model(graph: bytes) -> bytes:
    """A ModelProto: ir_version 8, ``graph`` (a GraphProto's bytes), opset 17."""
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 17))


def _refused(result: Any, path: Path, what: str) -> None:
    code, err = result.code, result.stderr
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert what in err, err


def test_five_million_empty_nodes_are_refused_before_parsing(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """Issue 14's file: 10 MB, 5,000,000 empty NodeProto entries (41 s and 2.6 GB to parse before)."""
    path = tmp_path / "many_nodes.onnx"
    path.write_bytes(_model(b"\x0a\x00" * 5_000_000))
    result = run_cli("inspect", path)
    _refused(result, path, f"the file holds more than {_onnx_wire.MAX_ENTRIES:,d} protobuf messages")
    assert BUDGET in result.stderr and "refused before parsing" in result.stderr


def test_a_node_with_a_million_attributes_is_refused(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Relu") + b"\x2a\x00" * 1_000_000  # attribute = 5
    path = tmp_path / "attributes.onnx"
    path.write_bytes(_model(_field(1, node)))
    _refused(run_cli("inspect", path), path, "protobuf messages and repeated names")


def test_a_million_input_names_are_refused(tmp_path: Path) -> None:
    """Repeated strings cost an object each too (and a Python str once auditor reads them)."""
    node = b"\x0a\x01a" * 1_000_001 + _field(2, b"y") + _field(4, b"Relu")  # NodeProto.input = 1
    path = tmp_path / "inputs.onnx"
    path.write_bytes(_model(_field(1, node)))
    with pytest.raises(InputError, match="repeated names"):
        onnx_format.load(path)


def test_ten_million_fields_are_refused(tmp_path: Path) -> None:
    """Scalar fields build nothing, but walking them is the walk's own cost: bounded too."""
    path = tmp_path / "fields.onnx"
    path.write_bytes(b"\x08\x08" * (_onnx_wire.MAX_FIELDS + 1))  # ir_version, again and again
    with pytest.raises(InputError, match=f"more than {_onnx_wire.MAX_FIELDS:,d} protobuf fields"):
        onnx_format.load(path)


def test_packed_integers_that_would_swell_in_memory_are_refused(tmp_path: Path) -> None:
    """A packed int64_data of one-byte varints: 1 byte of file is 8 bytes in the protobuf runtime, so they
    are counted from their bytes, not skipped by their length (a small budget shows it without 128 MB)."""
    values = b"\x01" * 5_000  # TensorProto.int64_data = 7, packed: 5,000 values of 1 byte each
    tensor = _field(1, 5_000) + _field(2, TensorProto.INT64) + _field(7, values) + _field(8, b"w")
    data = _model(_field(5, tensor))  # GraphProto.initializer = 5
    counts = _onnx_wire.walk(data, _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR), max_packed=5_000)
    assert counts.entries == 3  # the graph, the opset import and the tensor: the numbers are counted apart
    with pytest.raises(_onnx_wire.BudgetExceeded, match="more than 4,999 numbers in packed integer fields"):
        _onnx_wire.walk(data, _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR), max_packed=4_999)
    big = b"\x80\x01" * 2_500  # 2,500 two-byte varints: counted as 2,500, not 5,000
    tensor = _field(1, 2_500) + _field(2, TensorProto.INT64) + _field(7, big) + _field(8, b"w")
    _onnx_wire.walk(_model(_field(5, tensor)), _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR), max_packed=2_500)
    path = tmp_path / "packed.onnx"
    path.write_bytes(_model(_field(5, _field(1, 5_000) + _field(2, TensorProto.INT64) + _field(7, values))))
    assert onnx.load_model_from_string(path.read_bytes()).graph.initializer[0].int64_data[0] == 1  # well-formed


def _nested_ifs(levels: int) -> bytes:
    graph = _field(1, _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity"))
    for _ in range(levels):
        attribute = _field(1, b"then_branch") + _field(6, graph) + _field(20, 5)  # name, g, type GRAPH
        graph = _field(1, _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute))
    return _model(graph)


def test_subgraphs_nested_past_protobufs_limit_are_refused(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """33 If levels nest messages 101 deep (three levels per subgraph), one more than protobuf allows."""
    path = tmp_path / "deep.onnx"
    path.write_bytes(_nested_ifs(33))
    _refused(run_cli("inspect", path), path, f"messages nested more than {_onnx_wire.MAX_DEPTH} deep")


def test_subgraphs_nested_to_the_limit_load(tmp_path: Path) -> None:
    path = tmp_path / "deep.onnx"
    path.write_bytes(_nested_ifs(32))
    assert onnx_format.load(path).metadata["subgraphs"] == 32


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_field(1, 8) + _field(7, b"\x0a\x80"), "the varint at byte 5 runs past the end of its message (byte 6)"),
        (_field(1, 8) + b"\x3a" + b"\xff" * 11, "the varint at byte 3 runs over 10 bytes"),
        (
            _field(1, 8) + _field(7, _field(1, b"\x0a\x05ab")),
            "field NodeProto.input at byte 6 needs 5 bytes, the enclosing GraphProto.node ends 2 later",
        ),
        (_field(1, 8) + _field(7, b"\x0b\x0c"), "byte 4 starts a field of wire type 3, which ONNX never uses"),
        (_field(1, 8) + _field(7, b"\x02\x00"), "byte 4 starts a field numbered 0"),
        (_field(1, 8) + _field(7, b"\x1d\x00\x00"), "the fixed-size field at byte 4 runs past the end"),
    ],
    ids=["truncated varint", "long varint", "length past its message", "group", "field 0", "short fixed32"],
)
def test_malformed_wire_data_is_an_input_error(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        onnx_format.load(path)
    assert type(info.value) is InputError
    assert str(info.value).startswith(f"{path}: not a valid ONNX model: the protobuf does not parse ({problem}")


def test_a_model_of_a_few_thousand_nodes_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"c{i}.weight")
        for i in range(500)
    ]
    nodes = []
    for i in range(500):
        nodes.append(helper.make_node("Conv", [f"t{i}", f"c{i}.weight"], [f"r{i}"], name=f"conv{i}"))
        nodes += [helper.make_node("Relu", [f"r{i}"], [f"s{i}"]), helper.make_node("Sigmoid", [f"s{i}"], [f"m{i}"])]
        nodes.append(helper.make_node("Mul", [f"s{i}", f"m{i}"], [f"t{i + 1}" if i < 499 else "y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    counts = _onnx_wire.walk(path.read_bytes(), _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR))
    assert counts.entries > 2000 * 3
    loaded = onnx_format.load(path)
    assert len(loaded.layers) == 500 and len(loaded.edges) == 499


@pytest.mark.parametrize("asset", sorted(p.name for p in ASSETS.glob("*.onnx") if "truncated" not in p.name))
def test_the_walk_accepts_every_asset(asset: str) -> None:
    """The walk sees only the .onnx file (external data stays outside it) and counts what protobuf builds."""
    data = (ASSETS / asset).read_bytes()
    counts = _onnx_wire.walk(data, _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR))
    model = onnx.ModelProto.FromString(data)
    built = 0
    stack: list[Any] = [model]
    while stack:  # every message and repeated string the runtime built, the model itself excepted
        msg = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == fd.TYPE_MESSAGE:
                children = list(value) if fd.is_repeated else [value]
                stack.extend(children)
                built += len(children)
            elif fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES) and fd.is_repeated:
                built += len(value)
    assert counts.entries == built


def test_truncated_asset_keeps_its_message() -> None:
    with pytest.raises(InputError) as info:
        onnx_format.load(ASSETS / "onnx_truncated.onnx")
    assert str(info.value).endswith("(truncated: field graph at byte 23 needs 2054 bytes, the file ends 1017 later)")


def test_the_schema_knows_which_fields_build_objects() -> None:
    table = _onnx_wire.schema(onnx.ModelProto.DESCRIPTOR)
    graph = table[7][1]
    node = graph[1][1]
    attribute = node[5][1]
    assert [table[n][2] for n in (7, 8, 14, 20, 25)] == [
        "ModelProto.graph",
        "ModelProto.opset_import",
        "ModelProto.metadata_props",
        "ModelProto.training_info",
        "ModelProto.functions",
    ]
    assert [graph[n][2] for n in (1, 5, 11, 12, 13, 14, 15)] == [
        "GraphProto.node",
        "GraphProto.initializer",
        "GraphProto.input",
        "GraphProto.output",
        "GraphProto.value_info",
        "GraphProto.quantization_annotation",
        "GraphProto.sparse_initializer",
    ]
    assert [node[n][2] for n in (1, 2, 5)] == ["NodeProto.input", "NodeProto.output", "NodeProto.attribute"]
    assert attribute[6][1] is graph and attribute[11][1] is graph  # g and graphs: subgraphs recurse
    assert {attribute[n][2] for n in (5, 10, 22, 23)} == {
        "AttributeProto.t",
        "AttributeProto.tensors",
        "AttributeProto.sparse_tensor",
        "AttributeProto.sparse_tensors",
    }
    assert 9 not in attribute[5][1] and 4 not in attribute[5][1]  # raw_data and packed floats: skipped by length
