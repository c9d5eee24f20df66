"""ONNX: a protobuf ``ModelProto``, with weights inline or in external data files.

The model is parsed with the ``onnx`` package and never run. Weights are
initializers and Constant nodes, in the main graph and in the subgraphs of
If/Loop/Scan; each becomes a lazy :class:`~auditor.graph.TensorRef` (inline
bytes are converted on read, external data is memory-mapped copy-on-write
after its location was checked to stay inside the model's folder). Layers are
recognised from the nodes that use them (Conv, Gemm, MatMul(+Add), LSTM, GRU,
BatchNormalization, LayerNormalization, Gather as embedding), looking through
Identity, Cast, Transpose, Reshape and DequantizeLinear between a weight and
its node; edges come from tracing the node graph (:mod:`._onnx_graph`).

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
from auditor.formats._onnx_graph import LayerSite, NodeInfo, trace_edges
from auditor.graph import EdgeSource, Layer, LayerGraph, LayerKind, Quantization, TensorRef
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
# Attribute types (AttributeProto.AttributeType).
_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR, _A_GRAPH, _A_FLOATS, _A_INTS, _A_STRINGS, _A_GRAPHS = 1, 2, 3, 4, 5, 6, 7, 8, 10
# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited), for sniffing.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


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


def sniff(path: Path, head: bytes) -> bool:
    """Whether ``head`` reads as the start of a protobuf ``ModelProto`` (ONNX has no magic number).

    Walks the wire format of the first fields: each must be a ModelProto field
    with its wire type, lengths must fit the file, ``ir_version`` must be
    plausible and the first field must be ``ir_version`` or at least two
    fields must check out. Never raises.
    """
    try:
        if not head or path.is_dir():
            return False
        size = path.stat().st_size
        pos = fields = 0
        first = None
        while pos < len(head):
            tag, pos = _varint(head, pos)
            if tag is None:
                break
            number, wire = tag >> 3, tag & 7
            if _MODEL_FIELDS.get(number) != wire:
                return False
            first = number if first is None else first
            value, pos = _varint(head, pos)
            if value is None:
                break
            if number == 1 and not 1 <= value <= 100:
                return False
            if wire == 2:
                if pos + value > size:
                    return False
                if number in (2, 3, 4):  # producer name, version, domain: text
                    try:
                        head[pos : pos + value].decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if exc.start < len(head) - pos - 4:  # a character cut by the head's end is fine
                            return False
                pos += value
            fields += 1
        return fields >= 1 and (first == 1 or fields >= 2)
    except Exception:
        return False


# ---------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    """One stored tensor: initializer or Constant value, in its stored layout."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    origin: str


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


def _external(t: Any, name: str, shape: tuple[int, ...], dtype: str, nbytes: int, ctx: _Context) -> Callable[[], torch.Tensor]:
    """A reader mapping external data, after refusing locations outside the folder and ranges past the end."""
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
        raise InputError(ctx.path, f"{what}: length {length} at offset {offset} does not match shape {list(shape)} of {dtype}")
    size = target.stat().st_size
    if offset + nbytes > size:
        raise InputError(
            ctx.path, f"{what} needs bytes {offset}..{offset + nbytes} but {location} holds only {size} bytes (truncated?)"
        )
    if target not in ctx.files:
        ctx.files.append(target)
    origin = ctx.path
    return lambda: mmap_tensor(target, offset, shape, dtype, name=name, origin=origin)


def _tensor(t: Any, name: str, origin: str, ctx: _Context) -> _Tensor | None:
    """A lazy view of a TensorProto, its size checked against its data; ``None`` (with a note) if unreadable."""
    path = ctx.path
    if t.data_type not in _DTYPES:
        ctx.notes.append(f"tensor {name!r} ({origin}) has ONNX element type {t.data_type}, which auditor does not read; skipped")
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
        return _Tensor(name, dtype, dims, _external(t, name, dims, dtype, nbytes, ctx), origin)
    if t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise InputError(path, f"tensor {name!r}: shape {list(dims)} of {dtype} needs {nbytes} bytes, raw_data holds {len(t.raw_data)}")
        return _Tensor(name, dtype, dims, lambda: _from_buffer(t.raw_data, dtype, dims), origin)
    count = len(getattr(t, typed))
    if count != numel:
        raise InputError(path, f"tensor {name!r}: shape {list(dims)} needs {numel} values, {typed} holds {count}")
    return _Tensor(name, dtype, dims, lambda: _from_field(getattr(t, typed), dtype, dims, name, path), origin)


def _attr(a: Any) -> Any:
    """A plain Python value of an attribute (graphs and tensors are handled elsewhere)."""
    kinds: dict[int, Callable[[Any], Any]] = {
        _A_FLOAT: lambda a: float(a.f),
        _A_INT: lambda a: int(a.i),
        _A_STRING: lambda a: a.s.decode("utf-8", "replace"),
        _A_FLOATS: lambda a: [float(v) for v in a.floats],
        _A_INTS: lambda a: [int(v) for v in a.ints],
        _A_STRINGS: lambda a: [v.decode("utf-8", "replace") for v in a.strings],
    }
    read = kinds.get(a.type)
    return None if read is None else read(a)


def _constant(node: Any, origin: str, ctx: _Context) -> _Tensor | None:
    """The tensor a Constant node outputs (``value``, or the small ``value_float(s)``/``value_int(s)`` forms)."""
    name = node.output[0] if node.output else ""
    for a in node.attribute:
        if a.name == "value" and a.type == _A_TENSOR:
            return _tensor(a.t, name, origin, ctx)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            array = np.asarray(_attr(a), dtype=np.float32 if "float" in a.name else np.int64)
            tensor = torch.from_numpy(array)
            return _Tensor(name, str(array.dtype), tuple(array.shape), lambda t=tensor: t, origin)
    ctx.notes.append(f"Constant node {node.name or name!r} ({origin}) holds no dense tensor auditor reads; skipped")
    return None


# ---------------------------------------------------------------- graphs and scopes


@dataclass
class _Graph:
    """One graph (main or subgraph): its nodes, own tensors and the scope it sees."""

    proto: Any
    origin: str
    parent: _Graph | None
    tensors: dict[str, _Tensor] = field(default_factory=dict)
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    def tensor(self, name: str) -> _Tensor | None:
        scope: _Graph | None = self
        while scope is not None:
            if name in scope.tensors:
                return scope.tensors[name]
            if name in scope.producers:
                return None  # shadowed by a computed value
            scope = scope.parent
        return None

    def producer(self, name: str) -> Any:
        scope: _Graph | None = self
        while scope is not None:
            if name in scope.producers:
                return scope.producers[name]
            scope = scope.parent
        return None


def _graphs(model: Any, ctx: _Context) -> list[_Graph]:
    """The main graph and every If/Loop/Scan subgraph (walked without recursion), tensors collected."""
    main = _Graph(model.graph, "main graph", None)
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
                subs = [a.g] if a.type == _A_GRAPH else list(a.graphs) if a.type == _A_GRAPHS else []
                for k, sub in enumerate(subs):
                    label = f"{a.name}[{k}]" if a.type == _A_GRAPHS else a.name
                    child = _Graph(sub, f"{node.op_type} node {node.name!r} attribute {label} of {g.origin}", g)
                    found.append(child)
                    stack.append(child)
    return found
