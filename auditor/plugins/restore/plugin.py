"""The built-in restorers, in the order they run: transformer (8, :mod:`.heads`), canonical form (10), basis
(16), channels (20), fold (30), scale (40) (docs/restore.md).

Channel order comes first because every later step compares a suspect channel
with *its* reference channel; |cosine| finds it whatever the channel's scale,
sign or folding. Unfolding needs the reference's channel to measure the
folded factor against; scale comes last. Each restorer plans against the
graph it receives and asks the guard (:mod:`.guard`) before it changes
anything, so each is safe alone and an innocent model passes through all three
untouched, with the reason in the log. The plan is made once per suspect graph
(:func:`shared_plan`): a restorer that changes nothing hands the next one the
same graph, and with it the same plan; only a changed graph is planned again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from auditor import hookimpl
from auditor.bases import Restorer
from auditor.graph import LayerGraph
from auditor.plugins.restore import guard as _guard
from auditor.plugins.restore import report
from auditor.plugins.restore.structural import too_large

if TYPE_CHECKING:  # the planning modules import torch: they load when a restorer runs, not when it registers
    from auditor.plugins.restore.plan import Plan

__all__ = [
    "BasisRestorer",
    "CanonicalRestorer",
    "ChannelRestorer",
    "FoldRestorer",
    "GuardedRestorer",
    "ScaleRestorer",
    "register_restorers",
    "shared_plan",
]

_last_plan: tuple[weakref.ref[LayerGraph], weakref.ref[LayerGraph], Plan] | None = None


def shared_plan(suspect: LayerGraph, reference: LayerGraph) -> Plan:
    """The plan of ``suspect`` against ``reference``, made once for this pair of graph objects.

    The restorers run one after another on the graph the previous one returned,
    which is the same object when it changed nothing; the plan (layer alignment
    and channel matching, the costly part) is then the same too. The last plan
    is kept with weak references to its graphs, so that it never outlives them
    and a new graph that happens to get an old one's ``id`` is never mistaken
    for it. Nothing that uses a plan may change it.
    """
    global _last_plan
    from auditor.plugins.restore.plan import make_plan

    last = _last_plan  # one read: another thread may replace it (then both plan, and both plans are right)
    if last is not None and last[0]() is suspect and last[1]() is reference:
        return last[2]
    plan = make_plan(suspect, reference)
    _last_plan = (weakref.ref(suspect), weakref.ref(reference), plan)
    return plan


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _layers_log(plan: Plan) -> list[dict[str, Any]]:
    """One row per producer, in the report's terms (``permutation``: suspect channel -> reference channel)."""
    rows = []
    for m in plan.matches.values():
        space = next(sp for sp in plan.spaces if m.layer in sp.producers)
        index = plan.maps.get(space.id)
        permutation: list[int | None] | None = None
        if index is not None:
            permutation = [None] * space.width
            for ref_slot, s in enumerate(index.tolist()):
                if s >= 0:
                    permutation[s] = ref_slot
        rows.append({
            "name": m.layer, "reference": m.reference, "moved": m.moved, "similarity_before": _round(m.before),
            "similarity_after": _round(m.after) if m.inputs_aligned else None, "padded": len(m.padded),
            "dropped": len(m.dropped), "padded_channels": m.padded, "dropped_channels": m.dropped,
            "permutation": permutation, "note": m.frozen and f"kept in place: {m.frozen}",
        })  # fmt: skip
    return rows


class GuardedRestorer(Restorer):
    """A restorer that plans against the reference and acts only if the guard finds the suspect derived.

    ``guard=False`` switches the guard off (tests show what that would let
    happen to an innocent model); ``threshold`` overrides the calibrated one."""

    order: ClassVar[int] = 100
    explanation = report.EXPLANATION
    metric_labels = report.METRIC_LABELS
    columns = report.COLUMNS

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        """The similarity chart and the channel matching of the logged layers."""
        return report.figure(entry)

    def __init__(self, *, guard: bool = True, threshold: float = _guard.THRESHOLD) -> None:
        self.guarded = guard
        self.threshold = threshold

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        """The restored suspect (or the suspect itself, untouched) and the log."""
        if (skipped := too_large(suspect, reference, guarded=self.guarded)) is not None:
            return suspect, skipped
        plan = shared_plan(suspect, reference)
        evidence = _guard.assess(plan.matches.values(), threshold=self.threshold)
        log: dict[str, Any] = {
            "acted": False, "edges_from": plan.edges_from, "evidence": evidence.to_log(),
            "guard": "on" if self.guarded else "off", "notes": list(plan.notes),
        }  # fmt: skip
        if self.guarded and not evidence.derived:
            log["reason"] = f"left alone: not demonstrably derived from the reference ({evidence.reason})"
            return suspect, log
        return self.act(suspect, reference, plan, log)

    def act(
        self, suspect: LayerGraph, reference: LayerGraph, plan: Plan, log: dict[str, Any]
    ) -> tuple[LayerGraph, dict[str, Any]]:
        """Do the restorer's work once the guard allows it; fill ``log``."""
        raise NotImplementedError


