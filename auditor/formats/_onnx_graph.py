"""Graph structure of an ONNX model: weight paths into nodes and data flow between layers.

Two walks over the node graph live here, both iterative and both safe on
hostile input:

* weight paths (:func:`resolve`, :func:`make_ref`): from a node's weight input
  back to the stored tensor, through Identity, Cast, Transpose, Reshape and
  DequantizeLinear, ending in a lazy :class:`~auditor.graph.TensorRef` whose
  transform reaches the canonical layout (and whose quantization follows it);
* data flow (:func:`trace_edges`): which layer's output reaches which layer's
  input. The restore stage carries a channel permutation from a layer to
  every layer that consumes its output (docs/design/restore.md), through
  activations, pooling, residual adds, concatenations and flattens. A hostile
  file may chain 100,000 nodes, so nothing recurses; nodes are put in
  topological order here, and a cycle or a value nothing defines becomes a
  note instead of a hang or a crash.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from auditor.graph import Edge, EdgeSource, Quantization, TensorRef

if TYPE_CHECKING:  # numpy and torch load with the first ONNX file, not when the format registers
    import numpy as np
    import torch

__all__ = [
    "ELEMENTWISE",
    "PASS_THROUGH",
    "LayerSite",
    "NodeInfo",
    "Param",
    "Scope",
    "StoredTensor",
    "Unusable",
    "attr_value",
    "float_attr",
    "int_attr",
    "integer_weight",
    "ints_attr",
    "make_ref",
    "plan_steps",
    "resolve",
    "trace_edges",
]

# Attribute types (AttributeProto.AttributeType).
A_FLOAT, A_INT, A_STRING, A_TENSOR, A_GRAPH, A_FLOATS, A_INTS, A_STRINGS, A_GRAPHS = 1, 2, 3, 4, 5, 6, 7, 8, 10

#: Single-data-input operations that keep each channel where it is (only the
#: first input carries data; the others are shapes, slopes or bounds).
_KEEP_CHANNELS = frozenset(
    "Relu Sigmoid Tanh Gelu LeakyRelu PRelu Elu Selu Celu Softplus Softsign HardSigmoid HardSwish Mish Swish Clip "
    "Erf Abs Neg Exp Log Sqrt Reciprocal MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool "
    "Dropout Identity Pad Resize Upsample Cast CastLike Softmax LogSoftmax LRN DepthToSpace SpaceToDepth "
    "QuantizeLinear DequantizeLinear DynamicQuantizeLinear".split()
)
#: Operations whose first output alone carries the data (DynamicQuantizeLinear's others are its scale and zero point).
_FIRST_OUTPUT_ONLY = frozenset({"DynamicQuantizeLinear"})
#: Single-data-input operations that move data around: the channel count is
#: known afterwards only from the file's shape information.
_RESHAPING = frozenset(
    "Flatten Reshape Transpose Squeeze Unsqueeze Gather Expand Tile ReduceMean ReduceMax ReduceSum ReduceMin "
    "GatherElements".split()
)
#: Operations after which the position of a channel is unknown (offset None).
_LOSE_OFFSET = frozenset({"Slice", "Split"})
#: Elementwise operations of several activations (residual add): every input's producers flow on.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where", "Pow"})
#: Operations that read only an activation's shape or positions: the flow ends there quietly.
_NO_DATA = frozenset({"Shape", "Size", "ConstantOfShape", "EyeLike", "NonZero", "ArgMax", "ArgMin", "TopK"})
#: Every operation the tracer looks through.
PASS_THROUGH = _KEEP_CHANNELS | _RESHAPING | _LOSE_OFFSET | ELEMENTWISE | {"Concat"}

#: Above this many (value, producer) pairs the trace stops: a hostile graph
#: could otherwise make every value carry every layer (quadratic work).
MAX_PAIRS = 2_000_000

# A path of operation names shared between values: (op, previous) or None.
_Via = tuple[str, "_Via"] | None


@dataclass(frozen=True)
class NodeInfo:
    """What the tracer needs of one node: its type, name, inputs, outputs and Concat/Flatten axis."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axis: int | None = None


