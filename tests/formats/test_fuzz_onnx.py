"""Fuzzing the ONNX loader: whatever the bytes, the only way out is an InputError that a check raised
on purpose, never the catch-all's :class:`~auditor.errors.LoaderBugError`.

Four sources of hostile files: random bytes; byte mutations of the tiny model (hypothesis); seeded
byte mutations of every ONNX asset in tests/assets (external data included); and seeded models
generated from ONNX's own structures, every field of which may be wrong in type, size or value
(dtypes, dims, raw and typed data, external locations, offsets and lengths, attribute types,
dangling and cyclic names, subgraphs, text that is not UTF-8). Each file is loaded with the
format's ``load`` and with ``load_model``; when it loads, every tensor is read, which must work or
raise a deliberate InputError. The seeded loops run in chunks: the first of each in the fast run,
all of them (over 5,000 files with the hypothesis tests) in ``make test``.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from auditor.audit.load import load_model
from auditor.errors import InputError
from auditor.formats import onnx as onnx_format
from auditor.graph import LayerGraph

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY = (ASSETS / "onnx_tiny.onnx").read_bytes()
CORPUS = [p.read_bytes() for p in sorted(ASSETS.glob("onnx_*.onnx"))]
EXTERNAL_DATA = ASSETS / "onnx_external.bin"
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
)
#: Seeded chunks of the corpus mutations and generated models; chunk 0 runs in the fast run.
CHUNKS, MUTANTS_PER_CHUNK, MODELS_PER_CHUNK = 10, 600, 400
CHUNK_PARAMS = [pytest.param(c, marks=() if c == 0 else pytest.mark.slow) for c in range(CHUNKS)]


@pytest.fixture
def target(tmp_path: Path) -> Path:
    shutil.copy(EXTERNAL_DATA, tmp_path / EXTERNAL_DATA.name)  # so mutants of the external-data model reach it
    return tmp_path / "fuzz.onnx"


def _check(path: Path, data: bytes, label: str = "") -> list[LayerGraph]:
    """Load ``data`` both ways and read every tensor; fail on anything but a deliberate InputError."""
    path.write_bytes(data)
    graphs = []
    for load in (onnx_format.load, load_model):
        try:
            graph = load(path)
        except InputError as exc:
            assert not exc.internal, f"{label} reached the loader's catch-all: {exc}"
            continue
        graphs.append(graph)
        for layer in graph.layers:
            for ref in layer.params.values():
                try:
                    ref.read()
                    ref.read(float32=True)
                except InputError as exc:
                    assert not exc.internal, f"{label} reached a catch-all reading {ref.name!r}: {exc}"
    return graphs


@FUZZ
@given(data=st.binary(max_size=512), lead=st.booleans())
def test_random_bytes(target: Path, data: bytes, lead: bool) -> None:
    _check(target, (b"\x08" if lead else b"") + data)


_MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "set"]), st.integers(0, len(TINY) - 1), st.integers(0, 255)
)


@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_tiny_model(target: Path, mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(TINY)
    for kind, position, value in mutations:
        if not data:
            break
        where = position % len(data)
        if kind == "flip":
            data[where] ^= 1 << (value % 8)
        elif kind == "set":
            data[where] = value
        elif kind == "insert":
            data.insert(where, value)
        elif kind == "delete":
            del data[where]
        elif kind == "truncate":
            del data[where:]
    _check(target, bytes(data))


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_mutated_assets(target: Path, chunk: int, byte_edits: Callable[[random.Random, bytes], bytes]) -> None:
    rng = random.Random(1000 + chunk)
    for i in range(MUTANTS_PER_CHUNK):
        _check(target, byte_edits(rng, rng.choice(CORPUS)), f"mutant {i} of chunk {chunk}")


# ---------------------------------------------------------------- generated models

# Placeholders that become bytes which are not UTF-8 once serialised (same length, so the protobuf stays whole).
_NOT_UTF8 = (b"\x7f\x01", b"\xff\xfe")
_OPS = (
    "Conv Gemm MatMul Add LSTM GRU BatchNormalization LayerNormalization Gather DequantizeLinear Transpose "
    "Reshape Identity Cast Constant If Loop Concat Flatten Relu Slice Shape Unknown".split()
)
_LAYER_OPS = "Conv Gemm MatMul LSTM GRU BatchNormalization LayerNormalization Gather".split()
_ATTRS = {
    "Conv": ["group", "pads", "strides", "dilations", "kernel_shape", "auto_pad"],
    "Gemm": ["alpha", "beta", "transA", "transB"],
    "LSTM": ["hidden_size", "direction", "layout", "clip", "activations", "input_forget"],
    "GRU": ["hidden_size", "direction", "linear_before_reset", "layout"],
    "BatchNormalization": ["epsilon", "momentum", "training_mode"],
    "LayerNormalization": ["epsilon", "axis"],
    "Gather": ["axis"],
    "DequantizeLinear": ["axis", "block_size"],
    "Transpose": ["perm"],
    "Concat": ["axis"],
    "Flatten": ["axis"],
    "Constant": ["value", "value_float", "value_floats", "value_int", "value_ints", "sparse_value"],
    "If": ["then_branch", "else_branch"],
    "Loop": ["body"],
}
# The type each attribute has in valid ONNX (FLOAT 1, INT 2, STRING 3, TENSOR 4, GRAPH 5, FLOATS 6, INTS 7, STRINGS 8).
_ATTR_TYPES = {"pads": 7, "strides": 7, "dilations": 7, "kernel_shape": 7, "auto_pad": 3, "alpha": 1, "beta": 1,
               "direction": 3, "clip": 1, "activations": 8, "epsilon": 1, "momentum": 1, "perm": 7, "value": 4,
               "value_float": 1, "value_floats": 6, "value_ints": 7, "sparse_value": 11, "then_branch": 5,
               "else_branch": 5, "body": 5}  # fmt: skip
_WEIGHTS = ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "W", "R", "B", "scale", "zero", "shape", "emb.weight",
            "lstm.weight_ih_l0", "lstm.weight_hh_l0", "onnx::Conv_7", "", "w\x7f\x01"]  # fmt: skip


class Generator:
    """One seeded random ONNX model built from the protobuf classes, mostly plausible, often wrong."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.values = ["x", "cond", ""] + [f"v{i}" for i in range(6)]
        self.weights = list(_WEIGHTS)  # the names the graph being built stores, then the usual ones

    def dims(self) -> list[int]:
        r = self.rng
        if r.random() < 0.08:
            return [r.choice([-1, 2**31, 2**40, 2**62, 2**63 - 1, 0]) for _ in range(r.randint(1, 3))]
        if r.random() < 0.05:
            return [1] * r.randint(20, 40)
        return [r.randint(0, 5) for _ in range(r.randint(0, 4))]

    def tensor(self, name: str) -> Any:

        r = self.rng
        t = TensorProto()
        t.name = name
        if r.random() < 0.6:  # a well-formed float tensor, so that layers get recognised
            t.data_type = 1
            t.dims.extend(r.randint(1, 4) for _ in range(r.choice([1, 2, 2, 3, 4, 4])))
            count = 1
            for d in t.dims:
                count *= d
            t.raw_data = r.randbytes(4 * count)
            return t
        t.data_type = r.choice([1, 1, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 0, 8, 13, 14, 17, 21, 99])
        t.dims.extend(self.dims())
        n = 1
        for d in t.dims:
            n *= max(d, 0)
        n = min(n, 4096)
        size = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}.get(t.data_type, 1)
        how = r.random()
        if how < 0.45:
            extra = 0 if r.random() < 0.8 else r.choice([-1, 1, 3, -size])
            t.raw_data = r.randbytes(max(0, n * size + extra))
        elif how < 0.75:
            count = n if r.random() < 0.8 else r.randint(0, n + 2)
            field = r.choice(["float_data", "int32_data", "int64_data", "double_data", "string_data"])
            if field == "float_data":
                t.float_data.extend(r.choice([r.gauss(0, 1), float("nan"), float("inf")]) for _ in range(count))
            elif field == "int32_data":
                t.int32_data.extend(r.choice([r.randint(-9, 9), 2**31 - 1, -(2**31), 65536]) for _ in range(count))
            elif field == "int64_data":
                t.int64_data.extend(r.randint(-(2**63), 2**63 - 1) for _ in range(count))
            elif field == "double_data":
                t.double_data.extend(r.gauss(0, 1) for _ in range(count))
            else:
                t.string_data.extend(r.randbytes(3) for _ in range(count))
        else:
            t.data_location = TensorProto.EXTERNAL
            entries = {
                "location": r.choice(
                    ["onnx_external.bin", "missing.bin", "../x.bin", "/etc/passwd", "", ".", "a\x7f\x01", "x" * 300]
                ),
                "offset": r.choice(
                    ["0", "4", "1728", "1748", "-1", "abc", "", "1e3", " 8 ", "1_0", "9" * 4300, "٣", "0x10"]
                ),
                "length": r.choice([str(n * size), "0", "-4", "x", "", str(2**64)]),
            }
            for key, value in entries.items():
                if r.random() < 0.85:
                    e = t.external_data.add()
                    e.key, e.value = key, value
        if r.random() < 0.03:
            t.segment.begin, t.segment.end = 0, 1
        return t

    def attribute(self, name: str, depth: int) -> Any:

        r = self.rng
        a = AttributeProto()
        a.name = name
        right = _ATTR_TYPES.get(name, 2)
        a.type = right if r.random() < 0.7 else r.choice([1, 2, 3, 4, 5, 6, 7, 8, 10, 0, 11, 12])  # type: ignore[assignment]
        if a.type == 1:
            a.f = r.choice([1.0, 0.5, float("nan"), float("inf"), -2.0])
        elif a.type == 2:
            a.i = r.choice([0, 1, -1, 2, 3, 2**62, -(2**63)])
        elif a.type == 3:
            a.s = r.choice([b"bidirectional", b"reverse", b"forward", b"\xff", b"SAME_UPPER", b""])
        elif a.type == 4:
            a.t.CopyFrom(self.tensor("t"))
        elif a.type == 5 and depth < 2:
            a.g.CopyFrom(self.graph(depth + 1))
        elif a.type == 6:
            a.floats.extend(r.gauss(0, 1) for _ in range(r.randint(0, 4)))
        elif a.type == 7:
            a.ints.extend(r.choice([0, 1, 2, 3, -1, -5, 2**40]) for _ in range(r.randint(0, 8)))
        elif a.type == 8:
            a.strings.extend(r.choice([b"Sigmoid", b"Tanh", b"\xfe"]) for _ in range(r.randint(0, 3)))
        elif a.type == 10 and depth < 2:
            a.graphs.extend(self.graph(depth + 1) for _ in range(r.randint(0, 2)))
        return a

    def node(self, op: str, depth: int) -> Any:

        r = self.rng
        n = NodeProto()
        n.op_type, n.name = op, r.choice([f"{op.lower()}{r.randint(0, 3)}"] * 8 + ["", "n\x7f\x01"])
        n.input.extend([r.choice(self.values)] if r.random() < 0.9 else [])
        n.input.extend(r.choice(self.weights if r.random() < 0.8 else self.values) for _ in range(r.randint(0, 4)))
        out = f"v{r.randint(0, 8)}" if r.random() < 0.3 else f"o{len(self.values)}"
        n.output.extend([out] if r.random() < 0.95 else [])
        self.values.append(out)
        for attr in r.sample(_ATTRS.get(op, []), r.randint(0, len(_ATTRS.get(op, [])))):
            n.attribute.append(self.attribute(attr, depth))
        return n

    def graph(self, depth: int = 0) -> Any:

        r = self.rng
        g = GraphProto()
        g.name = "g\x7f\x01" if r.random() < 0.05 else f"g{depth}"
        stored = r.sample(_WEIGHTS, r.randint(0, 6))
        for name in stored:
            g.initializer.append(self.tensor(name))
        outer, self.weights = self.weights, stored * 8 + _WEIGHTS
        for _ in range(r.randint(0, 8 if depth == 0 else 3)):
            g.node.append(self.node(r.choice(_LAYER_OPS if r.random() < 0.5 else _OPS), depth))
        shapes: list[list[str | int | None] | None] = [None, [1, 3, 4, 4], [-1, 0], ["n", 2]]
        for name in ("x", "cond")[: r.randint(0, 2)]:
            g.input.append(helper.make_tensor_value_info(name, 1, r.choice(shapes)))
        for value in r.sample(self.values, min(2, len(self.values))):
            g.value_info.append(helper.make_tensor_value_info(value, r.choice([1, 7]), self.dims()))
        g.output.append(helper.make_tensor_value_info(r.choice(self.values), 1, None))
        self.weights = outer
        return g

    def model(self) -> bytes:

        r = self.rng
        m = ModelProto()
        m.ir_version = r.choice([8] * 20 + [1, 0, 99])
        m.producer_name = r.choice(["fuzz", "p\x7f\x01"])
        if r.random() < 0.2:
            m.model_version = r.randint(-5, 5)
        opset = m.opset_import.add()
        opset.domain, opset.version = r.choice(["", "ai.onnx", "d\x7f\x01"]), r.choice([17, 0, -1])
        if r.random() < 0.2:
            prop = m.metadata_props.add()
            prop.key, prop.value = "k\x7f\x01", "v"
        if r.random() < 0.98:
            m.graph.CopyFrom(self.graph())
        data = m.SerializeToString()
        return data.replace(*_NOT_UTF8)


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_generated_models(target: Path, chunk: int, byte_edits: Callable[[random.Random, bytes], bytes]) -> None:
    rng = random.Random(2000 + chunk)
    loaded = layered = 0
    for i in range(MODELS_PER_CHUNK):
        data = Generator(rng).model()
        if rng.random() < 0.1:
            data = byte_edits(rng, data)  # a few mutants of well-formed structures
        graphs = _check(target, data, f"generated model {i} of chunk {chunk}")
        loaded += bool(graphs)
        layered += any(g.layers for g in graphs)
    # The generator must keep reaching the layer code, not only the parser's refusals.
    assert loaded > MODELS_PER_CHUNK * 0.3 and layered > MODELS_PER_CHUNK * 0.02, (loaded, layered)


