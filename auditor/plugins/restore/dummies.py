"""Dummy units removed and split units merged (restore v2: ``neuron-clique``, ``neuron-split``).

In a hidden layer (a channel space with one producer, at most one
batch-norm after it, and readers), a unit's *fan-in* is the affine map from the
layer's input to its pre-activation: the producer's row and bias with the
batch-norm folded in. Units whose fan-ins point the same way (cosine above
``1 - 1e-6``, weight part non-zero) compute the same activation up to a positive
factor ``lambda`` (exactly, through ReLU and max- or average-pooling). Such a group
is one unit written several times: its readers see ``sum_j lambda_j * fan_out_j``
times the first member's activation. When that sum vanishes (below 1e-5 of the
members' fan-outs) the whole group is a NeuronClique and goes; otherwise the
first member stays, reading the sum, and the others go (NeuronSplit). A unit whose
fan-out is zero goes too (it is read by nobody).

The edit is exact up to float rounding; the log gives the residual (the relative
size of what was dropped). With the reference, a space is changed only where it
is wider than the reference's and the removals bring it exactly to the
reference's width; the guard then judges the result. Without a graph in the
file, who reads a space comes from the reference's edges.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.graph import EdgeSource, LayerGraph
from auditor.plugins.restore.structural import StructuralRestorer

if TYPE_CHECKING:
    import torch

    from auditor.graph import Edge
    from auditor.plugins.restore.align import Alignment
    from auditor.toolkit.channels import Space, Tensors

__all__ = [
    "CANCEL_TOLERANCE",
    "COSINE_TOLERANCE",
    "MAX_UNITS",
    "DummyRestorer",
    "Removal",
    "parallel_groups",
    "remove_dummies",
]

#: Fan-ins closer than this to parallel (1 - cosine) are one unit's.
COSINE_TOLERANCE = 1e-6
#: Hidden layers wider than this are not searched (every pair of units is compared): left alone, with the reason.
MAX_UNITS = 16384
_CHUNK = 512
#: A group's summed fan-out below this fraction of its members' fan-outs cancels (a clique); zero fan-out likewise.
CANCEL_TOLERANCE = 1e-5


@dataclasses.dataclass
class Removal:
    """What was removed from or merged in one hidden layer."""

    producer: str
    width_before: int
    width_after: int
    cliques: list[list[int]]
    splits: list[list[int]]
    zero_fan_out: list[int]
    residual: float
    reference: str | None = None

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {"name": self.producer, "reference": self.reference, "width_before": self.width_before,
                "width_after": self.width_after, "cliques_removed": self.cliques, "splits_merged": self.splits,
                "zero_fan_out_removed": self.zero_fan_out, "residual": float(f"{self.residual:.3g}")}  # fmt: skip

    @property
    def summary(self) -> str:
        """One line for the log's layer table."""
        return (f"{self.width_before} -> {self.width_after} units: {len(self.cliques)} clique(s) removed, "
                f"{len(self.splits)} split unit(s) merged, {len(self.zero_fan_out)} unit(s) without fan-out removed"
                f" (residual {self.residual:.2g})")  # fmt: skip


def _fan_in(graph: LayerGraph, space: Space) -> torch.Tensor:
    """Per unit, the producer's row and bias with the batch-norm after it folded in (float64)."""
    import torch

    from auditor.toolkit.channels import DEFAULT_EPS

    producer = graph.layer(space.producers[0])
    w = producer.params["weight"].read(float32=True).to(torch.float64).reshape(space.width, -1)
    b = (producer.params["bias"].read(float32=True).to(torch.float64) if "bias" in producer.params
         else torch.zeros(space.width, dtype=torch.float64))  # fmt: skip
    if space.passthrough:
        bn = graph.layer(space.passthrough[0])
        p = {r: t.read(float32=True).to(torch.float64) for r, t in bn.params.items() if r != "num_batches_tracked"}
        if {"running_mean", "running_var"} <= set(p):
            s = p.get("weight", torch.ones(space.width, dtype=torch.float64))
            s = s / torch.sqrt(p["running_var"] + float(bn.attrs.get("eps", DEFAULT_EPS)))
            w, b = w * s[:, None], (b - p["running_mean"]) * s + p.get("bias", torch.zeros_like(s))
        else:  # a layer norm or an affine-only per-channel layer: its scale
            s = p.get("weight", torch.ones(space.width, dtype=torch.float64))
            w, b = w * s[:, None], b * s + p.get("bias", torch.zeros_like(s))
    return torch.cat([w, b[:, None]], dim=1)