class CanonicalRestorer(GuardedRestorer):
    """Fuses linear chains (a layer factored into ``Q^T W`` then ``Q``) back into one layer, before alignment.

    The guard judges the fused graph: the fusion stands only if the fused
    suspect is demonstrably derived from the reference; otherwise the suspect
    is returned untouched, with the guard's evidence and the fusions it tried
    in the log (:mod:`.canonical`)."""

    id = "restore-canonical"
    order = 10
    description = "Fuse chains of linear layers with nothing nonlinear between them (conv -> 1x1 conv, linear pairs)."

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        """The fused suspect (or the suspect itself, untouched) and the log."""
        if (skipped := too_large(suspect, reference, guarded=self.guarded)) is not None:
            return suspect, skipped
        from auditor.plugins.restore.canonical import fuse_chains

        fused, fusions, why = fuse_chains(suspect, reference)
        log: dict[str, Any] = {"acted": False, "guard": "on" if self.guarded else "off", "notes": [], "reason": why}
        if fused is None:
            return suspect, log
        plan = shared_plan(fused, reference)
        evidence = _guard.assess(plan.matches.values(), threshold=self.threshold)
        log.update(edges_from=plan.edges_from, evidence=evidence.to_log(), notes=list(plan.notes))
        log["fusions"] = [f.to_log() for f in fusions]
        log["layers"] = [
            {"name": f.fused, "reference": f.reference, "note": f"fused {f.first} -> {f.second}"
             f" (residual {f.residual:.2g}; edges: {f.edges})",
             "similarity_after": _round(plan.matches[f.fused].after) if f.fused in plan.matches else None}
            for f in fusions
        ]  # fmt: skip
        if self.guarded and not evidence.derived:
            log["reason"] = f"left alone: fused, not demonstrably derived from the reference ({evidence.reason})"
            return suspect, log
        log.update(acted=True, reason=f"{why}; the fused suspect is derived from the reference")
        return fused, log


class BasisRestorer(GuardedRestorer):
    """Removes an invertible map between two linear layers (``A W1``, ``W2 A^-1``), estimated against the
    reference, so that the channel steps see the reference's basis (:mod:`.basis`); behind the guard."""

    id = "restore-basis"
    order = 16
    description = "Remove an invertible map between two linear layers, estimated against the reference (LFEA)."

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        """The aligned suspect (or the suspect itself, untouched) and the log."""
        if (skipped := too_large(suspect, reference, guarded=self.guarded)) is not None:
            return suspect, skipped
        from auditor.plugins.restore.basis import align_bases

        aligned, fits, why = align_bases(suspect, reference, shared_plan)
        log: dict[str, Any] = {"acted": False, "guard": "on" if self.guarded else "off", "notes": [], "reason": why,
                               "maps": [f.to_log() for f in fits]}  # fmt: skip
        log["layers"] = [{"name": f.first, "reference": f.reference_first, "note": f"{f.first} -> {f.second}: {f.note}"}
                         for f in fits]  # fmt: skip
        if aligned is None:
            return suspect, log
        plan = shared_plan(aligned, reference)
        evidence = _guard.assess(plan.matches.values(), threshold=self.threshold)
        log.update(edges_from=plan.edges_from, evidence=evidence.to_log(), notes=list(plan.notes))
        if self.guarded and not evidence.derived:
            log["reason"] = f"left alone: aligned, not demonstrably derived from the reference ({evidence.reason})"
            return suspect, log
        log.update(acted=True, reason=f"{why}; the aligned suspect is derived from the reference")
        return aligned, log