@dataclass
class LayerSite:
    """Where a parameterised layer sits in the node list.

    ``in_node`` reads the layer's data input ``data_input`` (empty for an
    embedding, whose input is indices); ``out_node`` writes its outputs (the
    bias Add after a MatMul, otherwise the same node); ``channels`` is the
    output width when it is a channel count (conv, linear, norms).
    """

    name: str
    in_node: int
    out_node: int
    data_input: str
    channels: int | None = None
    rank: int | None = None
    absorbed: set[int] = field(default_factory=set)


def _via_tuple(via: _Via) -> tuple[str, ...]:
    ops: list[str] = []
    while via is not None:
        ops.append(via[0])
        via = via[1]
    return tuple(reversed(ops))


def _topological(nodes: Sequence[NodeInfo], known: set[str], notes: list[str]) -> list[int]:
    """Node indices in an order where every value is written before it is read.

    Valid ONNX is already in that order and is kept as it is; otherwise
    Kahn's algorithm (smallest index first, so the result is deterministic)
    orders what it can and nodes on a cycle are left out. A value nothing
    defines simply carries no layer's output.
    """
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.outputs:
            if out and out not in producer:
                producer[out] = i
    undefined = {n for node in nodes for n in node.inputs if n and n not in known and n not in producer}
    if undefined:
        shown = ", ".join(repr(u) for u in sorted(undefined)[:3])
        notes.append(
            f"the graph reads {len(undefined)} value(s) that nothing defines ({shown}); they carry no layer output"
        )
    defined = set(known) | undefined
    in_order = True
    for node in nodes:
        if any(n and n not in defined for n in node.inputs):
            in_order = False
            break
        defined.update(node.outputs)
    if in_order:
        return list(range(len(nodes)))
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in dict.fromkeys(node.inputs):
            src = producer.get(name) if name and name not in known else None
            if src is not None:
                waiting[i] += 1
                readers.setdefault(src, []).append(i)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        notes.append(f"{len(nodes) - len(order)} node(s) are on a cycle; edges through them are unknown")
    else:
        notes.append("the nodes are not in topological order (invalid ONNX); they were reordered for tracing")
    return order


def trace_edges(
    nodes: Sequence[NodeInfo],
    sites: Sequence[LayerSite],
    *,
    constants: set[str],
    graph_inputs: set[str],
    shapes: Mapping[str, tuple[int | None, ...]],
    notes: list[str],
) -> list[Edge]:
    """Edges between the layers in ``sites``, in the order the consuming nodes run.

    ``constants`` are initializer and Constant-node values (they carry no
    layer's output); ``shapes`` holds the file's static shape information
    (``None`` for an unknown dimension), used for Concat channel offsets.
    Between one producer and one consumer only the first path found is kept,
    so a permutation is never applied twice to the same input channels.
    """
    known = constants | graph_inputs
    order = _topological(nodes, known, notes)
    starts: dict[int, list[LayerSite]] = {}
    ends: dict[int, list[LayerSite]] = {}
    absorbed: set[int] = set()
    for site in sites:
        starts.setdefault(site.in_node, []).append(site)
        ends.setdefault(site.out_node, []).append(site)
        absorbed |= site.absorbed
    flows: dict[str, dict[str, tuple[_Via, int | None]]] = {}
    channels: dict[str, int | None] = {}
    ranks: dict[str, int | None] = {}
    for name, dims in shapes.items():
        ranks[name] = len(dims)
        if len(dims) >= 2:
            channels[name] = dims[1]
    edges: dict[tuple[str, str, int | None], Edge] = {}
    stopped: dict[str, int] = {}
    pairs = 0
    for i in order:
        node = nodes[i]
        for site in starts.get(i, ()):
            for src, (via, offset) in flows.get(site.data_input, {}).items():
                key = (src, site.name, offset)
                if key not in edges:
                    edges[key] = Edge(src, site.name, _via_tuple(via), offset, EdgeSource.GRAPH)
        if i in ends:
            for site in ends[i]:
                for out in node.outputs:
                    if out:
                        flows.setdefault(out, {})[site.name] = (None, 0)
                        channels.setdefault(out, site.channels)
                        ranks.setdefault(out, site.rank)
            continue
        if i in absorbed or i in starts:
            continue
        merged = _flow(node, flows, channels, ranks)
        if merged is None:
            if node.op_type not in _NO_DATA and any(flows.get(n) for n in node.inputs if n):
                stopped[node.op_type] = stopped.get(node.op_type, 0) + 1
            continue
        pairs += len(merged) * max(1, len(node.outputs))
        if pairs > MAX_PAIRS:
            notes.append(f"the graph is too large to trace fully (over {MAX_PAIRS:,d} value-layer pairs)")
            break
        for out in _data_outputs(node):
            if out:
                flows[out] = merged
        _propagate_shape(node, channels, ranks)
    for op, count in sorted(stopped.items()):
        notes.append(f"edges stop at {count} {op} node(s): auditor does not trace data flow through {op}")
    return list(edges.values())