def _fan_out(graph: LayerGraph, space: Space) -> torch.Tensor:
    """Per unit, every weight that reads it, in every reader (float64)."""
    import torch

    from auditor.toolkit.channels import input_params

    parts = []
    for c in space.consumers:
        layer = graph.layer(c.layer)
        for role in input_params(layer):
            t = layer.params[role].read(float32=True).to(torch.float64)
            cols = t.narrow(1, c.offset, space.width * c.block).transpose(0, 1)  # (features, out, ...)
            parts.append(cols.reshape(space.width, -1))
    return torch.cat(parts, dim=1)


def parallel_groups(fan_in: torch.Tensor) -> list[list[int]]:
    """Units whose fan-ins are positive multiples of each other (weight part non-zero), in unit order."""
    import torch

    weight_norm = fan_in[:, :-1].norm(dim=1)
    live = weight_norm > 1e-12 * float(weight_norm.max().clamp_min(1e-300))
    unit = fan_in / fan_in.norm(dim=1, keepdim=True).clamp_min(1e-300)
    seen: set[int] = set()
    groups = []
    close = torch.zeros(0, len(fan_in), dtype=torch.bool)
    for i in range(len(fan_in)):
        if i % _CHUNK == 0:  # one block of rows of the cosine matrix at a time: memory stays _CHUNK x units
            close = (unit[i : i + _CHUNK] @ unit.T) > 1 - COSINE_TOLERANCE
            close &= live[i : i + _CHUNK, None] & live[None, :]
        if i in seen or not bool(live[i]):
            continue
        members = [int(j) for j in torch.nonzero(close[i % _CHUNK]).flatten().tolist() if j not in seen]
        if len(members) > 1:
            groups.append(members)
        seen.update(members)
    return groups


def _plan_space(graph: LayerGraph, space: Space) -> tuple[list[int], dict[int, torch.Tensor], Removal]:
    """The units to keep, the merged fan-out of each split unit kept, and the removal record."""
    fan_in, fan_out = _fan_in(graph, space), _fan_out(graph, space)
    norms = fan_out.norm(dim=1)
    scale = float(norms.median().clamp_min(1e-300))
    drop: set[int] = set()
    cliques, splits, zero = [], [], []
    merged: dict[int, torch.Tensor] = {}
    residual = 0.0
    for members in parallel_groups(fan_in):
        lam = fan_in[members].norm(dim=1) / fan_in[members[0]].norm()
        total = (lam[:, None] * fan_out[members]).sum(dim=0)
        size = float((lam * norms[members]).sum())
        if float(total.norm()) <= CANCEL_TOLERANCE * max(size, 1e-300):
            cliques.append(members)
            drop.update(members)
            residual = max(residual, float(total.norm()) / scale)
        else:
            splits.append(members)
            merged[members[0]] = total
            drop.update(members[1:])
            unit = fan_in[members] / fan_in[members].norm(dim=1, keepdim=True)
            residual = max(residual, float((1 - unit @ unit[0]).abs().max()))
    for u in range(space.width):
        if u not in drop and float(norms[u]) <= CANCEL_TOLERANCE * scale:
            zero.append(u)
            drop.add(u)
            residual = max(residual, float(norms[u]) / scale)
    keep = [u for u in range(space.width) if u not in drop]
    removal = Removal(space.producers[0], space.width, len(keep), cliques, splits, zero, residual)
    return keep, merged, removal


def _apply(graph: LayerGraph, space: Space, keep: list[int], merged: dict[int, torch.Tensor]) -> LayerGraph:
    import torch

    from auditor.toolkit.channels import apply_channel_maps, graph_with_tensors, input_params, tensors_of

    names = space.producers + space.passthrough + [c.layer for c in space.consumers]
    tensors: Tensors = tensors_of(graph, names)
    offset = 0
    for c in space.consumers:  # the kept member of a split unit reads for the whole group
        layer = graph.layer(c.layer)
        for role in input_params(layer):
            t = tensors[c.layer][role]
            n = t.shape[0] * c.block * (t[0, 0].numel())
            for u, total in merged.items():
                chunk = total[offset : offset + n].reshape(c.block, t.shape[0], *t.shape[2:]).transpose(0, 1)
                t[:, c.offset + u * c.block : c.offset + (u + 1) * c.block] = chunk.to(t.dtype)
            offset += n
    index = torch.tensor(keep, dtype=torch.long)
    tensors = apply_channel_maps(graph, tensors, [space], {space.id: index})
    return graph_with_tensors(graph, tensors)


