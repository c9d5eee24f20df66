"""Channel spaces of a layer graph and the pure tensor operations that move, drop or pad channels.

A *channel space* is one set of output channels that several layers must keep
in the same order for the model to compute the same function: the layers
that produce it (convolutions, linear layers; both branches of a residual
add), the per-channel layers that run on it (batch-norm, layer-norm,
depthwise convolution) and the layers that consume it (their input channels,
at an offset after a concatenation, as blocks of ``H*W`` features after a
flatten). :func:`channel_spaces` reads them off a graph's edges.

:func:`apply_channel_maps` applies one index per space to a dict of tensors:
entry ``j`` of the index names the old channel that becomes channel ``j``, or
``-1`` for a new channel filled with zeros. The same function restores a
suspect (the index undoes a permutation, drops added channels, pads cut-off
ones) and builds the attacks it is tested on (a random permutation; an index
with ``-1`` entries adds channels, which an attack then fills). Nothing here
changes its inputs: every result is a new tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from auditor.errors import UsageError
from auditor.graph import Edge, Layer, LayerGraph, LayerKind, TensorRef

__all__ = [
    "DEFAULT_EPS",
    "PRODUCER_KINDS",
    "Consumer",
    "Space",
    "Tensors",
    "apply_channel_maps",
    "channel_spaces",
    "graph_with_tensors",
    "input_params",
    "is_pass_through",
    "take",
    "tensors_of",
]

#: ``layer name -> role -> tensor``: the weights an operation reads and returns.
Tensors = dict[str, dict[str, torch.Tensor]]

#: PyTorch's batch-norm epsilon, for a batch-norm whose file does not record its own.
DEFAULT_EPS = 1e-5
#: Layers whose output channels can be reordered (each output row is one channel).
PRODUCER_KINDS = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR)
_CONV = (LayerKind.CONV1D, LayerKind.CONV2D)
_RECURRENT = (LayerKind.LSTM, LayerKind.GRU)
#: Fill of a padded (new) channel per role of a per-channel layer: a zero channel that divides by nothing.
_FILL = {"running_var": 1.0}


@dataclass(frozen=True)
class Consumer:
    """A layer reading a space: its input feature ``offset`` and ``block`` features per channel."""

    layer: str
    offset: int
    block: int = 1


@dataclass
class Space:
    """One channel space (see the module docstring). ``frozen`` says why its order must stay, or is empty."""

    id: int
    width: int
    producers: list[str] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    frozen: str = ""


def _groups(layer: Layer) -> int:
    # Only a file's own record counts: groups inferred from a bare state dict's shapes are guesses
    # that a wrong neighbour in file order produces (a 32 -> 64 convolution taken for groups=2).
    return int(layer.attrs.get("groups", 1))


def is_pass_through(layer: Layer) -> bool:
    """Whether ``layer`` maps each channel to itself (batch-norm, layer-norm over features, depthwise conv)."""
    if layer.kind in (LayerKind.BATCH_NORM, LayerKind.LAYER_NORM):
        w = layer.weight
        return w is not None and len(w.shape) == 1
    if layer.kind in _CONV and layer.weight is not None and len(layer.weight.shape) >= 3:
        groups = int(layer.attrs.get("groups", layer.attrs.get("groups_inferred", 1)))
        return groups > 1 and layer.weight.shape[1] == 1 and groups == layer.weight.shape[0]
    return False


def input_params(layer: Layer) -> list[str]:
    """The roles whose axis 1 runs over the layer's input channels or features."""
    if layer.kind in _RECURRENT:
        return [r for r in layer.params if r.startswith("weight_ih_l0")]
    if layer.kind in (*_CONV, LayerKind.LINEAR) and layer.weight is not None and len(layer.weight.shape) >= 2:
        return ["weight"]
    return []


def _input_width(layer: Layer) -> int | None:
    roles = input_params(layer)
    return layer.params[roles[0]].shape[1] if roles else None


def _width(layer: Layer) -> int:
    w = layer.weight
    return int(w.shape[0]) if w is not None and w.shape else 0


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(b)] = self.find(a)


