"""ONNX: a protobuf ``ModelProto``, with weights inline or in external data files.

The model is parsed with the ``onnx`` package and never run. Weights are
initializers and Constant nodes, in the main graph and in the subgraphs of
If/Loop/Scan; each becomes a lazy :class:`~auditor.graph.TensorRef` (inline
bytes are converted on read, external data is memory-mapped copy-on-write
after its location was checked to stay inside the model's folder). Layers are
recognised (in ``_onnx_layers``) from the nodes that use them (Conv, Gemm, MatMul(+Add), LSTM, GRU,
BatchNormalization, LayerNormalization, Gather as embedding), looking through
Identity, Cast, Transpose, Reshape and DequantizeLinear between a weight and
its node; edges come from tracing the node graph (both walks in ``_onnx_graph``).

Naming: a layer takes the module path of its parameters when they are named
``prefix.weight`` (``layer1.0.conv1``), else the node's name. The legacy
exporter's constant folding renames weights (``onnx::Conv_17``, BatchNorm
folded into the conv); the dynamo exporter keeps ``c.weight`` on folded
values, so a name never proves the values are the original ones.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) names a linear
layer's weight after the traced program (``val_105``: pre-transposed, fed to a
MatMul) and merges initializers of equal value, but records each node's module
path, module class and the parameters its traced call reads
(:mod:`._onnx_names`). Where a file carries that record, a layer takes its
module's path, so that a transformer reads back under its state dict's names
(``model.layers.0.self_attn.q_proj``), and more is mapped back to the state
dict, each counted in one note: a norm module's weight applied by a Mul
(RMSNorm, which the exporter decomposes) is a layer-norm layer; a weight read
by ``aten.addmm`` (transformers' ``Conv1D``: GPT-2) stays ``(in, out)``, as its
module holds it; a parameter that a second module reads (a tied LM head) is
one layer, the first reader's, as the state dict keeps it; and a bias the
traced call reads but the graph left out (a Gemm without C: a zero bias)
reads as zeros.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.bases import Format
from auditor.errors import AuditorError, InputError, LoaderBugError
from auditor.formats._io import inside_folder, mmap_tensor, numpy_dtype
from auditor.formats._onnx_graph import (
    A_FLOAT,
    A_FLOATS,
    A_GRAPH,
    A_GRAPHS,
    A_INT,
    A_INTS,
    A_TENSOR,
    LayerSite,
    NodeInfo,
    Scope,
    StoredTensor,
    Unusable,
    attr_value,
    trace_edges,
)
from auditor.formats._onnx_layers import Found, layer_name, recognise, recognise_norm_scale
from auditor.formats._onnx_names import Origin, read_origins
from auditor.formats._onnx_wire import BudgetExceeded, WireError, schema, walk
from auditor.graph import EdgeSource, Layer, LayerGraph, LayerKind, TensorRef, itemsize
from auditor.hookspecs import hookimpl

if TYPE_CHECKING:  # numpy, torch and onnx load with the first ONNX file, not when the format registers
    import torch

__all__ = ["MAX_DIMS", "MAX_PROTOBUF", "OnnxFormat", "load", "sniff"]

#: Protobuf cannot hold more than 2 GiB; bigger weights must be external data.
MAX_PROTOBUF = 2 * 1024**3
#: Most dimensions a tensor may have (a longer list is a hostile file, not a model).
MAX_DIMS = 64

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
    import numpy as np
    import torch

    array = np.frombuffer(bytearray(data), dtype=numpy_dtype(dtype))
    tensor = torch.from_numpy(array)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(shape)


def _from_field(values: Any, dtype: str, shape: tuple[int, ...], name: str, path: Path) -> torch.Tensor:
    """Values of a typed field (``int32_data`` carries int8/uint8/bool and fp16/bf16 bit patterns)."""
    import numpy as np
    import torch

    if dtype in ("float16", "bfloat16"):
        bits = np.asarray(values, dtype=np.int64)
        if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
            raise InputError(path, f"tensor {name!r}: {dtype} bit patterns out of range in int32_data")
        return _from_buffer(bits.astype("<u2").tobytes(), dtype, shape)
    if dtype in ("int8", "uint8", "int16", "bool"):
        raw = np.asarray(values, dtype=np.int64)
        info = np.iinfo(np.int8 if dtype == "bool" else numpy_dtype(dtype))
        low, high = (0, 1) if dtype == "bool" else (info.min, info.max)
        if raw.size and (raw.min() < low or raw.max() > high):
            raise InputError(path, f"tensor {name!r}: int32_data values out of range for {dtype}")
        return torch.from_numpy(raw.astype(numpy_dtype(dtype))).reshape(shape)
    return torch.from_numpy(np.asarray(values, dtype=numpy_dtype(dtype)).copy()).reshape(shape)


def _byte_count(text: str | None, default: int, what: str, path: Path) -> int:
    """An external-data offset or length: decimal digits (spaces and a ``+`` allowed, as ``int`` reads them),
    below 2**63; ``default`` when absent or empty. Anything else, a huge number of digits included (which
    ``int`` turns into a number that cannot even be printed), is an InputError naming it."""
    if not text:
        return default
    digits = text.strip().removeprefix("+")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19 and int(digits) < 2**63):
        shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text):,d} characters)"
        raise InputError(path, f"{what} {shown} is not a byte count")
    return int(digits)


def _external(t: Any, name: str, shape: tuple[int, ...], dtype: str, ctx: _Context) -> Callable[[], torch.Tensor]:
    """A reader mapping external data, after refusing locations outside the folder and ranges past the end."""
    nbytes = math.prod(shape) * itemsize(dtype)
    info = {entry.key: entry.value for entry in t.external_data}
    location = info.get("location", "")
    what = f"external data of tensor {name!r}"
    target = inside_folder(ctx.path.parent, location, what=what, origin=ctx.path)
    offset = _byte_count(info.get("offset"), 0, f"{what}: offset", ctx.path)
    length = _byte_count(info.get("length"), nbytes, f"{what}: length", ctx.path)
    if length != nbytes:
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
    if len(dims) > MAX_DIMS:
        raise InputError(path, f"tensor {name!r}: {len(dims)} dimensions, more than {MAX_DIMS}")
    # Only an empty tensor passes the size checks with huge dimensions; torch cannot address them.
    if math.prod(max(d, 1) for d in dims) >= 2**62:
        raise InputError(path, f"tensor {name!r}: shape {list(dims)} is too large to address")
    numel = math.prod(dims)
    nbytes = numel * itemsize(dtype)
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


# The small forms of a Constant's value and the attribute type each must have.
_SMALL_CONSTANTS = {"value_float": A_FLOAT, "value_floats": A_FLOATS, "value_int": A_INT, "value_ints": A_INTS}


def _constantly(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def _constant(node: Any, origin: str, ctx: _Context) -> StoredTensor | None:
    """The tensor a Constant node outputs (``value``, or the small ``value_float(s)``/``value_int(s)`` forms)."""
    name = node.output[0] if node.output else ""
    for a in node.attribute:
        if a.name == "value" and a.type == A_TENSOR:
            return _tensor(a.t, name, origin, ctx)
        if _SMALL_CONSTANTS.get(a.name) == a.type:
            import numpy as np
            import torch

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


# ---------------------------------------------------------------- loading


def _check_wire(path: Path, data: bytes, descriptor: Any) -> None:
    """Refuse, before the protobuf runtime builds anything, a file over the parse budgets or malformed."""
    try:
        walk(data, schema(descriptor))
    except BudgetExceeded as exc:
        raise InputError(
            path,
            f"the file holds {exc}, auditor's budget for one ONNX file (real models hold about 10^5 nodes; "
            "the budget keeps parsing under about 1 GB); refused before parsing",
        ) from None
    except WireError as exc:
        raise InputError(path, f"not a valid ONNX model: the protobuf does not parse ({exc})") from None


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
    _check_wire(path, data, onnx.ModelProto.DESCRIPTOR)
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


def _repair_text(model: Any) -> tuple[int, str]:
    """Make every text field of ``model`` a ``str``: ``(fields repaired, path of the first)``.

    ONNX text must be UTF-8, but the protobuf runtime hands back ``bytes`` for a
    string field that is not, and names would then mix ``bytes`` and ``str``.
    Such bytes are decoded with ``\\x`` escapes, so the model is still read
    and a note says so (a hostile file could make such a name equal another
    one: it is marked invalid all the same). Walks every message once, without
    recursion.
    """
    from google.protobuf.descriptor import FieldDescriptor

    string, message = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE
    repaired, first = 0, ""
    Chain = tuple[Any, str] | None  # (parent chain, "field[index]"): a path built only when it is shown
    stack: list[tuple[Any, Chain]] = [(model, None)]

    def shown(chain: Chain, label: str) -> str:
        parts = [label]
        while chain is not None:
            chain, part = chain
            parts.append(part)
        return ".".join(reversed(parts))

    while stack:
        msg, chain = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == message:
                if fd.is_repeated:
                    stack.extend((m, (chain, f"{fd.name}[{i}]")) for i, m in enumerate(value))
                else:
                    stack.append((value, (chain, fd.name)))
            elif fd.type == string:
                if fd.is_repeated:
                    for i, v in enumerate(value):
                        if isinstance(v, bytes):
                            value[i] = v.decode("utf-8", "backslashreplace")
                            repaired, first = repaired + 1, first or shown(chain, f"{fd.name}[{i}]")
                elif isinstance(value, bytes):
                    setattr(msg, fd.name, value.decode("utf-8", "backslashreplace"))
                    repaired, first = repaired + 1, first or shown(chain, fd.name)
    return repaired, first


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


#: Traced ops that read their weight as stored, ``(in, out)``, where ``aten.linear`` reads ``(out, in)``.
_AS_STORED = ("aten.addmm.default", "aten.mm.default", "aten.matmul.default")
#: The traced ops (words of their names) that compute each kind of layer. A node's record names the module
#: only where its op fits the layer: the optimizer's fused nodes carry the last fused op's record (a
#: convolution with its batch-norm folded in is recorded as the batch-norm, while its weights are the conv's).
_OPS = {
    LayerKind.LINEAR: ("linear", "addmm", "mm", "matmul"), LayerKind.CONV1D: ("conv",), LayerKind.CONV2D: ("conv",),
    LayerKind.EMBEDDING: ("embedding",), LayerKind.LAYER_NORM: ("layer_norm", "rms_norm", "mul"),
    LayerKind.BATCH_NORM: ("batch_norm",), LayerKind.LSTM: ("lstm",), LayerKind.GRU: ("gru",),
}  # fmt: skip


class _Modules:
    """The layers of a dynamo export, named and completed from the exporter's record (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.origins: dict[int, Origin] = read_origins(model) or {}
        self.readers: dict[str, str] = {}  # parameter -> the layer that reads it
        self.counts = {"named": 0, "in_out": 0, "norm": 0}
        self.tied: list[str] = []
        self.zero_bias: list[str] = []

    def in_out(self, origin: Origin | None) -> bool:
        return origin is not None and origin.op in _AS_STORED and origin.param("weight") is not None

    def norm_scale(self, g: Scope, index: int, node: Any, origin: Origin | None) -> Found | None:
        """A norm module's Mul by its own weight (its traced call reads ``<module>.weight``)."""
        if origin is None or not origin.module_class.rsplit(".", 1)[-1].endswith("Norm"):
            return None
        if origin.param("weight") != f"{origin.module}.weight":
            return None
        found = recognise_norm_scale(g, index, node)
        if found is not None:
            self.counts["norm"] += 1
        return found

    @staticmethod
    def fits(origin: Origin | None, found: Found) -> Origin | None:
        """``origin`` where its traced op computes ``found``'s kind of layer, else None."""
        op = origin.op.split(".")[1] if origin is not None and origin.op.count(".") >= 1 else ""
        return origin if any(word in op for word in _OPS.get(found.kind, ())) else None

    def tied_to(self, origin: Origin | None, found: Found) -> str | None:
        """The layer that already reads this layer's weight parameter, or None (and the parameter is claimed)."""
        weight = origin.param("weight") if origin is not None else None
        if origin is None or weight is None:
            return None
        first = self.readers.get(weight)
        if first is not None:
            self.tied.append(f"{origin.module or found.node.name} reads {weight} as {first} does")
        return first

    def claim(self, origin: Origin | None, name: str, found: Found) -> None:
        if origin is None or not origin.module:
            return
        weight = origin.param("weight")
        if weight is not None:
            self.readers[weight] = name
        self.counts["named"] += 1
        if found.kind is LayerKind.LINEAR and self.in_out(origin):
            self.counts["in_out"] += 1
        bias = origin.param("bias")
        w = found.params.get("weight")
        if bias is not None and "bias" not in found.params and w is not None and found.kind is not LayerKind.EMBEDDING:
            import torch

            n = w.shape[1] if self.in_out(origin) and found.kind is LayerKind.LINEAR else w.shape[0]
            found.params["bias"] = TensorRef.from_tensor(bias, torch.zeros(n))
            self.zero_bias.append(name)

    def notes(self) -> list[str]:
        if not self.counts["named"]:
            return []
        c = self.counts
        out = [
            f"torch dynamo export: {c['named']} layer(s) named by their module path (the exporter's name scopes);"
            f" {c['norm']} norm weight(s) read from a Mul in a norm module; {c['in_out']} weight(s) read by"
            " aten.addmm kept (in, out), as their modules hold them"
        ]
        if self.tied:
            out.append(f"tied weights, one layer each (the first reader): {'; '.join(self.tied)}")
        if self.zero_bias:
            out.append(f"bias read by the traced call but absent from the graph (no bias computed), read as zeros:"
                       f" {', '.join(self.zero_bias)}")  # fmt: skip
        return out