class ChannelRestorer(GuardedRestorer):
    """Restores channel order: permutation, expansion (dropped) and cut-off (padded with zeros)."""

    id = "restore-channels"
    order = 20
    description = "Put the suspect's channels back in the reference's order; drop added, zero-pad cut-off channels."

    def act(
        self, suspect: LayerGraph, reference: LayerGraph, plan: Plan, log: dict[str, Any]
    ) -> tuple[LayerGraph, dict[str, Any]]:
        """Apply the plan's channel maps to every producer, per-channel layer and reader."""
        import torch

        from auditor.toolkit.channels import apply_channel_maps, graph_with_tensors, tensors_of

        log["layers"] = _layers_log(plan)
        spaces = {sp.id: sp for sp in plan.spaces}
        maps = {
            sid: index
            for sid, index in plan.maps.items()
            if len(index) != spaces[sid].width or not torch.equal(index, torch.arange(len(index)))
        }
        if not maps:
            log["reason"] = "every channel is already in the reference's order"
            return suspect, log
        names = {n for sid in maps for n in spaces[sid].producers + spaces[sid].passthrough}
        names |= {c.layer for sid in maps for c in spaces[sid].consumers}
        tensors = apply_channel_maps(suspect, tensors_of(suspect, names), plan.spaces, maps)
        moved = sum(m.moved for m in plan.matches.values())
        log.update(acted=True, reason=f"channel order restored in {len(maps)} channel space(s)")
        note = f"restore-channels: {moved} channel(s) moved in {len(maps)} channel space(s) (see the restore log)"
        return graph_with_tensors(suspect, tensors, note=note), log


class FoldRestorer(GuardedRestorer):
    """Unfolds batch-norm that an export folded into the convolution before it."""

    id = "restore-fold"
    order = 30
    description = "Give folded convolutions their batch-norm back, with the reference's running statistics."

    def act(
        self, suspect: LayerGraph, reference: LayerGraph, plan: Plan, log: dict[str, Any]
    ) -> tuple[LayerGraph, dict[str, Any]]:
        """Unfold every folded convolution whose reference counterpart has a batch-norm after it."""
        from auditor.plugins.restore.fold import unfold

        graph, entries = unfold(suspect, reference, plan)
        log["layers"] = entries
        if graph is None:
            log["reason"] = "no folded convolution where the reference has one followed by batch-norm"
            return suspect, log
        log.update(acted=True, reason=f"{sum(1 for e in entries if e.get('unfolded'))} layer(s) unfolded")
        return graph, log


class ScaleRestorer(GuardedRestorer):
    """Divides out per-channel scale factors and sign flips."""

    id = "restore-scale"
    order = 40
    description = "Divide out per-channel scale factors and sign flips (after channel order is restored)."

    def act(
        self, suspect: LayerGraph, reference: LayerGraph, plan: Plan, log: dict[str, Any]
    ) -> tuple[LayerGraph, dict[str, Any]]:
        """Estimate each channel's factor against the reference and divide it out."""
        from auditor.plugins.restore.scale import restore_scales
        from auditor.toolkit.channels import graph_with_tensors

        tensors, entries, notes = restore_scales(suspect, reference, plan)
        log["layers"] = entries
        log["notes"] += notes
        if not tensors:
            log["reason"] = "no channel is scaled or negated beyond fine-tuning noise"
            return suspect, log
        scaled = sum(e["scaled"] for e in entries)
        log.update(acted=True, reason=f"{scaled} channel factor(s) divided out")
        note = f"restore-scale: {scaled} channel factor(s) divided out (see the restore log)"
        return graph_with_tensors(suspect, tensors, note=note), log


@hookimpl
def register_restorers(register: Callable[[Restorer], None]) -> None:
    """Register the transformer, canonical-form, basis, branch, dummy-unit, channel, fold and scale restorers."""
    from auditor.plugins.restore.branches import BranchRestorer  # here: they import this module
    from auditor.plugins.restore.dummies import DummyRestorer
    from auditor.plugins.restore.heads import TransformerRestorer

    register(TransformerRestorer())
    register(CanonicalRestorer())
    register(BasisRestorer())
    register(BranchRestorer())
    register(DummyRestorer())
    register(ChannelRestorer())
    register(FoldRestorer())
    register(ScaleRestorer())