def _data_outputs(node: NodeInfo) -> tuple[str, ...]:
    return node.outputs[:1] if node.op_type in _FIRST_OUTPUT_ONLY else node.outputs


def _flow(
    node: NodeInfo,
    flows: Mapping[str, dict[str, tuple[_Via, int | None]]],
    channels: Mapping[str, int | None],
    ranks: Mapping[str, int | None],
) -> dict[str, tuple[_Via, int | None]] | None:
    """Producers reaching ``node``'s outputs, or ``None`` when the tracer does not look through it."""
    op = node.op_type
    if op not in PASS_THROUGH:
        return None
    merged: dict[str, tuple[_Via, int | None]] = {}
    if op == "Concat":
        shift: int | None = 0
        axis = node.axis if node.axis is not None else 1
        for name in node.inputs:
            rank = ranks.get(name)
            norm = axis + rank if axis < 0 and rank is not None else axis
            for src, (via, offset) in flows.get(name, {}).items():
                if norm == 0:
                    new = offset  # a batch concat leaves channels alone
                elif norm == 1 and offset is not None and shift is not None:
                    new = offset + shift
                else:
                    new = None
                merged.setdefault(src, ((op, via), new))
            width = channels.get(name)
            shift = None if shift is None or width is None else shift + width
        return merged
    data = node.inputs if op in ELEMENTWISE else node.inputs[:1]
    for name in data:
        for src, (via, offset) in flows.get(name, {}).items():
            merged.setdefault(src, ((op, via), None if op in _LOSE_OFFSET else offset))
    return merged


def _propagate_shape(node: NodeInfo, channels: dict[str, int | None], ranks: dict[str, int | None]) -> None:
    """Static channel count and rank of the outputs, where the file did not state them."""
    op = node.op_type
    ins = [n for n in node.inputs if n]
    width: int | None = None
    rank: int | None = None
    if op in _KEEP_CHANNELS or op in ELEMENTWISE:
        width = next((channels[n] for n in ins if channels.get(n) is not None), None)
        rank = next((ranks[n] for n in ins if ranks.get(n) is not None), None)
    elif op == "Concat":
        widths = [channels.get(n) for n in ins]
        rank = next((ranks[n] for n in ins if ranks.get(n) is not None), None)
        axis = node.axis if node.axis is not None else 1
        if rank is not None and axis < 0:
            axis += rank
        if axis == 1 and all(w is not None for w in widths):
            width = sum(w for w in widths if w is not None)
        elif axis != 1:
            width = widths[0] if widths else None
    elif op == "Flatten" and (node.axis is None or node.axis == 1):
        rank = 2
    for out in _data_outputs(node):
        if out:
            channels.setdefault(out, width)
            ranks.setdefault(out, rank)


# ---------------------------------------------------------------- weight paths