def _load(path: Path) -> LayerGraph:
    model = _parse(path)
    ctx = _Context(path, files=[path])
    repaired, first = _repair_text(model)
    if repaired:
        ctx.notes.append(
            f"{repaired} text field(s) are not UTF-8 (invalid ONNX), read with \\x escapes (first: {first})"
        )
    graphs = _graphs(model, ctx)
    modules = _Modules(model)
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
            origin = modules.origins.get(i) if g.parent is None else None
            try:
                found = recognise(g, i, node, consumers, ctx.notes, in_out=modules.in_out(origin))
                if found is None and node.op_type == "Mul":
                    found = modules.norm_scale(g, i, node, origin)
            except Unusable as exc:
                ctx.notes.append(f"{label}: {exc}; not a layer")
                continue
            if found is None:
                continue
            origin = modules.fits(origin, found)
            if modules.tied_to(origin, found) is not None:
                continue
            name = layer_name(found, i, used_names, origin.module if origin is not None else "")
            modules.claim(origin, name, found)
            if g.parent is not None:
                found.attrs["subgraph"] = g.origin
                sub_layers += 1
            layers.append(Layer(name, found.kind, found.params, found.attrs, source=node.name))
            used_tensors.update(t.name for t in found.params.values())
            if g.parent is None:
                sites.append(
                    LayerSite(name, found.in_node, found.out_node, found.data_input, found.channels, found.rank)
                )
    ctx.notes.extend(modules.notes())
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
    model's folder; no other exception escapes (an unanticipated one becomes
    :class:`~auditor.errors.LoaderBugError`).
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
    except Exception as exc:  # a corner the checks missed: one line for the user, a bug for the fuzz tests
        problem = " ".join(str(exc).split())[:200]
        raise LoaderBugError(p, f"could not be read as ONNX: {type(exc).__name__}: {problem}") from None


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
