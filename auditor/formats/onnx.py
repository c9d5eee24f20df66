"""ONNX: a protobuf ``ModelProto``, with weights inline or in external data files.

The model is parsed with the ``onnx`` package and never run. Weights are
initializers and Constant nodes, in the main graph and in the subgraphs of
If/Loop/Scan; each becomes a lazy :class:`~auditor.graph.TensorRef` (inline
bytes are converted on read, external data is memory-mapped copy-on-write
after its location was checked to stay inside the model's folder). Layers are
recognised from the nodes that use them (Conv, Gemm, MatMul(+Add), LSTM, GRU,
BatchNormalization, LayerNormalization, Gather as embedding), looking through
Identity, Cast, Transpose, Reshape and DequantizeLinear between a weight and
its node; edges come from tracing the node graph (both walks in ``_onnx_graph``).

Naming: a layer takes the module path of its parameters when they are named
``prefix.weight`` (``layer1.0.conv1``), else the node's name. The legacy
exporter's constant folding renames weights (``onnx::Conv_17``, BatchNorm
folded into the conv); the dynamo exporter keeps ``c.weight`` on folded
values, so a name never proves the values are the original ones.

Recurrent layers: one ONNX LSTM/GRU node is one auditor layer with
``num_layers=1`` and PyTorch parameter names ``*_l0`` (``*_l0_reverse``). A
PyTorch ``nn.LSTM(num_layers=2)`` exports as two nodes, so it becomes two
consecutive layers, the second holding PyTorch's ``*_l1`` tensors under
``*_l0`` names, joined by an edge; keeping one node per layer keeps every
layer's weights next to the node that uses them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor.bases import Format
from auditor.errors import AuditorError, InputError
from auditor.formats._io import NUMPY_DTYPES, inside_folder, mmap_tensor
from auditor.formats._onnx_graph import (
    A_GRAPH,
    A_GRAPHS,
    A_INT,
    A_TENSOR,
    LayerSite,
    NodeInfo,
    Param,
    Scope,
    StoredTensor,
    Unusable,
    attr_value,
    make_ref,
    plan_steps,
    resolve,
    trace_edges,
)
from auditor.graph import EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.hookspecs import hookimpl

__all__ = ["MAX_PROTOBUF", "OnnxFormat", "load", "sniff"]

#: Protobuf cannot hold more than 2 GiB; bigger weights must be external data.
MAX_PROTOBUF = 2 * 1024**3

# TensorProto.DataType -> auditor dtype name, and the typed field holding values when raw_data is absent.
_DTYPES: dict[int, tuple[str, str]] = {
    1: ("float32", "float_data"),
    2: ("uint8", "int32_data"),
    3: ("int8", "int32_data"),
    5: ("int16", "int32_data"),
    6: ("int32", "int32_data"),
    7: ("int64", "int64_data"),
    9: ("bool", "int32_data"),
    10: ("float16", "int32_data"),
    11: ("float64", "double_data"),
    16: ("bfloat16", "int32_data"),
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MODULE_NAME = re.compile(r"^(?!onnx::)(.+)\.[A-Za-z_][A-Za-z0-9_]*$")
# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited), for sniffing.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_FIELD_NAMES = {
    1: "ir_version",
    2: "producer_name",
    3: "producer_version",
    4: "domain",
    5: "model_version",
    6: "doc_string",
    7: "graph",
    8: "opset_import",
    14: "metadata_props",
    20: "training_info",
    25: "functions",
    26: "configuration",
}


# ---------------------------------------------------------------- sniffing


def _varint(buf: bytes, pos: int) -> tuple[int | None, int]:
    """``(value, next position)``; value ``None`` when ``buf`` ends inside the varint."""
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
    return None, pos


def _walk(buf: bytes, size: int) -> tuple[int, int | None, str | None]:
    """Top-level ModelProto fields at the start of ``buf``: ``(complete fields, first field number, problem)``.

    ``size`` is the whole file's size: a field running past ``buf`` but not past
    the file ends the walk quietly; one running past the file is a truncation.
    """
    pos = fields = 0
    first: int | None = None
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        if tag is None:
            break
        number, wire = tag >> 3, tag & 7
        if _MODEL_FIELDS.get(number) != wire:
            return fields, first, f"byte {start} starts field {number} of wire type {wire}, which a ModelProto has not"
        first = number if first is None else first
        value, pos = _varint(buf, pos)
        if value is None:
            break
        name = _FIELD_NAMES.get(number, str(number))
        if number == 1 and not 1 <= value <= 100:
            return fields, first, f"ir_version {value} is implausible"
        if wire == 2:
            if pos + value > size:
                return (
                    fields,
                    first,
                    f"truncated: field {name} at byte {start} needs {value} bytes, the file ends {size - pos} later",
                )
            if number in (2, 3, 4):
                try:
                    buf[pos : pos + value].decode("utf-8")
                except UnicodeDecodeError as exc:
                    if exc.start < len(buf) - pos - 4:  # a character cut by the end of ``buf`` is fine
                        return fields, first, f"field {name} is not UTF-8 text"
            pos += value
        fields += 1
    return fields, first, None


def sniff(path: Path, head: bytes) -> bool:
    """Whether ``head`` reads as the start of a protobuf ``ModelProto`` (ONNX has no magic number).

    Walks the wire format of the first fields: each must be a ModelProto field
    with its wire type, ``ir_version`` must be plausible, text fields must be
    UTF-8 and the first field must be ``ir_version`` or at least two fields
    must check out. A field running past the end of the file is accepted after
    ``ir_version``, so that a truncated model is reported as such. Never raises.
    """
    try:
        if not head or path.is_dir():
            return False
        fields, first, problem = _walk(head, path.stat().st_size)
        if problem is not None and not (problem.startswith("truncated") and first == 1):
            return False
        return fields >= 1 and (first == 1 or fields >= 2)
    except Exception:
        return False


# ---------------------------------------------------------------- tensors


@dataclass
class _Context:
    path: Path
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _from_buffer(data: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    array = np.frombuffer(bytearray(data), dtype=NUMPY_DTYPES[dtype])
    tensor = torch.from_numpy(array)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(shape)


def _from_field(values: Any, dtype: str, shape: tuple[int, ...], name: str, path: Path) -> torch.Tensor:
    """Values of a typed field (``int32_data`` carries int8/uint8/bool and fp16/bf16 bit patterns)."""
    if dtype in ("float16", "bfloat16"):
        bits = np.asarray(values, dtype=np.int64)
        if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
            raise InputError(path, f"tensor {name!r}: {dtype} bit patterns out of range in int32_data")
        return _from_buffer(bits.astype("<u2").tobytes(), dtype, shape)
    if dtype in ("int8", "uint8", "int16", "bool"):
        raw = np.asarray(values, dtype=np.int64)
        info = np.iinfo(np.int8 if dtype == "bool" else NUMPY_DTYPES[dtype])
        low, high = (0, 1) if dtype == "bool" else (info.min, info.max)
        if raw.size and (raw.min() < low or raw.max() > high):
            raise InputError(path, f"tensor {name!r}: int32_data values out of range for {dtype}")
        return torch.from_numpy(raw.astype(NUMPY_DTYPES[dtype])).reshape(shape)
    return torch.from_numpy(np.asarray(values, dtype=NUMPY_DTYPES[dtype]).copy()).reshape(shape)


def _external(t: Any, name: str, shape: tuple[int, ...], dtype: str, ctx: _Context) -> Callable[[], torch.Tensor]:
    """A reader mapping external data, after refusing locations outside the folder and ranges past the end."""
    nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
    info = {entry.key: entry.value for entry in t.external_data}
    location = info.get("location", "")
    what = f"external data of tensor {name!r}"
    target = inside_folder(ctx.path.parent, location, what=what, origin=ctx.path)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else nbytes
    except ValueError:
        raise InputError(ctx.path, f"{what}: offset or length is not an integer") from None
    if offset < 0 or length != nbytes:
        raise InputError(
            ctx.path, f"{what}: length {length} at offset {offset} does not match shape {list(shape)} of {dtype}"
        )
    size = target.stat().st_size
    if offset + nbytes > size:
        raise InputError(
            ctx.path,
            f"{what} needs bytes {offset}..{offset + nbytes} but {location} holds only {size} bytes (truncated?)",
        )
    if target not in ctx.files:
        ctx.files.append(target)
    origin = ctx.path
    return lambda: mmap_tensor(target, offset, shape, dtype, name=name, origin=origin)


def _tensor(t: Any, name: str, origin: str, ctx: _Context) -> StoredTensor | None:
    """A lazy view of a TensorProto, its size checked against its data; ``None`` (with a note) if unreadable."""
    path = ctx.path
    if t.data_type not in _DTYPES:
        ctx.notes.append(
            f"tensor {name!r} ({origin}) has ONNX element type {t.data_type}, which auditor does not read; skipped"
        )
        return None
    if t.HasField("segment"):
        ctx.notes.append(f"tensor {name!r} ({origin}) is segmented; skipped")
        return None
    dtype, typed = _DTYPES[t.data_type]
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise InputError(path, f"tensor {name!r}: negative dimension in {list(dims)}")
    numel = math.prod(dims)
    nbytes = numel * NUMPY_DTYPES[dtype].itemsize
    if t.data_location == _EXTERNAL:
        return StoredTensor(name, dtype, dims, _external(t, name, dims, dtype, ctx), origin)
    if t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise InputError(
                path,
                f"tensor {name!r}: shape {list(dims)} of {dtype} needs {nbytes} bytes, raw_data has {len(t.raw_data)}",
            )
        return StoredTensor(name, dtype, dims, lambda: _from_buffer(t.raw_data, dtype, dims), origin)
    count = len(getattr(t, typed))
    if count != numel:
        raise InputError(path, f"tensor {name!r}: shape {list(dims)} needs {numel} values, {typed} holds {count}")
    return StoredTensor(name, dtype, dims, lambda: _from_field(getattr(t, typed), dtype, dims, name, path), origin)


def _constantly(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def _constant(node: Any, origin: str, ctx: _Context) -> StoredTensor | None:
    """The tensor a Constant node outputs (``value``, or the small ``value_float(s)``/``value_int(s)`` forms)."""
    name = node.output[0] if node.output else ""
    for a in node.attribute:
        if a.name == "value" and a.type == A_TENSOR:
            return _tensor(a.t, name, origin, ctx)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            array = np.asarray(attr_value(a), dtype=np.float32 if "float" in a.name else np.int64)
            tensor = torch.from_numpy(array)
            return StoredTensor(name, str(array.dtype), tuple(array.shape), _constantly(tensor), origin)
    ctx.notes.append(f"Constant node {node.name or name!r} ({origin}) holds no dense tensor auditor reads; skipped")
    return None


# ---------------------------------------------------------------- graphs and scopes


def _graphs(model: Any, ctx: _Context) -> list[Scope]:
    """The main graph and every If/Loop/Scan subgraph (walked without recursion), tensors collected."""
    main = Scope(model.graph, "main graph", None)
    found = [main]
    stack = [main]
    while stack:
        g = stack.pop()
        for init in g.proto.initializer:
            t = _tensor(init, init.name, f"initializer in {g.origin}", ctx)
            if t is not None:
                g.tensors.setdefault(init.name, t)
        g.outputs = {o.name for o in g.proto.output}
        for node in g.proto.node:
            for out in node.output:
                if out:
                    g.producers.setdefault(out, node)
            for name in node.input:
                g.consumers[name] = g.consumers.get(name, 0) + 1
            if node.op_type == "Constant" and node.output:
                t = _constant(node, f"Constant node {node.name!r} in {g.origin}", ctx)
                if t is not None:
                    g.tensors.setdefault(node.output[0], t)
            for a in node.attribute:
                subs = [a.g] if a.type == A_GRAPH else list(a.graphs) if a.type == A_GRAPHS else []
                for k, sub in enumerate(subs):
                    label = f"{a.name}[{k}]" if a.type == A_GRAPHS else a.name
                    child = Scope(sub, f"{node.op_type} node {node.name!r} attribute {label} of {g.origin}", g)
                    found.append(child)
                    stack.append(child)
    return found


# ---------------------------------------------------------------- layers

_LSTM_ORDER = (0, 2, 3, 1)  # ONNX i, o, f, c -> PyTorch i, f, g, o
_GRU_ORDER = (1, 0, 2)  # ONNX z, r, h -> PyTorch r, z, n


@dataclass
class _Found:
    """A recognised layer before naming: params, attrs and where it sits in its graph."""

    kind: LayerKind
    node: Any
    params: dict[str, TensorRef]
    attrs: dict[str, Any]
    names: list[str]  # value and tensor names to derive the layer name from, in order of preference
    in_node: int
    out_node: int
    data_input: str
    channels: int | None = None
    rank: int | None = None


def _conv(
    g: Scope, node: Any, attrs: dict[str, Any], p: dict[str, Param]
) -> tuple[LayerKind, dict[str, TensorRef], dict[str, Any]]:
    w = make_ref(p["weight"])
    kind = {3: LayerKind.CONV1D, 4: LayerKind.CONV2D}.get(len(w.shape), LayerKind.OTHER)
    params = {"weight": w}
    if "bias" in p:
        params["bias"] = make_ref(p["bias"])
    out: dict[str, Any] = {"groups": int(attrs.get("group", 1))}
    for onnx_name, name in (("strides", "stride"), ("dilations", "dilation"), ("kernel_shape", "kernel_size")):
        if onnx_name in attrs:
            out[name] = attrs[onnx_name]
    pads = attrs.get("pads")
    if pads is not None:
        half = len(pads) // 2
        out["padding" if pads[:half] == pads[half:] else "pads"] = pads[:half] if pads[:half] == pads[half:] else pads
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        out["auto_pad"] = attrs["auto_pad"]
    if kind is LayerKind.OTHER:
        out["op"] = "Conv"
    return kind, params, out


def _gemm(
    attrs: dict[str, Any], p: dict[str, Param], notes: list[str], label: str
) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_b = int(attrs.get("transB", 0))
    steps: list[tuple[Any, ...]] = [] if trans_b else [("perm", (1, 0))]
    if alpha != 1.0:
        steps.append(("scale", alpha))
    w = make_ref(p["weight"], steps)
    if len(w.shape) != 2:
        raise Unusable(f"weight of shape {list(w.shape)} is not a matrix")
    params = {"weight": w}
    if "bias" in p:
        bias = p["bias"]
        if math.prod(bias.base.shape) == w.shape[0]:
            params["bias"] = make_ref(bias, [("reshape", (w.shape[0],))] + ([("scale", beta)] if beta != 1.0 else []))
        else:
            notes.append(
                f"{label}: bias of shape {list(bias.base.shape)} broadcasts over the outputs; not recorded as a bias"
            )
    out = {"alpha": alpha, "beta": beta, "transA": int(attrs.get("transA", 0)), "transB": trans_b}
    if out["transA"]:
        notes.append(f"{label}: Gemm with transA=1 takes its input transposed")
    return params, out


def _recurrent(
    op: str, attrs: dict[str, Any], p: dict[str, Param], notes: list[str], label: str
) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    gates, order = (4, _LSTM_ORDER) if op == "LSTM" else (3, _GRU_ORDER)
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    w_shape = p["W"].base.shape
    hidden = int(attrs.get("hidden_size", w_shape[1] // gates if len(w_shape) == 3 else 0))
    if len(w_shape) != 3 or w_shape[0] != dirs or w_shape[1] != gates * hidden or hidden <= 0:
        raise Unusable(f"W of shape {list(w_shape)} does not fit {dirs} direction(s) of {gates} gates x {hidden}")
    params: dict[str, TensorRef] = {}
    for d in range(dirs):
        suffix = "_reverse" if d else ""
        params[f"weight_ih_l0{suffix}"] = make_ref(p["W"], [("select", d), ("blocks", order)])
        params[f"weight_hh_l0{suffix}"] = make_ref(p["R"], [("select", d), ("blocks", order)])
        if "B" in p:
            rows = gates * hidden
            params[f"bias_ih_l0{suffix}"] = make_ref(p["B"], [("select", d), ("rows", 0, rows), ("blocks", order)])
            params[f"bias_hh_l0{suffix}"] = make_ref(
                p["B"], [("select", d), ("rows", rows, 2 * rows), ("blocks", order)]
            )
    out: dict[str, Any] = {"hidden_size": hidden, "bidirectional": dirs == 2, "num_layers": 1}
    if direction == "reverse":
        out["direction"] = "reverse"
        notes.append(f"{label}: runs in reverse only, which PyTorch has no module for; its weights are under *_l0")
    if "layout" in attrs:
        out["batch_first"] = attrs["layout"] == 1
    for key in ("linear_before_reset", "input_forget", "clip", "activations"):
        if key in attrs:
            out[key] = attrs[key]
    if op == "GRU" and not attrs.get("linear_before_reset", 0):
        notes.append(f"{label}: GRU with linear_before_reset=0 computes differently from PyTorch's GRU")
    return params, out


def _recognise(g: Scope, index: int, node: Any, consumers: dict[str, list[int]], notes: list[str]) -> _Found | None:
    """The layer ``node`` computes, or ``None`` when it has no weights auditor reads."""
    op = node.op_type
    ins = list(node.input)
    label = f"{op} node {node.name!r}" + ("" if g.parent is None else f" in {g.origin}")

    def param(i: int) -> Param | None:
        return resolve(g, ins[i]) if i < len(ins) and ins[i] else None

    attrs = {a.name: attr_value(a) for a in node.attribute}
    p: dict[str, Param] = {}
    out_node, data_input = index, ins[0] if ins else ""
    channels: int | None = None
    rank: int | None = None
    if op == "Conv":
        for role, i in (("weight", 1), ("bias", 2)):
            if (found := param(i)) is not None:
                p[role] = found
        if "weight" not in p:
            notes.append(f"{label}: the weight is computed, not stored; not a layer")
            return None
        kind, params, out = _conv(g, node, attrs, p)
        channels, rank = params["weight"].shape[0], len(params["weight"].shape)
    elif op in ("Gemm", "MatMul"):
        if len(ins) < 2 or param(0) is not None or (w := param(1)) is None:
            return None
        p["weight"] = w
        if op == "Gemm" and (b := param(2)) is not None:
            p["bias"] = b
        elif op == "MatMul" and len(w.base.shape) == 2 and node.output and node.output[0] not in g.outputs:
            readers = consumers.get(node.output[0], [])
            if len(readers) == 1 and g.proto.node[readers[0]].op_type == "Add":
                add = g.proto.node[readers[0]]
                other = [v for v in add.input if v != node.output[0]]
                b = resolve(g, other[0]) if len(other) == 1 else None
                if b is not None and math.prod(b.base.shape) == plan_steps(w.base.shape, w.steps)[0][-1]:
                    p["bias"], out_node = b, readers[0]
        gemm_attrs = attrs if op == "Gemm" else {}
        params, out = _gemm(gemm_attrs, p, notes, label)
        if op == "MatMul":
            out = {}
        kind = LayerKind.LINEAR
        channels = params["weight"].shape[0]
    elif op in ("LSTM", "GRU"):
        for role, i in (("W", 1), ("R", 2), ("B", 3)):
            if (found := param(i)) is not None:
                p[role] = found
        if "W" not in p or "R" not in p:
            return _torch_named_recurrent(g, index, node, notes, label)
        if len(ins) > 7 and ins[7]:
            notes.append(f"{label}: peephole weights P are not represented")
        params, out = _recurrent(op, attrs, p, notes, label)
        kind = LayerKind.LSTM if op == "LSTM" else LayerKind.GRU
        rank = 4
    elif op == "BatchNormalization":
        for role, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            if (found := param(i)) is None:
                notes.append(f"{label}: {role} is computed, not stored; not a layer")
                return None
            p[role] = found
        params = {role: make_ref(q) for role, q in p.items()}
        out = {"eps": float(attrs.get("epsilon", 1e-5)), "momentum": float(attrs.get("momentum", 0.9))}
        if "training_mode" in attrs:
            out["training_mode"] = attrs["training_mode"]
        kind = LayerKind.BATCH_NORM
        channels = params["weight"].shape[0] if params["weight"].shape else None
    elif op == "LayerNormalization":
        for role, i in (("weight", 1), ("bias", 2)):
            if (found := param(i)) is not None:
                p[role] = found
        if "weight" not in p:
            return None
        params = {role: make_ref(q) for role, q in p.items()}
        out = {"eps": float(attrs.get("epsilon", 1e-5)), "axis": int(attrs.get("axis", -1))}
        kind = LayerKind.LAYER_NORM
    elif op == "Gather":
        if len(ins) < 2 or (w := param(0)) is None or param(1) is not None or int(attrs.get("axis", 0)) != 0:
            return None
        p["weight"] = w
        params = {"weight": make_ref(w)}
        if len(params["weight"].shape) != 2:
            return None
        out, kind, data_input = {}, LayerKind.EMBEDDING, ""
        channels = params["weight"].shape[1]
    else:
        return None
    names = [n for q in p.values() for n in (q.seen_as, q.base.name)]
    return _Found(kind, node, params, out, names, index, out_node, data_input, channels, rank)


_TORCH_RNN = re.compile(r"^(.*?)\.?(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _torch_named_recurrent(g: Scope, index: int, node: Any, notes: list[str], label: str) -> _Found | None:
    """An LSTM/GRU whose W, R, B are computed from PyTorch-named tensors (legacy export without constant folding).

    That exporter slices ``weight_ih_l0``... into ONNX gate order inside the
    graph; the PyTorch tensors it starts from are already canonical, so they
    are taken as they are, found by walking back from W, R and B.
    """
    attrs = {a.name: attr_value(a) for a in node.attribute}
    found: dict[str, StoredTensor] = {}
    layer_index: set[str] = set()
    prefixes: set[str] = set()
    for value in list(node.input[1:4]):
        stack, seen = [value], set[str]()
        while stack and len(seen) < 256:
            current = stack.pop()
            if not current or current in seen:
                continue
            seen.add(current)
            t = g.tensor(current)
            if t is not None:
                if m := _TORCH_RNN.match(t.name):
                    found[f"{m.group(2)}_{m.group(3)}_l0{m.group(5) or ''}"] = t
                    layer_index.add(m.group(4))
                    prefixes.add(m.group(1))
                continue
            producer = g.producer(current)
            if producer is not None:
                stack.extend(producer.input)
    if "weight_ih_l0" not in found or "weight_hh_l0" not in found or len(layer_index) != 1:
        notes.append(f"{label}: W or R is computed, not stored, and not from PyTorch-named tensors; not a layer")
        return None
    gates = 4 if node.op_type == "LSTM" else 3
    hidden = int(attrs.get("hidden_size", 0))
    if any(len(t.shape) not in (1, 2) or t.shape[0] != gates * hidden for t in found.values()):
        raise Unusable(f"PyTorch-named tensors do not fit {gates} gates x {hidden}")
    params = {
        role: TensorRef(t.name, t.shape, t.dtype, t.read)
        for role, t in sorted(found.items(), key=lambda kv: _ROLE_ORDER.index(kv[0]))
    }
    out: dict[str, Any] = {
        "hidden_size": hidden,
        "bidirectional": attrs.get("direction") == "bidirectional",
        "num_layers": 1,
    }
    for key in ("linear_before_reset", "input_forget", "clip", "activations", "layout"):
        if key in attrs:
            out[key] = attrs[key]
    kind = LayerKind.LSTM if node.op_type == "LSTM" else LayerKind.GRU
    names = [f"{prefix}.weight_ih" for prefix in sorted(prefixes) if prefix]
    return _Found(kind, node, params, out, names, index, index, node.input[0] if node.input else "", None, 4)


_ROLE_ORDER = [f"{w}_{x}_l0{r}" for r in ("", "_reverse") for w in ("weight", "bias") for x in ("ih", "hh")]


def _layer_name(found: _Found, index: int, used: set[str]) -> str:
    """``prefix`` of the first ``prefix.weight``-style name, else the node name; made unique with ``_1``, ``_2``..."""
    base = next((m.group(1) for n in found.names if (m := _MODULE_NAME.match(n))), None)
    base = base or found.node.name or f"{found.node.op_type}_{index}"
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


# ---------------------------------------------------------------- loading


def _parse(path: Path) -> Any:
    import onnx

    if path.is_dir():
        raise InputError(path, "is a folder, not an ONNX file")
    size = path.stat().st_size
    if size > MAX_PROTOBUF:
        raise InputError(
            path,
            f"the file is {size:,d} bytes, over protobuf's 2 GiB limit (large models keep weights in external data)",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot be read: {exc.strerror or exc}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except RecursionError:
        raise InputError(path, "not a valid ONNX model: protobuf nesting too deep") from None
    except Exception as exc:  # DecodeError and whatever the protobuf runtime raises on garbage
        try:
            problem = _walk(data, len(data))[2]
        except ValueError:
            problem = "a varint runs over 10 bytes"
        problem = problem or " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(path, f"not a valid ONNX model: the protobuf does not parse ({problem})") from None
    if model.ir_version < 1 or not model.HasField("graph"):
        raise InputError(path, "not an ONNX model: it has no ir_version or no graph")
    return model


def _shapes(graph: Any) -> dict[str, tuple[int | None, ...]]:
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims
            )
    return shapes


def _load(path: Path) -> LayerGraph:
    model = _parse(path)
    ctx = _Context(path, files=[path])
    graphs = _graphs(model, ctx)
    layers: list[Layer] = []
    sites: list[LayerSite] = []
    used_names: set[str] = set()
    used_tensors: set[str] = set()
    sub_layers = 0
    for g in graphs:
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(g.proto.node):
            for name in dict.fromkeys(node.input):
                consumers.setdefault(name, []).append(i)
        for i, node in enumerate(g.proto.node):
            label = f"{node.op_type} node {node.name!r}"
            try:
                found = _recognise(g, i, node, consumers, ctx.notes)
            except Unusable as exc:
                ctx.notes.append(f"{label}: {exc}; not a layer")
                continue
            if found is None:
                continue
            name = _layer_name(found, i, used_names)
            if g.parent is not None:
                found.attrs["subgraph"] = g.origin
                sub_layers += 1
            layers.append(Layer(name, found.kind, found.params, found.attrs, source=node.name))
            used_tensors.update(t.name for t in found.params.values())
            if g.parent is None:
                sites.append(
                    LayerSite(name, found.in_node, found.out_node, found.data_input, found.channels, found.rank)
                )
    main = graphs[0]
    nodes = [
        NodeInfo(
            n.op_type,
            n.name,
            tuple(n.input),
            tuple(n.output),
            next((int(a.i) for a in n.attribute if a.name == "axis" and a.type == A_INT), None),
        )
        for n in main.proto.node
    ]
    constants = set(main.tensors) | {i.name for i in main.proto.initializer}
    edges = trace_edges(
        nodes,
        sites,
        constants=constants,
        graph_inputs={i.name for i in main.proto.input},
        shapes=_shapes(main.proto),
        notes=ctx.notes,
    )
    if sub_layers:
        ctx.notes.append(
            f"{sub_layers} layer(s) sit in If/Loop/Scan subgraphs; edges are traced in the main graph only"
        )
    all_tensors = {t.name for g in graphs for t in g.tensors.values()}
    metadata: dict[str, Any] = {
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "ir_version": int(model.ir_version),
        "opset_imports": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "graph_name": model.graph.name,
        "subgraphs": len(graphs) - 1,
        "tensors": len(all_tensors),
        "tensors_outside_layers": len(all_tensors - used_tensors),
    }
    if model.domain:
        metadata["domain"] = model.domain
    if model.model_version:
        metadata["model_version"] = int(model.model_version)
    metadata.update({f"meta:{p.key}": p.value for p in model.metadata_props})
    return LayerGraph(
        "onnx", path, layers, edges, EdgeSource.GRAPH, files=ctx.files, metadata=metadata, notes=ctx.notes
    )


def load(path: str | os.PathLike[str]) -> LayerGraph:
    """Read an ONNX file into a layer graph without running it; weights are read on demand.

    Raises :class:`~auditor.errors.InputError` for a broken file and
    :class:`~auditor.errors.UnsafeInputError` for external data outside the
    model's folder; no other exception escapes.
    """
    p = Path(path)
    try:
        return _load(p)
    except AuditorError:
        raise
    except MemoryError:
        raise InputError(p, "too large to load as ONNX with the memory available") from None
    except RecursionError:
        raise InputError(p, "nested too deeply to read as ONNX") from None
    except Exception as exc:  # a malformed file reaching a corner the checks missed is still the file's fault
        problem = " ".join(str(exc).split())[:200]
        raise InputError(p, f"could not be read as ONNX: {type(exc).__name__}: {problem}") from None


def iter_tensors(graph: LayerGraph) -> Iterator[tuple[str, str, TensorRef]]:
    """``(layer, role, tensor)`` for every parameter of ``graph`` (tests and tools that read them all)."""
    for layer in graph.layers:
        for role, ref in layer.params.items():
            yield layer.name, role, ref


class OnnxFormat(Format):
    """ONNX protobuf models, with inline or external weights."""

    id = "onnx"
    description = "ONNX model (protobuf), weights inline or in external data files inside its folder"
    priority = 0  # no magic number: the fallback for anything that parses as a ModelProto

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def load(self, path: Path) -> LayerGraph:
        return load(path)


@hookimpl
def register_formats(register: Callable[[Format], None]) -> None:
    """Register the ONNX format."""
    register(OnnxFormat())
