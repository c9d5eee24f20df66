"""Canonical form before alignment: linear chains fused into one layer.

A thief can factor a layer ``W`` into several with no nonlinearity between
them: ``Q^T W`` then a 1x1 convolution (or a square linear layer) ``Q``; an
inserted identity layer; a batch-norm whose affine map the next layer undoes;
a layer split into three linear operations. The model computes the same, but
no channel permutation, scale or sign turns the pieces into ``W``. Their
product does: each chain is fused back, ``W = W_k ... G W_1`` and the biases
carried through (a batch-norm in the chain is the affine map
``g x + beta - mean g``, ``g = gamma / sqrt(var + eps)``), and whatever was
inserted vanishes.

A chain (:func:`linear_runs`) starts at an ungrouped convolution or linear
layer and follows each link ``x -> y`` where the edges say ``x`` feeds ``y``
alone, ``y`` reads ``x`` alone, nothing but identity operations sit between
them (:data:`LINEAR_VIA`), and ``y`` is a batch-norm over ``x``'s channels, a
1x1 convolution with stride 1 and no padding after a convolution, or a linear
layer after a linear layer. A batch-norm at the end of a chain is not part of
it (the reference has it there too). Edges guessed from file order (a bare
state dict) are trusted only where the names say the two are one module's
consecutive entries (``conv1.0``, ``conv1.1``, ``conv1.2``): a gap in the
numbering is a parameter-free module, which may be a ReLU; the log says which.

The reference decides how far to fuse: where the reference itself has a
chain (a bottleneck of two linear layers with nothing between), the suspect's
chain over the same widths is fused into as many layers as the reference's,
split where its widths match (:func:`_segments`); the invertible map that may
sit between those (:mod:`.basis`) is the next restorer's job. The fused graph
must then have as many weighted layers as the reference, each fused layer
paired (:func:`~.align.align_layers`) with a reference layer of its own
weight shape; it takes that layer's name, so that the later restorers and
the detectors find it where they find the reference's. Before pairing, a
whole chain is named after the module it replaced, where its layers' names
share one (:func:`_module_name`): names only break ties in the pairing, but a
reference read from a state dict lists its layers by name, not in the order
they run, so position alone can pair a fused ResNet's layers crosswise. A bias the fusion
created in front of a batch-norm, where the reference layer has none, is
moved into that batch-norm's running mean (the same function).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.restore.align import align_layers, module_path, per_channel_edges
from auditor.toolkit.channels import DEFAULT_EPS, PRODUCER_KINDS, is_pass_through

__all__ = ["LINEAR_VIA", "Fusion", "fuse_chains", "linear_link", "linear_runs"]

#: Operations on an edge that keep a chain linear (anything else, a ReLU or a pooling, ends it).
LINEAR_VIA = frozenset({"Identity", "Dropout"})
_ENTRY = re.compile(r"^(.*)\.(\d+)$")


@dataclasses.dataclass
class Fusion:
    """One fused chain: its suspect layers (batch-norms included) and what came of them."""

    first: str
    second: str
    fused: str
    residual: float
    edges: str
    reference: str | None = None
    chain: list[str] = dataclasses.field(default_factory=list)

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {
            "name": self.fused, "first": self.first, "second": self.second, "chain": list(self.chain),
            "reference": self.reference, "residual": float(f"{self.residual:.3g}"), "edges": self.edges,
        }  # fmt: skip


def _weighted(layer: Layer) -> bool:
    return layer.kind in PRODUCER_KINDS and layer.weight is not None and not is_pass_through(layer)


def _norm(layer: Layer) -> bool:
    return layer.kind is LayerKind.BATCH_NORM and is_pass_through(layer) and "running_var" in layer.params


def _ungrouped(layer: Layer) -> bool:
    # Only recorded groups count: groups inferred from a state dict come from a guessed edge (a 32 -> 64
    # convolution after a 64-wide layer in name order looks like groups=2).
    return int(layer.attrs.get("groups", 1)) == 1


def _inputs(layer: Layer) -> int | None:
    """Input channels or features, taking the layer as ungrouped."""
    w = layer.weight
    if _norm(layer):
        return layer.out_channels
    return None if w is None or len(w.shape) < 2 else w.shape[1]


def _pointwise(layer: Layer) -> bool:
    """A 1x1 convolution that maps each position to itself (stride 1, no padding), as far as the file says."""
    w = layer.weight
    if w is None or any(k != 1 for k in w.shape[2:]):
        return False
    strides = layer.attrs.get("stride") or []
    pads = [*(layer.attrs.get("padding") or []), *(layer.attrs.get("pads") or [])]
    return all(int(v) == 1 for v in strides) and all(int(v) == 0 for v in pads)


def _consecutive(a: str, b: str) -> bool:
    ma, mb = _ENTRY.match(a), _ENTRY.match(b)
    return ma is not None and mb is not None and ma.group(1) == mb.group(1) and int(mb.group(2)) == int(ma.group(2)) + 1


def linear_link(graph: LayerGraph, x: Layer, family: LayerKind, layers: dict[str, Layer]) -> tuple[Layer, str] | None:
    """The layer ``y`` that continues a linear chain of ``family`` after ``x``, with where the edge comes
    from; None where the chain ends (see the module docstring)."""
    readers = [e for e in graph.edges if e.src == x.name]
    if len(readers) != 1 or readers[0].dst not in layers:
        return None
    edge = readers[0]
    y = layers[edge.dst]
    if edge.offset not in (0, None) or not set(edge.via) <= LINEAR_VIA:
        return None
    if {e.src for e in graph.edges if e.dst == y.name} != {x.name} or _inputs(y) != x.out_channels:
        return None
    if _norm(y):
        pass
    elif not (_weighted(y) and _ungrouped(y) and y.kind is family):
        return None
    elif family is not LayerKind.LINEAR and not _pointwise(y):
        return None
    if edge.source is EdgeSource.GRAPH:
        return y, "the file's graph"
    if _consecutive(x.name, y.name):
        return y, "inferred from file order; the names say one module's consecutive entries"
    return None  # a guessed edge between unrelated names: a ReLU may sit there unseen


def linear_runs(graph: LayerGraph) -> list[tuple[list[Layer], str]]:
    """The maximal linear chains of two or more weighted layers (batch-norms between them included), in
    graph order, no layer in two chains, with where their edges come from."""
    layers = {x.name: x for x in graph.layers}
    out: list[tuple[list[Layer], str]] = []
    used: set[str] = set()
    for a in graph.layers:
        if a.name in used or not (_weighted(a) and _ungrouped(a)) or _continues(graph, a, layers):
            continue
        run, wheres = [a], set()
        while (link := linear_link(graph, run[-1], a.kind, layers)) is not None and link[0].name not in used:
            run.append(link[0])
            wheres.add(link[1])
        while run and _norm(run[-1]):
            run.pop()
        if sum(1 for x in run if _weighted(x)) < 2:
            continue
        out.append((run, "; ".join(sorted(wheres))))
        used |= {x.name for x in run}
    return out


def _continues(graph: LayerGraph, a: Layer, layers: dict[str, Layer]) -> bool:
    """Whether ``a`` continues a chain that a weighted layer before it begins (then it is no chain's start)."""
    current, seen = a, set()
    while current.name not in seen:
        seen.add(current.name)
        srcs = {e.src for e in graph.edges if e.dst == current.name}
        prev = layers.get(srcs.pop()) if len(srcs) == 1 else None
        if prev is None or not (_norm(prev) or _weighted(prev)):
            return False
        link = linear_link(graph, prev, a.kind, layers)
        if link is None or link[0].name != current.name:
            return False
        if _weighted(prev):
            return _ungrouped(prev) and prev.kind is a.kind
        current = prev
    return False


def _widths(run: list[Layer]) -> tuple[LayerKind, int | None, int | None]:
    return run[0].kind, _inputs(run[0]), run[-1].out_channels


def _segments(run: list[Layer], reference_runs: list[list[Layer]]) -> list[list[Layer]]:
    """``run`` split into as many pieces as the reference's chain over the same widths has weighted layers
    (one piece where the reference has none): boundaries after the last weighted layer, from the end,
    whose output width is the reference layer's."""
    whole = [run]
    ref = next((r for r in reference_runs if _widths(r) == _widths(run)), None)
    if ref is None:
        return whole
    ref_w = [x for x in ref if _weighted(x)]
    idx = [i for i, x in enumerate(run) if _weighted(x)]
    if len(ref_w) > len(idx):
        return whole
    cuts: list[int] = []  # positions in ``run`` after which a piece ends
    limit = len(idx) - 1  # the last weighted layer always closes the last piece
    for j in range(len(ref_w) - 2, -1, -1):
        width = ref_w[j].out_channels
        found = [k for k in range(j, limit) if run[idx[k]].out_channels == width]
        if not found:
            return whole
        limit = found[-1]
        end = idx[limit]
        while end + 1 < len(run) and _norm(run[end + 1]):  # a batch-norm goes with the piece before it
            end += 1
        cuts.append(end)
    cuts.sort()
    pieces, start = [], 0
    for end in cuts:
        pieces.append(run[start : end + 1])
        start = end + 1
    pieces.append(run[start:])
    return pieces


def _affine(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chain element as ``(matrix or per-channel gain, bias)`` in float64."""
    p = {k: v.read(float32=True).to(torch.float64) for k, v in layer.params.items()}
    if _norm(layer):
        g = p["weight"] / torch.sqrt(p["running_var"] + float(layer.attrs.get("eps", DEFAULT_EPS)))
        return g, p.get("bias", torch.zeros_like(g)) - p["running_mean"] * g
    return p["weight"].reshape(p["weight"].shape[0], -1), p.get("bias")


def _fuse(piece: list[Layer], name: str) -> tuple[Layer, float]:
    """The one layer computing the chain ``piece``, and the relative residual of the float32 result on
    random inputs against the chain applied step by step."""
    first = piece[0]
    w, bias = _affine(first)
    probe = torch.randn(w.shape[1], 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chain = w.to(torch.float32).to(torch.float64) @ probe + (0 if bias is None else bias.reshape(-1, 1))
    for layer in piece[1:]:
        m, c = _affine(layer)
        if m.ndim == 1:
            w, chain = m.reshape(-1, 1) * w, m.reshape(-1, 1) * chain
            bias = m * bias if bias is not None else None
        else:
            w, chain = m @ w, m.to(torch.float32).to(torch.float64) @ chain
            bias = m @ bias if bias is not None else None
        if c is not None:
            bias = c if bias is None else bias + c
            chain = chain + c.reshape(-1, 1)
    w32 = w.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32).to(torch.float64).reshape(-1, 1)
    out = w32.to(torch.float64) @ probe + (0 if b32 is None else b32)
    residual = float((out - chain).norm() / chain.norm().clamp_min(1e-30))
    shape = (-1, *first.weight.shape[1:])  # type: ignore[union-attr]
    params = {"weight": TensorRef.from_tensor(f"{name}.weight", w32.reshape(shape))}
    if bias is not None:
        params["bias"] = TensorRef.from_tensor(f"{name}.bias", bias.to(torch.float32))
    names = " -> ".join(x.name for x in piece)
    attrs = {**first.attrs, "restored": f"fused from {names}"}
    return dataclasses.replace(first, name=name, params=params, attrs=attrs, source=f"fused: {names}"), residual


def fuse_chains(suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph | None, list[Fusion], str]:
    """The suspect with its linear chains fused (None when there is nothing to fuse that the reference
    explains), the fusions, and why (see the module docstring)."""
    runs = linear_runs(suspect)
    if not runs:
        return None, [], "no chain of linear layers without a nonlinearity between them"
    reference_runs = [r for r, _ in linear_runs(reference)]
    pieces = [(p, where) for run, where in runs for p in _segments(run, reference_runs)]
    pieces = [(p, where) for p, where in pieces if len(p) > 1]
    if not pieces:
        return None, [], "every linear chain is one the reference has too: nothing to fuse"
    n_suspect = sum(1 for x in suspect.layers if _weighted(x))
    n_fused = n_suspect - sum(sum(1 for x in p if _weighted(x)) - 1 for p, _ in pieces)
    n_reference = sum(1 for x in reference.layers if _weighted(x))
    if n_fused != n_reference:
        why = (
            f"{len(pieces)} chain(s) found, but fused the suspect would have {n_fused} weighted"
            f" layer(s) where the reference has {n_reference}: left alone"
        )
        return None, [], why
    layers: list[Layer] = []
    edges = list(suspect.edges)
    fusions: list[Fusion] = []
    starts = {p[0].name: (p, where) for p, where in pieces}
    inside = {x.name for p, _ in pieces for x in p[1:]}
    whole = {run[0].name for run, _ in runs if any(p == run for p, _ in pieces)}
    taken = {x.name for x in suspect.layers} - inside
    for layer in suspect.layers:
        if layer.name in inside:
            continue
        if layer.name not in starts:
            layers.append(layer)
            continue
        piece, where = starts[layer.name]
        name = layer.name
        module = _module_name(piece) if layer.name in whole else None
        if module is not None and module not in taken:
            name = module
            taken.add(module)
        fused, residual = _fuse(piece, name)
        layers.append(fused)
        members = {x.name for x in piece}
        fusions.append(Fusion(piece[0].name, piece[-1].name, name, residual, where,
                              chain=[x.name for x in piece]))  # fmt: skip
        edges = [e for e in edges if not (e.src in members and e.dst in members)]
        edges = [dataclasses.replace(e, src=name) if e.src == piece[-1].name else e for e in edges]
        edges = [dataclasses.replace(e, dst=name) if e.dst == piece[0].name else e for e in edges]
    graph = dataclasses.replace(suspect, layers=layers, edges=edges, files=list(suspect.files),
                                metadata=dict(suspect.metadata))  # fmt: skip
    # Name each fused layer as the reference layer it pairs with, where that name is free.
    pairs = align_layers(graph, reference).pairs
    ref_layers = {x.name: x for x in reference.layers}
    taken = {x.name for x in layers}
    renames: dict[str, str] = {}
    for f in fusions:
        ref_name = pairs.get(f.fused)
        ref = ref_layers.get(ref_name) if ref_name is not None else None
        fused_layer = next(x for x in layers if x.name == f.fused)
        if ref is None or ref.weight is None or ref.weight.shape != fused_layer.weight.shape:  # type: ignore[union-attr]
            return None, [], f"fused, {' -> '.join(f.chain)} has no reference layer of its shape: left alone"
        f.reference = ref.name
        if ref.name != f.fused and ref.name not in taken:
            renames[f.fused] = ref.name
            taken.add(ref.name)
    if renames:
        layers = [_renamed(x, renames[x.name]) if x.name in renames else x for x in layers]
        edges = [dataclasses.replace(e, src=renames.get(e.src, e.src), dst=renames.get(e.dst, e.dst)) for e in edges]
        for f in fusions:
            f.fused = renames.get(f.fused, f.fused)
    layers = _bias_into_norms(layers, per_channel_edges(dataclasses.replace(graph, layers=layers, edges=edges)),
                              fusions, ref_layers)  # fmt: skip
    note = "restore-canonical: " + ", ".join(f"{' -> '.join(f.chain)} fused into {f.fused}" for f in fusions)
    graph = dataclasses.replace(graph, layers=layers, edges=edges, notes=[*suspect.notes, note])
    return graph, fusions, f"{len(fusions)} linear chain(s) fused"


def _bias_into_norms(
    layers: list[Layer], edges: list[Edge], fusions: list[Fusion], reference: dict[str, Layer]
) -> list[Layer]:
    """Each fused layer's bias moved into the batch-norm after it (the one batch-norm it feeds, by the edges,
    or by names where the edges are guessed: :func:`~.align.per_channel_edges`), where its reference layer
    has no bias: ``BN(x + b)`` is ``BN(x)`` with running mean ``mean - b``."""
    by_name = {x.name: x for x in layers}
    for f in fusions:
        layer, ref = by_name[f.fused], reference.get(f.reference or "")
        norms = [e for e in edges if e.src == f.fused and e.dst in by_name and _norm(by_name[e.dst])]
        if ref is None or "bias" in ref.params or "bias" not in layer.params or len(norms) != 1:
            continue
        bn = by_name[norms[0].dst]
        if set(norms[0].via) - LINEAR_VIA or bn.weight is None or bn.weight.shape[0] != layer.out_channels:
            continue
        bias = layer.params["bias"].read(float32=True).to(torch.float64)
        mean = bn.params["running_mean"].read(float32=True).to(torch.float64)
        params = {**bn.params, "running_mean": TensorRef.from_tensor(f"{bn.name}.running_mean",
                                                                    (mean - bias).to(torch.float32))}  # fmt: skip
        by_name[bn.name] = dataclasses.replace(bn, params=params)
        by_name[f.fused] = dataclasses.replace(layer, params={k: v for k, v in layer.params.items() if k != "bias"})
    return [by_name[x.name] for x in layers]


def _module_name(chain: list[Layer]) -> str | None:
    """The module a whole chain replaced, where its layers' names say one: their longest common dotted
    prefix (``layer2.conv1`` for ``layer2.conv1.0`` and ``layer2.conv1.1``, or for ONNX nodes
    ``/layer2/conv1/conv1.0/Conv`` and ``/layer2/conv1/conv1.1/Conv``). Names prove nothing; the fused
    layer named so only lets the layer pairing's name tie-breaker see the module the reference names
    alike (a reference read from a state dict lists its layers by name, not in the order they run, so
    position alone may pair them crosswise)."""
    parts = [module_path(x.name).split(".") for x in chain]
    common: list[str] = []
    for words in zip(*parts, strict=False):
        if len(set(words)) != 1 or not words[0]:
            break
        common.append(words[0])
    return ".".join(common) or None


def _renamed(layer: Layer, name: str) -> Layer:
    params = {role: TensorRef.from_tensor(f"{name}.{role}", ref.read()) for role, ref in layer.params.items()}
    return dataclasses.replace(layer, name=name, params=params)
