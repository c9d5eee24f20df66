"""Data-flow tracing over an ONNX node list: which layer's output reaches which layer's input.

The restore stage carries a channel permutation from a layer to every layer
that consumes its output (shared/specs/restore.md), so it needs to know, for
each parameterised layer, which earlier layers feed it through parameter-free
operations (activations, pooling, residual adds, concatenations, flattens).
This module computes exactly that, iteratively (a hostile file may chain
100,000 nodes) and without trusting the file's node order: nodes are put in
topological order here, and nodes on a cycle or reading undefined values are
left out with a note instead of hanging or crashing.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from auditor.graph import Edge, EdgeSource

__all__ = ["LayerSite", "NodeInfo", "trace_edges", "PASS_THROUGH", "ELEMENTWISE"]

#: Single-data-input operations that keep each channel where it is (only the
#: first input carries data; the others are shapes, slopes or bounds).
_KEEP_CHANNELS = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "Gelu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
        "HardSigmoid", "HardSwish", "Mish", "Swish", "Clip", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Dropout",
        "Identity", "Pad", "Resize", "Upsample", "Cast", "CastLike", "Softmax", "LogSoftmax", "LRN",
        "DepthToSpace", "SpaceToDepth",
    }
)
#: Single-data-input operations that move data around: the channel count is
#: known afterwards only from the file's shape information.
_RESHAPING = frozenset(
    {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Expand", "Tile", "ReduceMean", "ReduceMax",
     "ReduceSum", "ReduceMin", "GatherElements"}
)
#: Operations after which the position of a channel is unknown (offset None).
_LOSE_OFFSET = frozenset({"Slice", "Split"})
#: Elementwise operations of several activations (residual add): every input's producers flow on.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where", "Pow"})
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
        notes.append(f"the graph reads {len(undefined)} value(s) that nothing defines ({shown}); they carry no layer output")
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
            if any(flows.get(n) for n in node.inputs if n):
                stopped[node.op_type] = stopped.get(node.op_type, 0) + 1
            continue
        pairs += len(merged) * max(1, len(node.outputs))
        if pairs > MAX_PAIRS:
            notes.append(f"the graph is too large to trace fully (over {MAX_PAIRS:,d} value-layer pairs); later edges are missing")
            break
        for out in node.outputs:
            if out:
                flows[out] = merged
        _propagate_shape(node, channels, ranks)
    for op, count in sorted(stopped.items()):
        notes.append(f"edges stop at {count} {op} node(s): auditor does not trace data flow through {op}")
    return list(edges.values())


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
    for out in node.outputs:
        if out:
            channels.setdefault(out, width)
            ranks.setdefault(out, rank)
