"""Parallel branches merged back into one layer (restore v2: ``split-outputs``, ``split-inputs``).

A layer computed as ``k`` layers over groups of its output channels whose
outputs are concatenated is the one layer whose rows are theirs stacked; ``k``
layers over groups of its input channels whose outputs are summed is the one
layer whose columns are theirs side by side, biases added. Both merges are
exact rearrangements of the same numbers.

A group is ``k >= 2`` convolutions or linear layers of one kind and kernel
whose module paths are ``P.0 .. P.{k-1}`` (``conv1.0``, ``conv1.1``; an ONNX
node path ``/conv1/conv1.0/Conv`` counts as ``conv1.0``), none feeding another,
with either one input width (outputs split: rows stacked) or one output width
(inputs split: columns side by side). Where the file has a graph, the edges
must agree: an output group's members reach their reader through a Concat at
consecutive offsets, an input group's through an Add, reading their input
through a Split or Slice. Equal shapes on both sides are decided by the edges,
else by the reference's layer ``P``; what stays ambiguous is left alone.
Without names (an anonymised ONNX file), members of a Concat at consecutive
offsets reading the same input are a group too. The merged layer is named as
the reference's layer of its shape (``P`` where the reference has it).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.restore.structural import StructuralRestorer

if TYPE_CHECKING:
    import torch

__all__ = ["BranchRestorer", "Merge", "find_groups", "merge_branches"]

_ENTRY = re.compile(r"^(.*)\.(\d+)$")
_WEIGHTED = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR)
_SPLITS = ("Split", "Slice")


@dataclasses.dataclass
class Merge:
    """One group of branches and the layer they became."""

    members: list[str]
    mode: str  # "outputs" (concatenated) or "inputs" (summed)
    name: str
    evidence: str
    reference: str | None = None

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {"name": self.name, "members": list(self.members), "mode": self.mode, "reference": self.reference,
                "evidence": self.evidence, "residual": 0.0}  # fmt: skip


def module_path(layer: Layer) -> str:
    """The layer's module path: its name, or for a legacy ONNX node path the last scope (``/a/a.1/Conv``)."""
    if layer.name.startswith("/"):
        parts = [p for p in layer.name.split("/") if p]
        return parts[-2] if len(parts) >= 2 else (parts or [layer.name])[0]
    return layer.name


def _weighted(layer: Layer) -> bool:
    w = layer.weight
    return (layer.kind in _WEIGHTED and w is not None and len(w.shape) >= 2
            and int(layer.attrs.get("groups", 1)) == 1)  # fmt: skip


def _via_has(edges: list[Edge], ops: tuple[str, ...]) -> bool:
    return bool(edges) and all(any(op in e.via for op in ops) for e in edges)


def _mode_from_edges(graph: LayerGraph, members: list[Layer]) -> str | None:
    """What the file's graph says the group is: ``outputs``, ``inputs``, or None (no graph, or no sign)."""
    if graph.edge_source is not EdgeSource.GRAPH:
        return None
    outs = [e for m in members for e in graph.consumers(m.name)]
    ins = [e for m in members for e in graph.producers(m.name)]
    if outs and _via_has(outs, ("Concat",)) and len({e.offset for e in outs}) > 1:
        return "outputs"
    if (not outs or _via_has(outs, ("Add", "Sum"))) and (not ins or _via_has(ins, _SPLITS)):
        return "inputs" if outs or ins else None
    return None


def _chained(graph: LayerGraph, members: list[Layer], confirmed: bool) -> bool:
    """Whether one member feeds the next: the file's graph says so, or (edges only guessed, the reference
    not naming the merged layer) each reads exactly what the one before it writes."""
    names = {m.name for m in members}
    if graph.edge_source is EdgeSource.GRAPH:
        return any(e.src in names and e.dst in names for e in graph.edges)
    if confirmed:
        return False  # guessed edges between equal branches (taken for a grouped convolution) prove nothing
    shapes = [m.weight.shape for m in members]  # type: ignore[union-attr]
    return all(b[1] == a[0] for a, b in itertools.pairwise(shapes))