# ---------------------------------------------------------------- the loader bugs the fuzzers found


def _tiny_model() -> ModelProto:
    """onnx_tiny.onnx as a ModelProto, to break by hand."""
    model = ModelProto()
    model.ParseFromString(TINY)
    return model


def _load_bytes(target: Path, data: bytes) -> LayerGraph:
    target.write_bytes(data)
    return onnx_format.load(target)


def test_text_that_is_not_utf8_is_read_with_escapes(target: Path) -> None:
    # The protobuf runtime returns bytes for such a field: names mixed bytes and str (a TypeError before).
    model = _tiny_model()
    model.graph.node[0].output[0] = "c\x7f\x01"
    model.graph.node[1].input[0] = "c\x7f\x01"
    model.graph.initializer[0].name = model.graph.node[0].input[1] = "conv.weight\x7f\x01"
    graph = _load_bytes(target, model.SerializeToString().replace(*_NOT_UTF8))
    assert [layer.name for layer in graph.layers] == ["conv", "fc"]
    assert graph.layers[0].params["weight"].name == "conv.weight\\xff\\xfe"
    assert [(e.src, e.dst) for e in graph.edges] == [("conv", "fc")]
    assert graph.notes == [
        "4 text field(s) are not UTF-8 (invalid ONNX), read with \\x escapes (first: graph.initializer[0].name)"
    ]