@dataclass
class StoredTensor:
    """One stored tensor: initializer or Constant value, in its stored layout."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    origin: str


@dataclass
class Scope:
    """One graph (main or subgraph): its nodes, own tensors and the scope it sees."""

    proto: Any
    origin: str
    parent: Scope | None
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    def tensor(self, name: str) -> StoredTensor | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.tensors:
                return scope.tensors[name]
            if name in scope.producers:
                return None  # shadowed by a computed value
            scope = scope.parent
        return None

    def producer(self, name: str) -> Any:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.producers:
                return scope.producers[name]
            scope = scope.parent
        return None


def attr_value(a: Any) -> Any:
    """A plain Python value of an attribute (graphs and tensors are handled elsewhere)."""
    kinds: dict[int, Callable[[Any], Any]] = {
        A_FLOAT: lambda a: float(a.f),
        A_INT: lambda a: int(a.i),
        A_STRING: lambda a: a.s.decode("utf-8", "replace"),
        A_FLOATS: lambda a: [float(v) for v in a.floats],
        A_INTS: lambda a: [int(v) for v in a.ints],
        A_STRINGS: lambda a: [v.decode("utf-8", "replace") for v in a.strings],
    }
    read = kinds.get(a.type)
    return None if read is None else read(a)


class Unusable(Exception):
    """A weight reaches its node in a way auditor cannot express as a lazy reference."""


def _wrong(name: str, value: Any, want: str) -> Unusable:
    got = "an attribute of another type" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    return Unusable(f"attribute {name!r} is {got}, not {want}")


def int_attr(attrs: Mapping[str, Any], name: str, default: int) -> int:
    """Attribute ``name`` (from :func:`attr_value`) as an integer; Unusable when the file stored another type."""
    value = attrs.get(name, default)
    if type(value) is not int:
        raise _wrong(name, value, "an integer")
    return value


def float_attr(attrs: Mapping[str, Any], name: str, default: float) -> float:
    """Attribute ``name`` as a finite number; Unusable when it is another type, NaN or infinite."""
    value = attrs.get(name, default)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _wrong(name, value, "a finite number")
    return float(value)


def ints_attr(attrs: Mapping[str, Any], name: str) -> list[int] | None:
    """Attribute ``name`` as a list of integers, ``None`` when absent; Unusable when it is another type."""
    if name not in attrs:
        return None
    value = attrs[name]
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise _wrong(name, value, "a list of integers")
    return value


# A step maps a tensor towards the canonical layout: ("perm", dims), ("reshape", shape),
# ("select", index on axis 0), ("rows", start, stop on axis 0), ("blocks", gate order on axis 0), ("scale", factor).
Step = tuple[Any, ...]


@dataclass
class Param:
    """A stored tensor, the steps to its node's input and the quantization met on the way."""

    base: StoredTensor
    seen_as: str
    steps: list[Step] = field(default_factory=list)
    quant: Quantization | None = None


def _small(t: StoredTensor, what: str, limit: int = 1 << 20) -> np.ndarray:
    if math.prod(t.shape) > limit:
        raise Unusable(f"{what} {t.name!r} has {math.prod(t.shape)} elements")
    import torch

    tensor = t.read()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _dequantize_linear(g: Scope, node: Any, base: StoredTensor) -> Quantization:
    import numpy as np

    attrs = {a.name: attr_value(a) for a in node.attribute}
    if attrs.get("block_size"):
        raise Unusable("blocked DequantizeLinear")
    scale_t = g.tensor(node.input[1]) if len(node.input) > 1 else None
    if scale_t is None:
        raise Unusable("DequantizeLinear scale is not a constant")
    scale = _small(scale_t, "scale").astype(np.float32)
    zero_t = g.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    zero = _small(zero_t, "zero point") if zero_t is not None else np.zeros(scale.shape, dtype=np.int64)
    if scale.size == 1 and scale.ndim <= 1:
        if zero.size != 1:
            raise Unusable(f"DequantizeLinear zero point of shape {list(zero.shape)} does not fit a single scale")
        return Quantization(scale.reshape(()), zero.reshape(()), None)
    axis = int_attr(attrs, "axis", 1)
    axis = axis + len(base.shape) if axis < 0 else axis
    if (
        scale.ndim != 1
        or not 0 <= axis < len(base.shape)
        or scale.shape[0] != base.shape[axis]
        or zero.shape != scale.shape
    ):
        raise Unusable(f"DequantizeLinear scale of shape {list(scale.shape)} does not fit {list(base.shape)}")
    return Quantization(scale, zero, axis)


_INTEGER_WEIGHTS = ("int8", "uint8")
_FLOATS = ("float32", "float16", "bfloat16", "float64")