def _edges(suspect: LayerGraph, reference: LayerGraph | None, alignment: Alignment | None) -> list[Edge]:
    if suspect.edge_source is EdgeSource.GRAPH or reference is None or alignment is None:
        return list(suspect.edges)
    from auditor.plugins.restore.align import effective_edges

    return effective_edges(suspect, reference, alignment)[0]


def _hidden(graph: LayerGraph, edges: list[Edge]) -> list[Space]:
    from auditor.toolkit.channels import PRODUCER_KINDS, channel_spaces

    return [sp for sp in channel_spaces(graph, edges)
            if not sp.frozen and len(sp.producers) == 1 and len(sp.passthrough) <= 1 and sp.consumers
            and graph.layer(sp.producers[0]).kind in PRODUCER_KINDS
            and graph.layer(sp.producers[0]).weight is not None]  # fmt: skip


def remove_dummies(suspect: LayerGraph, reference: LayerGraph | None = None) -> tuple[LayerGraph | None,
                                                                                     list[Removal], str]:  # fmt: skip
    """The suspect with dummy units removed and split units merged (None when nothing is to do or the
    reference does not explain it), what was done per hidden layer, and why (module docstring)."""
    alignment = None
    if reference is not None:
        from auditor.plugins.restore.align import align_layers

        alignment = align_layers(suspect, reference)
    edges = _edges(suspect, reference, alignment)
    ref_layers = {x.name: x for x in reference.layers} if reference is not None else {}
    graph = suspect
    removals: list[Removal] = []
    passed: list[str] = []
    # From the output side back: a later layer's dummies may read an earlier clique, whose fan-outs cancel
    # only once they are gone.
    for producer in reversed([sp.producers[0] for sp in _hidden(suspect, edges)]):
        space = next((sp for sp in _hidden(graph, edges) if sp.producers == [producer]), None)
        if space is None:
            continue
        ref_name = alignment.reference_of(producer) if alignment is not None else None
        ref_width = ref_layers[ref_name].out_channels if ref_name in ref_layers else None
        if reference is not None and (ref_width is None or space.width <= ref_width):
            continue  # no wider than the reference's: nothing was added
        if space.width > MAX_UNITS:
            passed.append(f"{producer}: {space.width} units, more than the {MAX_UNITS} compared pairwise: left alone")
            continue
        keep, merged, removal = _plan_space(graph, space)
        if len(keep) == space.width:
            if reference is not None:
                passed.append(f"{producer}: {space.width} units where the reference has {ref_width}, "
                              "but no dummy or split unit")  # fmt: skip
            continue
        if ref_width is not None and len(keep) != ref_width:
            passed.append(f"{producer}: removing {removal.summary} would leave {len(keep)} units where the "
                          f"reference has {ref_width}: left alone")  # fmt: skip
            continue
        removal.reference = ref_name
        graph = _apply(graph, space, keep, merged)
        removals.append(removal)
    tail = f" ({'; '.join(passed)})" if passed else ""
    if not removals:
        return None, [], "no dummy or split unit in a hidden layer" + tail
    note = "restore-dummies: " + ", ".join(f"{r.producer} {r.width_before} -> {r.width_after}" for r in removals)
    graph = dataclasses.replace(graph, notes=[*graph.notes, note])
    return graph, removals, f"dummy or split units removed in {len(removals)} hidden layer(s)" + tail


class DummyRestorer(StructuralRestorer):
    """Removes dummy units (NeuronClique: fan-outs that cancel within a group, or no fan-out) and merges
    split units (NeuronSplit: one fan-in direction, fan-outs summed), before alignment; the guard judges
    the result."""

    id = "restore-dummies"
    order: ClassVar[int] = 14
    description = "Remove dummy units whose fan-outs cancel or vanish; merge units split into scaled copies."
    rows_key = "removals"

    def rewrite(
        self, suspect: LayerGraph, reference: LayerGraph
    ) -> tuple[LayerGraph | None, list[dict[str, Any]], list[dict[str, Any]], str]:
        """The cleaned suspect, one row per hidden layer changed, and why."""
        cleaned, removals, why = remove_dummies(suspect, reference)
        layers = [{"name": r.producer, "reference": r.reference, "note": r.summary} for r in removals]
        return cleaned, [r.to_log() for r in removals], layers, why