def _by_names(graph: LayerGraph, reference: LayerGraph | None) -> tuple[list[tuple[list[Layer], str, str]], list[str]]:
    """Groups found by module paths: ``(members, mode, evidence)``, and why other candidates were passed over."""
    families: dict[str, dict[int, Layer]] = {}
    for layer in graph.layers:
        m = _ENTRY.match(module_path(layer))
        if m is not None and _weighted(layer):
            families.setdefault(m.group(1), {})[int(m.group(2))] = layer
    paths = {module_path(x) for x in graph.layers}
    ref_layers = {x.name: x for x in reference.layers} if reference is not None else {}
    found, skipped = [], []
    for parent, entries in families.items():
        members = [entries[i] for i in sorted(entries)]
        if len(members) < 2 or sorted(entries) != list(range(len(members))) or parent in paths:
            continue
        shapes = [m.weight.shape for m in members]  # type: ignore[union-attr]
        if len({m.kind for m in members}) > 1 or len({s[2:] for s in shapes}) > 1 or len({len(s) for s in shapes}) > 1:
            continue
        ref = ref_layers.get(parent)
        ref_shape = ref.weight.shape if ref is not None and ref.weight is not None else None
        stacked = (sum(s[0] for s in shapes), *shapes[0][1:])
        side = (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])
        if _chained(graph, members, ref_shape in (stacked, side)):
            continue  # one feeds another: a chain (restore-canonical's), not branches
        same_in, same_out = len({s[1] for s in shapes}) == 1, len({s[0] for s in shapes}) == 1
        by_edges = _mode_from_edges(graph, members)
        if by_edges is not None:
            mode = by_edges
            evidence = "the file's graph (" + ("Concat" if mode == "outputs" else "Split, Add") + ")"
            if (mode == "outputs" and not same_in) or (mode == "inputs" and not same_out):
                skipped.append(f"{parent}: the graph says {mode} but the shapes disagree")
                continue
        elif same_in and not same_out:
            mode, evidence = "outputs", "names and shapes (one input width)"
        elif same_out and not same_in:
            mode, evidence = "inputs", "names and shapes (one output width)"
        elif same_in and same_out and ref_shape in (stacked, side) and stacked != side:
            mode = "outputs" if ref_shape == stacked else "inputs"
            evidence = f"names and shapes, equal branches decided by the reference's {parent}"
        else:
            if same_in and same_out:
                skipped.append(f"{parent}.0..{len(members) - 1}: equal shapes, concatenated or summed cannot be told")
            continue
        found.append((members, mode, evidence))
    return found, skipped


def _by_concat(graph: LayerGraph, taken: set[str]) -> list[tuple[list[Layer], str, str]]:
    """Groups found by the graph alone: layers reaching one reader through a Concat at consecutive offsets,
    reading the same input, of one kind, kernel and input width."""
    if graph.edge_source is not EdgeSource.GRAPH:
        return []
    layers = {x.name: x for x in graph.layers}
    by_dst: dict[str, list[Edge]] = {}
    for e in graph.edges:
        if "Concat" in e.via and e.offset is not None and e.src in layers and _weighted(layers[e.src]):
            by_dst.setdefault(e.dst, []).append(e)
    found = []
    for unsorted in by_dst.values():
        edges = sorted(unsorted, key=lambda e: e.offset or 0)
        members = [layers[e.src] for e in edges]
        if len(members) < 2 or {m.name for m in members} & taken or len({m.name for m in members}) < len(members):
            continue
        shapes = [m.weight.shape for m in members]  # type: ignore[union-attr]
        sources = [{(p.src, p.via) for p in graph.producers(m.name)} for m in members]
        offsets = [e.offset or 0 for e in edges]
        contiguous = all(offsets[i + 1] - offsets[i] == shapes[i][0] for i in range(len(shapes) - 1))
        alone = len({e.src for e in graph.edges if e.dst == edges[0].dst and "Concat" in e.via}) == len(members)
        same = len({(m.kind, s[1:]) for m, s in zip(members, shapes, strict=True)}) == 1
        if same and contiguous and alone and all(s == sources[0] for s in sources):  # none at all: the model's input
            found.append((members, "outputs", "the file's graph (Concat at consecutive offsets)"))
    return found


def find_groups(graph: LayerGraph, reference: LayerGraph | None = None) -> tuple[list[tuple[list[Layer], str, str]],
                                                                                 list[str]]:  # fmt: skip
    """The branch groups of ``graph`` (see the module docstring) and notes on candidates passed over."""
    found, skipped = _by_names(graph, reference)
    found += _by_concat(graph, {m.name for members, _, _ in found for m in members})
    return found, skipped


def _merged(members: list[Layer], mode: str, name: str) -> Layer:
    import torch

    weights = [m.params["weight"].read(float32=True) for m in members]
    weight = torch.cat(weights, dim=0 if mode == "outputs" else 1)
    params = {"weight": TensorRef.from_tensor(f"{name}.weight", weight)}
    if any("bias" in m.params for m in members):
        biases: list[torch.Tensor] = [
            m.params["bias"].read(float32=True) if "bias" in m.params else torch.zeros(w.shape[0])
            for m, w in zip(members, weights, strict=True)
        ]
        bias = torch.cat(biases) if mode == "outputs" else torch.stack(biases).sum(dim=0)
        params["bias"] = TensorRef.from_tensor(f"{name}.bias", bias)
    how = "concatenated" if mode == "outputs" else "summed"
    attrs = {k: v for k, v in members[0].attrs.items() if k != "groups_inferred"}  # a guess about one branch
    attrs = {**attrs, "restored": f"merged from {', '.join(m.name for m in members)} ({how})"}
    return dataclasses.replace(members[0], name=name, params=params, attrs=attrs,
                               source=f"merged: {' + '.join(m.name for m in members)}")  # fmt: skip


def _drop(via: tuple[str, ...], ops: tuple[str, ...]) -> tuple[str, ...]:
    """``via`` without its first operation among ``ops``."""
    for i, op in enumerate(via):
        if op in ops:
            return via[:i] + via[i + 1 :]
    return via


