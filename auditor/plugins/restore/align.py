"""Which suspect layer is which reference layer, and whose edges say who reads whom.

Names prove nothing (an ONNX export renames weights, or keeps a name on
values it changed), so layers are paired by kind, kernel shape and position,
with an equal name only breaking ties; channel counts may differ (cut-off,
expansion). One exception: where every suspect layer of a kind has a reference
layer of its module path and signature, the names agree as a whole and pair
the layers, since positions then differ only by file order (an ONNX graph
lists a transformer's layers as they run, safetensors by name, so that
``q_proj`` of one block would sit where ``down_proj`` of another does; the
guard judges the pairing like any other). Per-channel layers (batch-norm) are
paired through the layers that feed them where both graphs say so.

A bare state dict has no computation graph: its edges are guessed from file
order (or from the names' order, for safetensors) and miss skip connections.
:func:`effective_edges` therefore takes the suspect's own edges only when they
come from a real graph, else the reference's translated to suspect names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind
from auditor.toolkit.channels import is_pass_through

__all__ = ["Alignment", "align_layers", "effective_edges", "module_path", "per_channel_edges"]

_WEIGHTED = (
    LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR, LayerKind.LSTM, LayerKind.GRU, LayerKind.EMBEDDING,
)  # fmt: skip
_PER_CHANNEL = (LayerKind.BATCH_NORM, LayerKind.LAYER_NORM)
#: Cost of pairing two layers with different names: a tie-breaker below one step of position in a small model.
_NAME_COST = 0.3


@dataclass
class Alignment:
    """Suspect layer name -> reference layer name, for every layer that has a counterpart."""

    pairs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def reference_of(self, suspect_layer: str) -> str | None:
        """The reference layer paired with ``suspect_layer``, if any."""
        return self.pairs.get(suspect_layer)

    def suspect_of(self, reference_layer: str) -> str | None:
        """The suspect layer paired with ``reference_layer``, if any."""
        return next((s for s, r in self.pairs.items() if r == reference_layer), None)


def module_path(name: str) -> str:
    """An ONNX node's scope as a module path, a tensor's or module's name as it is.

    Exporters name a node by the scopes of the modules it came from and end with the op
    (``/layer1/conv1/Conv``; ``/layer1/conv1/Conv_quant`` once onnxruntime quantised it); a scope that
    extends the one before it refines it (``/layer2/shortcut/shortcut.0/Conv`` is ``layer2.shortcut.0``).
    So ``/layer1/conv1/Conv`` and ``layer1.conv1`` compare equal.
    """
    if not name.startswith("/"):
        return name
    path: list[str] = []
    for scope in name.strip("/").split("/")[:-1]:
        if path and scope.startswith(path[-1] + "."):
            path[-1] = scope
        else:
            path.append(scope)
    return ".".join(path)


def _family(layer: Layer) -> str | None:
    if is_pass_through(layer):
        return "per-channel"
    if (layer.kind in _WEIGHTED and layer.weight is not None) or layer.kind in (LayerKind.LSTM, LayerKind.GRU):
        return layer.kind.value
    return None


def _signature(layer: Layer) -> tuple[object, ...]:
    """What must agree for two layers to be the same layer with possibly other channel counts."""
    w = layer.weight
    shape = w.shape if w is not None else ()
    return (layer.kind, len(shape), tuple(shape[2:]), is_pass_through(layer))


def _log_ratio(a: int | None, b: int | None) -> float:
    return abs(math.log(a / b)) if a and b else 0.0


def _pair(suspect: list[Layer], reference: list[Layer], fixed: dict[str, str]) -> dict[str, str]:
    """Hungarian pairing of one family: position, channel counts, then names."""
    from scipy.optimize import linear_sum_assignment

    s_free = [layer for layer in suspect if layer.name not in fixed]
    taken = set(fixed.values())
    r_free = [layer for layer in reference if layer.name not in taken]
    if not s_free or not r_free:
        return {}
    by_path = {module_path(r.name): r for r in r_free}
    named = {s.name: r.name for s in s_free if (r := by_path.get(module_path(s.name))) is not None
             and _signature(s) == _signature(r)}  # fmt: skip
    if len(named) == len(s_free) and len(set(named.values())) == len(named):
        return named
    s_pos = {layer.name: i / max(len(suspect) - 1, 1) for i, layer in enumerate(suspect)}
    r_pos = {layer.name: i / max(len(reference) - 1, 1) for i, layer in enumerate(reference)}
    big = 1e6
    cost = np.full((len(s_free), len(r_free)), big)
    for i, s in enumerate(s_free):
        for j, r in enumerate(r_free):
            if _signature(s) != _signature(r):
                continue
            channels = _log_ratio(s.out_channels, r.out_channels) + _log_ratio(s.in_channels, r.in_channels)
            name = 0.0 if module_path(s.name) == module_path(r.name) else _NAME_COST
            cost[i, j] = abs(s_pos[s.name] - r_pos[r.name]) + 0.25 * channels + name
    rows, cols = linear_sum_assignment(cost)
    return {s_free[i].name: r_free[j].name for i, j in zip(rows, cols, strict=True) if cost[i, j] < big}


def _feeder(edges: list[Edge], name: str) -> str | None:
    srcs = {e.src for e in edges if e.dst == name}
    return srcs.pop() if len(srcs) == 1 else None


_DIGITS = re.compile(r"(\d+)$")


def _follows(producer: str, norm: str) -> bool:
    """Whether a per-channel layer's name says it follows ``producer``: ``conv1`` -> ``bn1``,
    ``shortcut.0`` -> ``shortcut.1`` (the next entry of a Sequential); same parent module in both."""
    p_parent, _, p_last = producer.rpartition(".")
    n_parent, _, n_last = norm.rpartition(".")
    if p_parent != n_parent:
        return False
    if p_last.isdigit() and n_last.isdigit():
        return int(n_last) == int(p_last) + 1
    p_digits, n_digits = _DIGITS.search(p_last), _DIGITS.search(n_last)
    return p_digits is not None and n_digits is not None and p_digits.group(1) == n_digits.group(1)


def per_channel_edges(graph: LayerGraph) -> list[Edge]:
    """``graph``'s edges with each batch-norm's input taken from names where no real graph gives it.

    Inferred edges come from file order, and a safetensors file lists tensors by
    name: its guesses run ``bn1 -> bn2`` and never reach ``bn1`` from ``conv1``.
    So inferred edges into per-channel layers are replaced by a guess, marked
    inferred, that goes by names and width: the producer of the same width in
    the same parent module whose name says so (:func:`_follows`), else the only
    producer of that width in that module."""
    per_channel = {x.name for x in graph.layers if is_pass_through(x)}
    edges = [e for e in graph.edges if not (e.source is EdgeSource.INFERRED and e.dst in per_channel)]
    fed = {e.dst for e in edges}
    producers = [x for x in graph.layers if x.kind in _WEIGHTED[:3] and not is_pass_through(x)]
    taken = {e.src for e in edges if e.dst in per_channel}
    for norm in graph.layers:
        if not is_pass_through(norm) or norm.name in fed or norm.kind not in _PER_CHANNEL:
            continue
        width = norm.out_channels
        fits = [p for p in producers if p.out_channels == width and p.name not in taken]
        named = [p for p in fits if _follows(p.name, norm.name)]
        parent = norm.name.rpartition(".")[0]
        siblings = [p for p in fits if p.name.rpartition(".")[0] == parent]
        pick = named[0] if len(named) == 1 else siblings[0] if len(siblings) == 1 and not named else None
        if pick is not None:
            edges.append(Edge(pick.name, norm.name, (), 0, EdgeSource.INFERRED))
            taken.add(pick.name)
    return edges


def align_layers(suspect: LayerGraph, reference: LayerGraph) -> Alignment:
    """Pair suspect layers with reference layers (see the module docstring)."""
    alignment = Alignment()
    families: dict[str, tuple[list[Layer], list[Layer]]] = {}
    for graph, side in ((suspect, 0), (reference, 1)):
        for layer in graph.layers:
            fam = _family(layer)
            if fam is not None:
                families.setdefault(fam, ([], []))[side].append(layer)
    for fam, (s_layers, r_layers) in families.items():
        if fam != "per-channel":
            alignment.pairs.update(_pair(s_layers, r_layers, {}))
    s_layers, r_layers = families.get("per-channel", ([], []))
    # A per-channel layer fed by a paired layer pairs with the reference's one fed by its counterpart.
    via_feeder: dict[str, str] = {}
    s_edges, r_edges = per_channel_edges(suspect), per_channel_edges(reference)
    r_by_feeder = {f: r.name for r in r_layers if (f := _feeder(r_edges, r.name)) is not None}
    for s in s_layers:
        feeder = _feeder(s_edges, s.name)
        ref_feeder = alignment.pairs.get(feeder) if feeder is not None else None
        if ref_feeder is not None and ref_feeder in r_by_feeder and r_by_feeder[ref_feeder] not in via_feeder.values():
            via_feeder[s.name] = r_by_feeder[ref_feeder]
    alignment.pairs.update(via_feeder)
    alignment.pairs.update(_pair(s_layers, r_layers, via_feeder))
    unpaired = [layer.name for layer in suspect.layers if _family(layer) and layer.name not in alignment.pairs]
    if unpaired:
        alignment.notes.append(f"no reference counterpart for {', '.join(unpaired)}")
    return alignment


def effective_edges(suspect: LayerGraph, reference: LayerGraph, alignment: Alignment) -> tuple[list[Edge], str]:
    """The suspect's edges to follow and where they come from (for the log).

    The suspect's own edges when its file has a graph; else the reference's,
    translated (a reference per-channel layer the suspect lacks, as after
    batch-norm folding, is looked through); else the suspect's inferred ones.
    Inferred edges into a convolution whose groups were only guessed are dropped.
    """
    if suspect.edge_source is EdgeSource.GRAPH:
        return list(suspect.edges), "the suspect's own graph"
    ref_edges = per_channel_edges(reference)
    if ref_edges:
        ref_layers = {layer.name: layer for layer in reference.layers}

        def to_suspect(name: str) -> str | None:
            seen = set()
            while name not in seen:
                seen.add(name)
                mapped = alignment.suspect_of(name)
                if mapped is not None:
                    return mapped
                feeder = _feeder(ref_edges, name)
                if feeder is None or not is_pass_through(ref_layers[name]):
                    return None
                name = feeder
            return None

        edges: list[Edge] = []
        for e in ref_edges:
            dst = ref_layers.get(e.dst)
            if dst is None or (e.source is EdgeSource.INFERRED and "groups_inferred" in dst.attrs):
                continue
            src_s, dst_s = to_suspect(e.src), alignment.suspect_of(e.dst)
            if src_s is not None and dst_s is not None and src_s != dst_s:
                edge = Edge(src_s, dst_s, e.via, e.offset, e.source)
                if edge not in edges:
                    edges.append(edge)
        real = reference.edge_source is EdgeSource.GRAPH
        return edges, "the reference's graph" if real else "the reference's inferred edges"
    layers = {layer.name: layer for layer in suspect.layers}
    kept = [e for e in per_channel_edges(suspect) if e.dst in layers and "groups_inferred" not in layers[e.dst].attrs]
    return kept, "the suspect's inferred edges"