def test_external_location_that_is_not_utf8_is_named(target: Path) -> None:
    model = onnx.load(str(ASSETS / "onnx_external.onnx"), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "onnx_external.bin\x7f\x01"
    with pytest.raises(InputError) as caught:
        _load_bytes(target, model.SerializeToString().replace(*_NOT_UTF8))
    assert not caught.value.internal
    assert caught.value.problem == (
        "external data of tensor 'conv.weight' 'onnx_external.bin\\\\xff\\\\xfe' does not exist next to the model"
    )


@pytest.mark.parametrize(
    ("offset", "problem"),
    [
        ("9" * 4300, "offset '9999999999999999999999999999999999999999'... (4,300 characters) is not a byte count"),
        ("-16", "offset '-16' is not a byte count"),
        ("0x10", "offset '0x10' is not a byte count"),
        ("\u0663", "offset '\u0663' is not a byte count"),
    ],
)
def test_external_offsets_that_are_not_byte_counts_are_named(target: Path, offset: str, problem: str) -> None:
    # 4,300 digits: int() read them, then printing the offset in the message raised ValueError (the case)
    model = onnx.load(str(ASSETS / "onnx_external.onnx"), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "offset")
    entry.value = offset
    with pytest.raises(InputError) as caught:
        _load_bytes(target, model.SerializeToString())
    assert not caught.value.internal
    assert caught.value.problem == f"external data of tensor 'conv.weight': {problem}"


def test_external_offsets_as_int_reads_them_still_load(target: Path) -> None:
    model = onnx.load(str(ASSETS / "onnx_external.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        entry = next(e for e in tensor.external_data if e.key == "offset")
        entry.value = f" +{entry.value} "
    graph = _load_bytes(target, model.SerializeToString())
    assert graph.layers[0].params["weight"].read().shape == (4, 3, 3, 3)


def test_external_location_too_long_for_the_file_system_is_named(target: Path) -> None:
    # an OSError (ENAMETOOLONG) from the file system before
    model = onnx.load(str(ASSETS / "onnx_external.onnx"), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "x" * 300
    with pytest.raises(InputError) as caught:
        _load_bytes(target, model.SerializeToString())
    assert not caught.value.internal
    long_name = repr("x" * 300)
    assert (
        caught.value.problem
        == f"external data of tensor 'conv.weight' {long_name} cannot be looked up: File name too long"
    )


@pytest.mark.parametrize(
    ("node", "name", "attribute", "note"),
    [
        (1, "transB", "T", "Gemm node 'fc': attribute 'transB' is str 'T', not an integer; not a layer"),
        (1, "alpha", math.nan, "Gemm node 'fc': attribute 'alpha' is float 'nan', not a finite number; not a layer"),
        (0, "group", 1.5, "Conv node 'conv': attribute 'group' is float '1.5', not an integer; not a layer"),
        (0, "pads", 3, "Conv node 'conv': attribute 'pads' is int '3', not a list of integers; not a layer"),
    ],
)
def test_attribute_of_the_wrong_type_is_a_note(target: Path, node: int, name: str, attribute: Any, note: str) -> None:
    # int("T"), float("nan") in a layer attribute, len(3): a TypeError/ValueError before
    model = _tiny_model()
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    kept = [a for a in nodes[node].attribute if a.name != name]
    del nodes[node].attribute[:]
    nodes[node].attribute.extend([*kept, helper.make_attribute(name, attribute)])
    graph = _load_bytes(target, model.SerializeToString())
    assert note in graph.notes
    assert len(graph.layers) == 1


def test_constant_of_the_wrong_attribute_type_is_skipped(target: Path) -> None:
    # np.asarray("1", dtype=int64): a ValueError before
    model = _tiny_model()
    constant = helper.make_node("Constant", [], ["k"], name="k")
    constant.attribute.append(AttributeProto(name="value_ints", type=AttributeProto.STRING, s=b"1"))
    model.graph.node.insert(0, constant)
    graph = _load_bytes(target, model.SerializeToString())
    assert "Constant node 'k' (Constant node 'k' in main graph) holds no dense tensor auditor reads; skipped" in (
        graph.notes
    )


def test_a_scalar_conv_weight_is_not_a_layer(target: Path) -> None:
    # shape[0] of a scalar: an IndexError before
    model = _tiny_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), "conv.weight"))
    graph = _load_bytes(target, model.SerializeToString())
    assert "Conv node 'conv': weight of shape [] is not a convolution kernel; not a layer" in graph.notes


def test_an_empty_tensor_of_huge_dimensions_is_refused(target: Path) -> None:
    # torch's "Stride calculation overflowed" (a RuntimeError) before
    model = _tiny_model()
    weight = model.graph.initializer[0]
    del weight.dims[:]
    weight.dims.extend([2**40, 2**40, 0])
    weight.raw_data = b""
    with pytest.raises(InputError) as caught:
        _load_bytes(target, model.SerializeToString())
    assert caught.value.problem == (
        "tensor 'conv.weight': shape [1099511627776, 1099511627776, 0] is too large to address"
    )
    assert not caught.value.internal


def test_quantization_zero_point_that_does_not_fit_is_a_note(target: Path) -> None:
    # reshape of three zero points to a scalar: a ValueError before
    model = onnx.load(str(ASSETS / "onnx_quant_tensor.onnx"))
    zero = next(t for t in model.graph.initializer if t.name.endswith("zero_point"))
    zero.CopyFrom(numpy_helper.from_array(np.zeros(3, dtype=np.int8), zero.name))
    graph = _load_bytes(target, model.SerializeToString())
    assert any("zero point of shape [3] does not fit a single scale" in n for n in graph.notes), graph.notes


def test_reshape_by_a_float_shape_is_a_note(target: Path) -> None:
    # int(nan): a ValueError before
    model = _tiny_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array([5.0, math.nan], np.float32), "to"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["fc.weight", "to"], ["fcw"], name="reshape"))
    model.graph.node[-1].input[1] = "fcw"
    graph = _load_bytes(target, model.SerializeToString())
    assert "Gemm node 'fc': Reshape shape 'to' is float32, not integers; not a layer" in graph.notes