def channel_spaces(graph: LayerGraph, edges: Iterable[Edge] | None = None) -> list[Space]:
    """The channel spaces of ``graph`` following ``edges`` (the graph's own by default), in layer order.

    Producers feeding the same consumer at the same offset (a residual add)
    share one space; a per-channel layer joins the space it reads. A space is
    frozen when its order cannot move: a recurrent or unknown producer, a
    grouped convolution or an unreadable layout reading it, or no known reader
    (the model's output, or a graph without edges).
    """
    layers = {layer.name: layer for layer in graph.layers}
    edge_list = [e for e in (graph.edges if edges is None else edges) if e.src in layers and e.dst in layers]
    uf = _UnionFind()
    for layer in graph.layers:
        uf.find(layer.name)
    by_input: dict[tuple[str, int | None], list[str]] = {}
    for e in edge_list:
        if is_pass_through(layers[e.dst]):
            uf.union(e.src, e.dst)
        else:
            by_input.setdefault((e.dst, e.offset), []).append(e.src)
    for srcs in by_input.values():
        for src in srcs[1:]:
            uf.union(srcs[0], src)
    members: dict[str, list[Layer]] = {}
    for layer in graph.layers:
        members.setdefault(uf.find(layer.name), []).append(layer)
    spaces: dict[str, Space] = {}
    for root, group in members.items():
        producers = [m.name for m in group if m.kind in PRODUCER_KINDS and not is_pass_through(m)]
        passthrough = [m.name for m in group if is_pass_through(m)]
        if not producers and not passthrough:
            continue
        space = Space(len(spaces), _width(layers[(producers or passthrough)[0]]), producers, passthrough)
        others = [m.name for m in group if m.name not in producers and m.name not in passthrough]
        if others:
            space.frozen = f"produced by {', '.join(others)}, whose channels are not reordered"
        elif not producers:
            space.frozen = "no layer produces it (it carries the model's input)"
        elif len({_width(layers[n]) for n in producers + passthrough}) > 1:
            space.frozen = "its layers disagree about its width"
        spaces[root] = space
    for (dst, offset), srcs in by_input.items():
        read = spaces.get(uf.find(srcs[0]))
        if read is not None:
            widths = {e.offset: sp.width for e in edge_list if e.dst == dst and (sp := spaces.get(uf.find(e.src)))}
            _add_consumer(read, layers[dst], offset, widths)
    for space in spaces.values():
        if not space.consumers and not space.frozen:
            space.frozen = "no layer is known to read it (the model's output, or edges are missing)"
    return list(spaces.values())


def _add_consumer(space: Space, dst: Layer, offset: int | None, widths: dict[int | None, int]) -> None:
    """Record ``dst`` reading ``space`` at ``offset``; ``widths`` are the spaces arriving at each of dst's offsets."""
    width_in = _input_width(dst)
    if width_in is None:
        space.frozen = space.frozen or f"read by {dst.name}, whose input weights are not understood"
        return
    if dst.kind in _CONV and _groups(dst) > 1:
        space.frozen = space.frozen or f"read by the grouped convolution {dst.name}"
        return
    if offset is None:
        space.frozen = space.frozen or f"read by {dst.name} at an offset the graph does not give"
        return
    # Distinct spaces arriving at distinct offsets (a concatenation) share dst's input; after a flatten
    # every channel is a block of width_in / (total channels) features.
    total = sum(widths.values())
    if not total or width_in % total:
        space.frozen = space.frozen or f"read by {dst.name}, whose {width_in} inputs do not split into its channels"
        return
    block = width_in // total
    if (offset + space.width) * block > width_in:
        space.frozen = space.frozen or f"read by {dst.name} past the end of its input"
        return
    consumer = Consumer(dst.name, offset * block, block)
    if consumer not in space.consumers:
        space.consumers.append(consumer)