def _rewire(edges: list[Edge], members: list[str], name: str, *, mode: str) -> list[Edge]:
    """The edges with ``members`` replaced by the merged layer ``name`` (duplicates dropped). The merged
    layer of an input split reads its sources from offset 0 (whole, in blocks after a flatten, or summed by
    a residual add); after a concatenation where each source arrives is not known."""
    group = set(members)
    concat = any("Concat" in e.via for e in edges if e.dst in group and e.src not in group)
    offset_in = None if concat else 0

    def rewired(e: Edge) -> Edge:
        if e.dst in group:
            if mode == "inputs":
                return Edge(e.src, name, _drop(e.via, _SPLITS), offset_in, e.source)
            return dataclasses.replace(e, dst=name)
        if mode == "inputs":
            return Edge(name, e.dst, _drop(e.via, ("Add", "Sum")), e.offset, e.source)
        offsets = [x.offset for x in edges if x.src in group and x.dst == e.dst]
        concat_only = {x.src for x in edges if x.dst == e.dst and "Concat" in x.via} <= group
        offset = None if any(o is None for o in offsets) else min(o for o in offsets if o is not None)
        return Edge(name, e.dst, _drop(e.via, ("Concat",)) if concat_only else e.via, offset, e.source)

    out: list[Edge] = []
    for e in edges:
        if e.src in group and e.dst in group:
            continue
        new = rewired(e) if e.src in group or e.dst in group else e
        if new not in out:
            out.append(new)
    return out


def merge_branches(suspect: LayerGraph, reference: LayerGraph | None = None) -> tuple[LayerGraph | None, list[Merge],
                                                                                      str]:  # fmt: skip
    """The suspect with its branch groups merged (None when there are none that the reference, if given,
    explains), the merges, and why."""
    groups, skipped = find_groups(suspect, reference)
    tail = f" ({'; '.join(skipped)})" if skipped else ""
    if not groups:
        return None, [], "no layer split into parallel branches" + tail
    ref_layers = {x.name: x for x in reference.layers} if reference is not None else {}
    taken = {x.name for x in suspect.layers}
    layers = list(suspect.layers)
    edges = list(suspect.edges)
    merges: list[Merge] = []
    for members, mode, evidence in groups:
        m = _ENTRY.match(module_path(members[0]))
        parent = m.group(1) if m is not None else members[0].name
        merged = _merged(members, mode, parent)
        shape = merged.weight.shape  # type: ignore[union-attr]
        name = parent
        ref_name: str | None = None
        if reference is not None:
            ref = ref_layers.get(parent)
            if ref is None or ref.weight is None or ref.weight.shape != shape:
                ref = next((x for x in reference.layers if x.weight is not None and x.weight.shape == shape
                            and x.kind is merged.kind and x.name not in taken), None)  # fmt: skip
            if ref is None:
                return None, [], (f"{', '.join(x.name for x in members)} merged ({mode}) would be {list(shape)},"
                                  " a shape no layer of the reference has: left alone")  # fmt: skip
            name = ref_name = ref.name
        if name in taken and name not in {x.name for x in members}:
            return None, [], f"merged, {', '.join(x.name for x in members)} would take the name {name}, already used"
        params = {role: TensorRef.from_tensor(f"{name}.{role}", t.read()) for role, t in merged.params.items()}
        merged = dataclasses.replace(merged, name=name, params=params)
        taken.add(name)
        names = [x.name for x in members]
        first = min(i for i, x in enumerate(layers) if x.name in names)
        layers = [x for x in layers if x.name not in names]
        layers.insert(first, merged)
        edges = _rewire(edges, names, name, mode=mode)
        merges.append(Merge(names, mode, name, evidence, ref_name))
    note = "restore-branches: " + ", ".join(f"{' + '.join(x.members)} merged into {x.name}" for x in merges)
    graph = dataclasses.replace(suspect, layers=layers, edges=edges, files=list(suspect.files),
                                metadata=dict(suspect.metadata), notes=[*suspect.notes, note])  # fmt: skip
    return graph, merges, f"{len(merges)} branch group(s) merged" + tail


class BranchRestorer(StructuralRestorer):
    """Merges a layer split into parallel branches (outputs concatenated, or inputs split and summed) back
    into one layer named as the reference's, before alignment; the guard judges the merged graph."""

    id = "restore-branches"
    order: ClassVar[int] = 12
    description = "Merge layers split into parallel branches (concatenated or summed) back into one layer."
    rows_key = "merges"

    def rewrite(
        self, suspect: LayerGraph, reference: LayerGraph
    ) -> tuple[LayerGraph | None, list[dict[str, Any]], list[dict[str, Any]], str]:
        """The merged suspect, one row per merge, and why."""
        merged, merges, why = merge_branches(suspect, reference)
        layers = [
            {"name": x.name, "reference": x.reference,
             "note": f"merged {' + '.join(x.members)} ({'concatenated' if x.mode == 'outputs' else 'summed'};"
                     f" exact, residual 0; from {x.evidence})"}
            for x in merges
        ]  # fmt: skip
        return merged, [x.to_log() for x in merges], layers, why
