"""Canonical form before alignment: linear chains fused into one layer.

A thief can factor a layer ``W`` into two with no nonlinearity between them,
``Q^T W`` then a 1x1 convolution (or a square linear layer) ``Q`` with ``Q``
a random orthogonal matrix: the model computes the same, but no channel
permutation, scale or sign turns ``Q^T W`` into ``W``. The product does: the
chain is fused back, ``W = Q W'`` and ``b = Q b' + c``, and the inserted map
vanishes whatever it was.

A pair ``a -> b`` is fused when the edges say ``a`` feeds ``b`` alone, ``b``
reads ``a`` alone, nothing but identity operations sit between them
(:data:`LINEAR_VIA`), neither is grouped or per-channel, and ``b`` is a
1x1 convolution with stride 1 and no padding (or a linear layer after a
linear layer). Edges guessed from file order (a bare state dict) are trusted
only where the names say the two are one module's consecutive entries
(``conv1.0``, ``conv1.1``); the log says so. The fused graph must then have
as many weighted layers as the reference, each fused layer paired
(:func:`~.align.align_layers`) with a reference layer of its own weight
shape; it takes that layer's name, so that the later restorers and the
detectors find it where they find the reference's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from auditor.graph import EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.restore.align import align_layers
from auditor.toolkit.channels import PRODUCER_KINDS, is_pass_through

__all__ = ["LINEAR_VIA", "Fusion", "fuse_chains"]

#: Operations on an edge that keep a chain linear (anything else, a ReLU or a pooling, ends it).
LINEAR_VIA = frozenset({"Identity", "Dropout"})
_ENTRY = re.compile(r"^(.*)\.(\d+)$")


@dataclasses.dataclass
class Fusion:
    """One fused chain: the two suspect layers and what came of them."""

    first: str
    second: str
    fused: str
    residual: float
    edges: str
    reference: str | None = None

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {"name": self.fused, "first": self.first, "second": self.second, "reference": self.reference,
                "residual": float(f"{self.residual:.3g}"), "edges": self.edges}  # fmt: skip


def _weighted(layer: Layer) -> bool:
    return layer.kind in PRODUCER_KINDS and layer.weight is not None and not is_pass_through(layer)


def _ungrouped(layer: Layer) -> bool:
    return int(layer.attrs.get("groups", layer.attrs.get("groups_inferred", 1))) == 1


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


def _chains(graph: LayerGraph) -> list[tuple[Layer, Layer, str]]:
    """The fusable pairs ``(a, b, where the edge comes from)``, in graph order, no layer in two pairs."""
    layers = {x.name: x for x in graph.layers}
    out: list[tuple[Layer, Layer, str]] = []
    used: set[str] = set()
    for a in graph.layers:
        if a.name in used or not _weighted(a) or not _ungrouped(a):
            continue
        readers = [e for e in graph.edges if e.src == a.name]
        if len(readers) != 1 or readers[0].dst not in layers:
            continue
        edge = readers[0]
        b = layers[edge.dst]
        if b.name in used or not _weighted(b) or not _ungrouped(b) or edge.offset not in (0, None):
            continue
        if {e.src for e in graph.edges if e.dst == b.name} != {a.name} or not set(edge.via) <= LINEAR_VIA:
            continue
        conv_pair = a.kind is b.kind and a.kind is not LayerKind.LINEAR and _pointwise(b)
        if not (conv_pair or (a.kind is b.kind is LayerKind.LINEAR)) or b.in_channels != a.out_channels:
            continue
        if edge.source is EdgeSource.GRAPH:
            where = "the file's graph"
        elif _consecutive(a.name, b.name):
            where = "inferred from file order; the names say one module's consecutive entries"
        else:
            continue  # a guessed edge between unrelated names: a ReLU may sit there unseen
        out.append((a, b, where))
        used |= {a.name, b.name}
    return out


def _fuse(a: Layer, b: Layer, name: str) -> tuple[Layer, float]:
    """The one layer computing ``b(a(x))``, and the relative residual of the product on random inputs."""
    wa = a.params["weight"].read(float32=True).to(torch.float64)
    wb = b.params["weight"].read(float32=True).to(torch.float64).reshape(b.weight.shape[0], -1)  # type: ignore[union-attr]
    flat = wa.reshape(wa.shape[0], -1)
    fused = wb @ flat
    bias = b.params["bias"].read(float32=True).to(torch.float64) if "bias" in b.params else None
    if "bias" in a.params:
        inner = wb @ a.params["bias"].read(float32=True).to(torch.float64)
        bias = inner if bias is None else bias + inner
    w32 = fused.to(torch.float32)
    probe = torch.randn(flat.shape[1], 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chain = wb @ (flat.to(torch.float32).to(torch.float64) @ probe)
    residual = float((w32.to(torch.float64) @ probe - chain).norm() / chain.norm().clamp_min(1e-30))
    params = {"weight": TensorRef.from_tensor(f"{name}.weight", w32.reshape((-1, *wa.shape[1:])))}
    if bias is not None:
        params["bias"] = TensorRef.from_tensor(f"{name}.bias", bias.to(torch.float32))
    attrs = {**a.attrs, "restored": f"fused from {a.name} and {b.name}"}
    source = f"fused: {a.name} -> {b.name}"
    return dataclasses.replace(a, name=name, params=params, attrs=attrs, source=source), residual


def fuse_chains(suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph | None, list[Fusion], str]:
    """The suspect with its linear chains fused (None when there is nothing to fuse that the reference
    explains), the fusions, and why (see the module docstring)."""
    chains = _chains(suspect)
    if not chains:
        return None, [], "no chain of two linear layers without a nonlinearity between them"
    n_suspect = sum(1 for x in suspect.layers if _weighted(x))
    n_reference = sum(1 for x in reference.layers if _weighted(x))
    if n_suspect - len(chains) != n_reference:
        why = (
            f"{len(chains)} chain(s) found, but fused the suspect would have {n_suspect - len(chains)} weighted"
            f" layer(s) where the reference has {n_reference}: left alone"
        )
        return None, [], why
    layers: list[Layer] = []
    edges = list(suspect.edges)
    fusions: list[Fusion] = []
    firsts = {a.name: (a, b, where) for a, b, where in chains}
    seconds = {b.name: a.name for a, b, _ in chains}
    for layer in suspect.layers:
        if layer.name in seconds:
            continue
        if layer.name not in firsts:
            layers.append(layer)
            continue
        a, b, where = firsts[layer.name]
        fused, residual = _fuse(a, b, a.name)
        layers.append(fused)
        fusions.append(Fusion(a.name, b.name, a.name, residual, where))
        edges = [e for e in edges if not (e.src == a.name and e.dst == b.name)]
        edges = [dataclasses.replace(e, src=a.name) if e.src == b.name else e for e in edges]
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
            return None, [], f"fused, {f.first} -> {f.second} has no reference layer of its shape: left alone"
        f.reference = ref.name
        if ref.name != f.fused and ref.name not in taken:
            renames[f.fused] = ref.name
            taken.add(ref.name)
    if renames:
        layers = [_renamed(x, renames[x.name]) if x.name in renames else x for x in layers]
        edges = [dataclasses.replace(e, src=renames.get(e.src, e.src), dst=renames.get(e.dst, e.dst)) for e in edges]
        for f in fusions:
            f.fused = renames.get(f.fused, f.fused)
    note = "restore-canonical: " + ", ".join(f"{f.first} -> {f.second} fused into {f.fused}" for f in fusions)
    graph = dataclasses.replace(graph, layers=layers, edges=edges, notes=[*suspect.notes, note])
    return graph, fusions, f"{len(fusions)} linear chain(s) fused"


def _renamed(layer: Layer, name: str) -> Layer:
    params = {role: TensorRef.from_tensor(f"{name}.{role}", ref.read()) for role, ref in layer.params.items()}
    return dataclasses.replace(layer, name=name, params=params)