def integer_weight(g: Scope, name: str, scale: StoredTensor | None, zero_name: str, out_axis: int) -> Param | None:
    """The int8/uint8 weight ``name`` of an integer operation (ConvInteger, MatMulInteger, QLinearConv,
    QLinearMatMul) with its quantization: ``scale`` (the weight's own, found by the caller) and the zero
    point ``zero_name`` (empty: 0), each one value or one per output channel, which runs along
    ``out_axis`` of the node's weight input (0 for a kernel, 1 for a ``[K, N]`` matrix).

    ``None`` when the weight is computed; Unusable when the weight, scale or zero point do not fit.
    """
    import numpy as np

    p = resolve(g, name)
    if p is None:
        return None
    if p.quant is not None:
        raise Unusable("the integer weight is read through DequantizeLinear")
    if p.base.dtype not in _INTEGER_WEIGHTS:
        raise Unusable(f"weight {p.base.name!r} is {p.base.dtype}, not int8 or uint8")
    shape, _ = plan_steps(p.base.shape, p.steps)
    if len(shape) <= out_axis:
        raise Unusable(f"weight {p.base.name!r} of shape {list(shape)} has no axis {out_axis} of output channels")
    channels = shape[out_axis]
    if scale is None:
        raise Unusable(f"the scale of weight {p.base.name!r} is not a constant")
    if scale.dtype not in _FLOATS:
        raise Unusable(f"scale {scale.name!r} is {scale.dtype}, not floating point")
    zero_t = g.tensor(zero_name) if zero_name else None
    if zero_name and zero_t is None:
        raise Unusable(f"the zero point of weight {p.base.name!r} is not a constant")
    if zero_t is not None and zero_t.dtype not in (*_INTEGER_WEIGHTS, "int32", "int16", "uint16"):
        raise Unusable(f"zero point {zero_t.name!r} is {zero_t.dtype}, not integers")
    s = _small(scale, "scale").astype(np.float32)
    z = _small(zero_t, "zero point") if zero_t is not None else np.zeros((), dtype=np.int64)
    for what, arr in (("scale", s), ("zero point", z)):
        if sum(d != 1 for d in arr.shape) > 1 or arr.size not in (1, channels):
            raise Unusable(
                f"{what} of shape {list(arr.shape)} does not fit weight {p.base.name!r} of shape {list(shape)}"
                f" ({channels} output channels)"
            )
    if not np.isfinite(s).all():
        raise Unusable(f"scale {scale.name!r} is not finite")
    if s.size == 1 and z.size == 1:
        return Param(p.base, p.seen_as, p.steps, Quantization(s.reshape(()), z.reshape(()), None))
    if p.steps:
        raise Unusable(f"per-channel scale of weight {p.base.name!r}, which is reshaped or transposed on the way")
    s = np.broadcast_to(s.reshape(-1), (channels,)).copy()
    z = np.broadcast_to(z.reshape(-1), (channels,)).copy()
    return Param(p.base, p.seen_as, p.steps, Quantization(s, z, out_axis))


def resolve(g: Scope, name: str) -> Param | None:
    """The stored tensor behind value ``name``, looking through Identity, Cast, Transpose, Reshape, DequantizeLinear."""
    if not name:
        return None
    steps: list[Step] = []  # outermost first while walking back
    dq: Any = None
    current = name
    for _ in range(64):
        t = g.tensor(current)
        if t is not None:
            steps.reverse()
            quant = None
            if dq is not None:
                quant = _dequantize_linear(g, dq, t)
            return Param(t, name, steps, quant)
        node = g.producer(current)
        if node is None or not node.input:
            return None
        op = node.op_type
        if op == "Transpose":
            perm = ints_attr({a.name: attr_value(a) for a in node.attribute}, "perm")
            steps.append(("perm", tuple(perm) if perm is not None else None))
        elif op == "Reshape":
            shape_t = g.tensor(node.input[1]) if len(node.input) > 1 else None
            if shape_t is None:
                return None
            if shape_t.dtype not in ("int64", "int32", "int16", "int8", "uint8"):
                raise Unusable(f"Reshape shape {shape_t.name!r} is {shape_t.dtype}, not integers")
            steps.append(("reshape", tuple(int(v) for v in _small(shape_t, "shape", 64).reshape(-1))))
        elif op == "DequantizeLinear":
            if dq is not None:
                raise Unusable("two DequantizeLinear nodes in a row")
            dq = node
            current = node.input[0]
            # The quantization axis refers to DequantizeLinear's input, so the tensor must be that input.
            if g.tensor(current) is None:
                raise Unusable("DequantizeLinear of a computed value")
            continue
        elif op not in ("Identity", "Cast"):
            return None
        current = node.input[0]
    return None


