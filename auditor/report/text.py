"""The report's own words: verdicts, the explanations of results no component explains, number formatting.

Every number the HTML shows goes through :func:`fmt`, so the same value is
always written the same way (no locale, fixed significant digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CORE_EXPLANATION",
    "ERROR_EXPLANATION",
    "VERDICT_WORDS",
    "columns",
    "fmt",
    "generic_explanation",
    "label",
    "nested_items",
    "scalar_items",
]

VERDICT_WORDS = {
    "detected": "watermark found",
    "not-detected": "watermark not found",
    "inconclusive": "inconclusive",
    "error": "detector failed",
}

_GENERIC = (
    "This {result} comes from the {what} '{id}', which this report does not describe in its own words:"
    " the summary sentence and the numbers are the {what}'s own (see its documentation for what each"
    " measures). Like any watermark check, a finding is statistical evidence about the weights in this file;"
    " it does not by itself prove who trained the model, when, or how it was obtained, and a negative finding"
    " does not prove that the model is independent of the owner's."
)
CORE_EXPLANATION = (
    "auditor itself recorded this finding: no installed detector reads owner bundles of this scheme, so the"
    " watermark was not looked for. It says nothing about the suspect either way."
)
ERROR_EXPLANATION = (
    "The detector failed before it reached a result; the message above is what it reported. An error is not"
    " evidence about the suspect in either direction; the other findings stand on their own."
)
#: Labels of the keys the core itself writes into results.
_LABELS = {"error_type": "error"}


def label(key: str) -> str:
    """A key's reader-facing name where its component gives none: the key with spaces for underscores."""
    return _LABELS.get(key, key.replace("_", " "))


def generic_explanation(kind: str, component_id: str) -> str:
    """The paragraph for a result whose component gives no explanation of its own."""
    if kind == "detectors":
        return _GENERIC.format(result="finding", what="detector", id=component_id)
    return _GENERIC.format(result="log", what="restorer", id=component_id)


def fmt(value: Any, key: str = "", *, percent: bool = False) -> str:
    """``value`` as the report writes it: fixed digits, percentages for fractions and rates (and where
    ``percent`` says so), no locale."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if percent or key.endswith(("_fraction", "rate")):
            return f"{value:.2%}"
        if key.startswith(("log10_", "similarity")):
            return f"{value:.3f}"
        if value == 0:
            # A probability this small underflows to 0 in floating point; its log10 next to it is exact.
            return "0 (below 1e-308: see its log10)" if key.endswith(("_p", "p_value", "forging_bound")) else "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, list):
        if not value:
            return "—"
        if len(value) <= 8 and all(not isinstance(v, dict | list) for v in value):
            return ", ".join(fmt(v) for v in value)
        return f"{len(value)} values"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, k)}" for k, v in sorted(value.items()))
    return str(value)


def columns(order: Sequence[str], rows: list[Any], limit: int = 10) -> tuple[list[str], bool]:
    """The columns a table of ``rows`` (dicts) shows: ``order`` (the component's), else ``name``, then the
    rest sorted; at most ``limit`` (the JSON twin has them all). Returns the columns and whether some were cut."""
    present = sorted({k for row in rows if isinstance(row, dict) for k in row})
    known = [c for c in (order or ("name",)) if c in present]
    ordered = known + [c for c in present if c not in known]
    return ordered[:limit], len(ordered) > limit


def scalar_items(mapping: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``mapping``'s plain values (no lists or objects), by key."""
    return [(k, v) for k, v in sorted(mapping.items()) if not isinstance(v, dict | list)]


def nested_items(mapping: dict[str, Any], *skip: str) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``mapping``'s lists and objects, by key, leaving out ``skip``."""
    return [(k, v) for k, v in sorted(mapping.items()) if isinstance(v, dict | list) and k not in skip]