def take(tensor: torch.Tensor, index: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
    """``tensor`` gathered along ``dim`` by ``index``; entries ``-1`` give slices filled with ``fill``."""
    out = tensor.index_select(dim, index.clamp(min=0))
    missing = (index < 0).nonzero().flatten()
    if missing.numel():
        out.index_fill_(dim, missing, fill)
    return out


def _feature_index(index: torch.Tensor, block: int) -> torch.Tensor:
    """Channel index -> feature index when each channel is ``block`` consecutive features."""
    if block == 1:
        return index
    feats = index[:, None] * block + torch.arange(block)
    return torch.where(index[:, None] < 0, torch.full_like(feats, -1), feats).flatten()


def _check(index: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if index.dtype != torch.long or index.ndim != 1:
        raise UsageError(f"channel map of {what} must be a 1-d integer index")
    if index.numel() and (int(index.max()) >= width or int(index.min()) < -1):
        raise UsageError(f"channel map of {what} names a channel outside 0..{width - 1}")
    return index


def apply_channel_maps(
    graph: LayerGraph, tensors: Mapping[str, Mapping[str, torch.Tensor]], spaces: Iterable[Space],
    maps: Mapping[int, torch.Tensor],
) -> Tensors:  # fmt: skip
    """New tensors with each space's channels rearranged by ``maps[space.id]``.

    Producers' output rows and biases, the per-channel layers' parameters and
    running statistics, and the consumers' input columns (at their offset, in
    blocks after a flatten) all follow the index. Layers absent from
    ``tensors`` are skipped, so a partial dict works. A frozen space in
    ``maps`` raises :class:`~auditor.errors.UsageError`.
    """
    layers = {layer.name: layer for layer in graph.layers}
    out: Tensors = {name: dict(params) for name, params in tensors.items()}
    consumer_jobs: list[tuple[int, Consumer, Space, torch.Tensor]] = []
    for space in spaces:
        if space.id not in maps:
            continue
        if space.frozen:
            raise UsageError(f"channel space of {', '.join(space.producers or space.passthrough)} is frozen: "
                             f"{space.frozen}")  # fmt: skip
        index = _check(maps[space.id], space.width, ", ".join(space.producers))
        for name in space.producers + space.passthrough:
            if name not in out:
                continue
            params = out[name]
            for role in list(params):
                t = params[role]
                if t.ndim >= 1 and t.shape[0] == space.width and role != "num_batches_tracked":
                    params[role] = take(t, index, 0, _FILL.get(role, 0.0) if name in space.passthrough else 0.0)
        consumer_jobs += [(c.offset, c, space, index) for c in space.consumers]
    # Later offsets first: resizing one segment then never moves a segment still to be done.
    for _, consumer, space, index in sorted(consumer_jobs, key=lambda j: (j[1].layer, -j[0])):
        if consumer.layer not in out:
            continue
        params = out[consumer.layer]
        feats = _feature_index(index, consumer.block) + consumer.offset
        feats = torch.where(feats < consumer.offset, torch.full_like(feats, -1), feats)
        for role in input_params(layers[consumer.layer]):
            if role not in params:
                continue
            t = params[role]
            end = consumer.offset + space.width * consumer.block
            parts = [t.narrow(1, 0, consumer.offset), take(t, feats, 1), t.narrow(1, end, t.shape[1] - end)]
            params[role] = torch.cat(parts, dim=1)
    return out


def tensors_of(graph: LayerGraph, names: Iterable[str] | None = None) -> Tensors:
    """Copies of the parameters of the named layers (all by default), floating ones as float32."""
    wanted = None if names is None else set(names)
    return {
        layer.name: {role: _read(ref) for role, ref in layer.params.items()}
        for layer in graph.layers
        if wanted is None or layer.name in wanted
    }


def _read(ref: TensorRef) -> torch.Tensor:
    # Counters such as num_batches_tracked keep their integer type; stored weights become float32.
    real = ref.quantization is not None or ref.dtype.startswith(("float", "bfloat"))
    return ref.read(float32=real).clone()


def graph_with_tensors(
    graph: LayerGraph, tensors: Mapping[str, Mapping[str, torch.Tensor]], *, layers: list[Layer] | None = None,
    edges: list[Edge] | None = None, note: str | None = None,
) -> LayerGraph:  # fmt: skip
    """A new graph like ``graph`` (or with ``layers``/``edges`` instead) in which every layer named in
    ``tensors`` holds exactly the roles given there (a role left out is removed); every layer is a
    copy, so the input graph is never changed.

    A replaced tensor keeps the stored name of the one it replaces; a new role gets ``layer.role``."""
    new_layers: list[Layer] = []
    for layer in graph.layers if layers is None else layers:
        params = dict(layer.params)
        if layer.name in tensors:
            params = {
                role: TensorRef.from_tensor(params[role].name if role in params else f"{layer.name}.{role}", value)
                for role, value in tensors[layer.name].items()
            }
        new_layers.append(dataclasses.replace(layer, params=params, attrs=dict(layer.attrs)))
    return dataclasses.replace(
        graph,
        layers=new_layers,
        edges=list(graph.edges if edges is None else edges),
        files=list(graph.files),
        metadata=dict(graph.metadata),
        notes=[*graph.notes, *([note] if note else [])],
    )