def plan_steps(shape: tuple[int, ...], steps: list[Step]) -> tuple[tuple[int, ...], list[Step]]:
    """The shape after ``steps`` and the steps with Transpose/Reshape defaults resolved; Unusable if they do not fit."""
    resolved: list[Step] = []
    for original in steps:
        step, kind = original, original[0]
        if kind == "perm":
            perm = step[1] if step[1] is not None else tuple(reversed(range(len(shape))))
            if sorted(perm) != list(range(len(shape))):
                raise Unusable(f"permutation {list(perm)} does not fit shape {list(shape)}")
            shape = tuple(shape[p] for p in perm)
            step = ("perm", perm)
        elif kind == "reshape":
            target = [shape[i] if v == 0 and i < len(shape) else v for i, v in enumerate(step[1])]
            if target.count(-1) == 1:
                rest = math.prod(v for v in target if v != -1)
                if rest <= 0 or math.prod(shape) % rest:
                    raise Unusable(f"cannot reshape {list(shape)} to {list(step[1])}")
                target[target.index(-1)] = math.prod(shape) // rest
            if (
                any(v < 0 for v in target)
                or math.prod(target) != math.prod(shape)
                or math.prod(max(v, 1) for v in target) >= 2**62  # an empty tensor of huge dimensions
            ):
                raise Unusable(f"cannot reshape {list(shape)} to {list(step[1])}")
            shape = tuple(target)
            step = ("reshape", shape)
        elif kind == "select":
            if not shape or not 0 <= step[1] < shape[0]:
                raise Unusable(f"index {step[1]} out of range for shape {list(shape)}")
            shape = shape[1:]
        elif kind == "rows":
            if not shape or step[2] > shape[0]:
                raise Unusable(f"rows {step[1]}..{step[2]} out of range for shape {list(shape)}")
            shape = (step[2] - step[1], *shape[1:])
        elif kind == "blocks" and (not shape or shape[0] % len(step[1])):
            raise Unusable(f"{shape[0] if shape else 0} rows do not split into {len(step[1])} gates")
        resolved.append(step)
    return shape, resolved


def _apply(tensor: torch.Tensor, steps: list[Step]) -> torch.Tensor:
    for step in steps:
        kind = step[0]
        if kind == "perm":
            tensor = tensor.permute(step[1])
        elif kind == "reshape":
            tensor = tensor.reshape(step[1])
        elif kind == "select":
            tensor = tensor[step[1]]
        elif kind == "rows":
            tensor = tensor[step[1] : step[2]]
        elif kind == "blocks":
            n = len(step[1])
            tensor = tensor.reshape(n, tensor.shape[0] // n, *tensor.shape[1:])[list(step[1])].reshape(tensor.shape)
        elif kind == "scale":
            tensor = tensor * step[1]
    return tensor


def _quant_through(q: Quantization, steps: list[Step]) -> Quantization:
    """The quantization of the canonical tensor: the per-channel scale follows the steps."""
    import numpy as np

    scale, zero, axis = np.asarray(q.scale), np.asarray(q.zero_point), q.axis
    for step in steps:
        kind = step[0]
        if kind == "scale":
            scale = scale * np.float32(step[1])
        elif axis is None:
            continue
        elif kind == "perm":
            axis = list(step[1]).index(axis)
        elif kind == "reshape":
            raise Unusable("Reshape of a per-axis quantized weight")
        elif kind == "select":
            if axis == 0:
                scale, zero, axis = scale[step[1]], zero[step[1]], None
            else:
                axis -= 1
        elif kind == "rows" and axis == 0:
            scale, zero = scale[step[1] : step[2]], zero[step[1] : step[2]]
        elif kind == "blocks" and axis == 0:
            n = len(step[1])
            scale = scale.reshape(n, -1)[list(step[1])].reshape(-1)
            zero = zero.reshape(n, -1)[list(step[1])].reshape(-1)
    return Quantization(scale, zero, axis)


def make_ref(p: Param, extra: list[Step] | None = None) -> TensorRef:
    """A lazy TensorRef of ``p`` in canonical layout (``extra`` are the layer's own steps)."""
    steps = p.steps + (extra or [])
    if (
        p.quant is None
        and p.base.dtype not in ("float32", "float16", "bfloat16", "float64")
        and any(s[0] == "scale" for s in steps)
    ):
        raise Unusable("scaling of an integer weight")
    shape, steps = plan_steps(p.base.shape, steps)
    if p.quant is not None:
        quant: Quantization | None = _quant_through(p.quant, steps)
        steps = [s for s in steps if s[0] != "scale"]  # folded into the scale instead
    else:
        quant = None
    read = p.base.read
    return TensorRef(
        p.base.name,
        shape,
        p.base.dtype,
        read,
        transform=(lambda t: _apply(t, steps)) if steps else None,
        quantization=quant,
    )
