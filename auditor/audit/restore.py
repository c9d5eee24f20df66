"""Run restorers between loading and detection: each in isolation, in ascending ``order``.

The core holds no restore logic: it hands the suspect and the owner's
reference to every registered :class:`~auditor.bases.Restorer` in turn, each
receiving the previous one's output, and collects their logs for the report.
A restorer that raises leaves the graph as it was before it ran and is logged
as an error, so one broken plugin never loses the audit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from auditor.bases import Restorer
from auditor.graph import LayerGraph
from auditor.plugin_manager import components

__all__ = ["run_restorers"]


def run_restorers(
    suspect: LayerGraph, reference: LayerGraph, *, restorers: Sequence[Restorer] | None = None
) -> tuple[LayerGraph, list[dict[str, Any]]]:
    """The suspect after every restorer, and one log entry per restorer.

    Restorers run in ascending ``(order, id)``. Each entry is
    ``{"restorer": id, "order": n, "status": "ok", "log": {...}}`` or, for one
    that raised or returned something other than a graph,
    ``{"restorer": id, "order": n, "status": "error", "error": "..."}``.
    """
    chosen = restorers if restorers is not None else components("restorers", Restorer)
    graph = suspect
    entries: list[dict[str, Any]] = []
    for restorer in sorted(chosen, key=lambda r: (r.order, r.id)):
        entry: dict[str, Any] = {"restorer": restorer.id, "order": restorer.order}
        try:
            result = restorer.restore(graph, reference)
            if (
                not isinstance(result, tuple)
                or len(result) != 2
                or not isinstance(result[0], LayerGraph)
                or not isinstance(result[1], dict)
            ):
                raise TypeError(f"restore() returned {type(result).__name__}, not (LayerGraph, dict)")
        except Exception as exc:  # isolation is the point: record it and go on with the graph as it was
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
        else:
            graph = result[0]
            entry.update(status="ok", log=result[1])
        entries.append(entry)
    return graph, entries
