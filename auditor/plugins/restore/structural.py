"""What the structural restorers share (``restore-branches``, ``restore-dummies``): rewrite the suspect,
then let the guard judge the rewritten graph.

Each subclass gives :meth:`StructuralRestorer.rewrite`: the rewritten suspect (or None when there is
nothing to rewrite that the reference explains), the log rows of what it did, and why. The guard then
plans the rewritten suspect against the reference (:func:`~.plan.make_plan`, the channel matching the
other restorers use) and the rewrite stands only if that suspect is demonstrably derived from the
reference; otherwise the suspect is returned untouched, with the guard's evidence and the rows of what
would have been done. Nothing here imports the plugin module, which registers these restorers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.bases import Restorer
from auditor.graph import LayerGraph
from auditor.plugins.restore import guard as _guard
from auditor.plugins.restore import report

if TYPE_CHECKING:  # the plan imports torch: it loads when a restorer runs, not when it registers
    from auditor.plugins.restore.plan import LayerMatch

__all__ = ["PLAN_LIMIT", "StructuralRestorer", "too_large"]

#: The most parameters a model may have (the suspect and the reference each) for a restorer that plans every
#: channel space (:func:`~.plan.make_plan`): the plan holds both models as float32, 1.6 GB at this limit and
#: 54 GB at seven billion. Above it such a restorer leaves the suspect alone and says why; restore-transformer
#: streams and judges its rewrite in place (:attr:`StructuralRestorer.streams`).
PLAN_LIMIT = 200_000_000


def too_large(suspect: LayerGraph, reference: LayerGraph, *, guarded: bool = True) -> dict[str, Any] | None:
    """The log of a restorer that leaves a model above :data:`PLAN_LIMIT` alone, or None when both fit."""
    size = max(suspect.parameter_count, reference.parameter_count)
    if size <= PLAN_LIMIT:
        return None
    which = "suspect" if suspect.parameter_count >= reference.parameter_count else "reference"
    return {"acted": False, "guard": "on" if guarded else "off", "notes": [], "reason": (
        f"left alone: the {which} has {size:,} parameters, more than the {PLAN_LIMIT:,} this restorer's channel "
        "plan holds in memory (both models as float32)")}  # fmt: skip


class StructuralRestorer(Restorer):
    """A restorer that rewrites the suspect's structure and keeps the rewrite only if the guard allows it.

    ``guard=False`` switches the guard off (tests show what it would let happen to an innocent model);
    ``threshold`` overrides the calibrated one."""

    order: ClassVar[int] = 100
    explanation = report.EXPLANATION
    metric_labels = report.METRIC_LABELS
    columns = report.COLUMNS
    #: The log's key for the rows :meth:`rewrite` returns (``merges``, ``removals``).
    rows_key: ClassVar[str] = "changes"
    #: True for a restorer whose rewrite and :meth:`judge` read the models a tensor at a time; the others
    #: leave models above :data:`PLAN_LIMIT` alone.
    streams: ClassVar[bool] = False

    def __init__(self, *, guard: bool = True, threshold: float = _guard.THRESHOLD) -> None:
        self.guarded = guard
        self.threshold = threshold

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        """The similarity chart of the logged layers."""
        return report.figure(entry)

    def rewrite(
        self, suspect: LayerGraph, reference: LayerGraph
    ) -> tuple[LayerGraph | None, list[dict[str, Any]], list[dict[str, Any]], str]:
        """The rewritten suspect (None: nothing to do), the log rows, the layer-table rows
        (``name``, ``reference``, ``note``) and why."""
        raise NotImplementedError

    def judge(self, rewritten: LayerGraph, reference: LayerGraph) -> tuple[dict[str, LayerMatch], str, list[str]]:
        """The guard's evidence about ``rewritten``: the matched layers, where the edges came from, and notes.
        The channel plan's (:func:`~.plan.make_plan`) unless a subclass has a cheaper equivalent."""
        from auditor.plugins.restore.plan import make_plan

        plan = make_plan(rewritten, reference)
        return plan.matches, plan.edges_from, list(plan.notes)

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        """The rewritten suspect (or the suspect itself, untouched) and the log."""
        if not self.streams and (skipped := too_large(suspect, reference, guarded=self.guarded)) is not None:
            return suspect, skipped
        rewritten, rows, layers, why = self.rewrite(suspect, reference)
        log: dict[str, Any] = {"acted": False, "guard": "on" if self.guarded else "off", "notes": [], "reason": why}
        if rewritten is None:
            return suspect, log
        matches, edges_from, notes = self.judge(rewritten, reference)
        evidence = _guard.assess(matches.values(), threshold=self.threshold)
        log.update(edges_from=edges_from, evidence=evidence.to_log(), notes=notes)
        log[self.rows_key] = rows
        log["layers"] = [
            {**row, "similarity_after": round(matches[row["name"]].after, 6) if row["name"] in matches else None}
            for row in layers
        ]  # fmt: skip
        if self.guarded and not evidence.derived:
            log["reason"] = f"left alone: {why}, but not demonstrably derived from the reference ({evidence.reason})"
            return suspect, log
        log.update(acted=True, reason=f"{why}; the result is derived from the reference")
        return rewritten, log
