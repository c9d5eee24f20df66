"""The report's own words: verdicts, the explanations of results no component explains, number formatting.

Every number the HTML shows goes through :func:`fmt`, so the same value is
always written the same way (no locale, fixed significant digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AFTER_RESTORE",
    "AS_GIVEN",
    "CORE_EXPLANATION",
    "ERROR_EXPLANATION",
    "GENERIC_LIMITS",
    "GENERIC_NULL",
    "UNVERIFIED_REFERENCE",
    "VERDICT_WORDS",
    "columns",
    "fmt",
    "generic_explanation",
    "label",
    "natural_key",
    "nested_items",
    "power_of_ten",
    "exact_float",
    "scalar_items",
    "sorted_items",
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
#: What a finding's numbers were measured on (its ``measured_on``): the file as read, or the restore stage's
#: output (aligned with the reference model, which changes weights' order, scale and last bits).
AS_GIVEN = "the suspect as given"
AFTER_RESTORE = "the suspect after restore"
#: What the verdict's wording adds when the reference model is not verified as the owner's released model.
UNVERIFIED_REFERENCE = "the restore evidence rests on an unverified reference"
#: The first screen's words where a detector gives none of its own.
GENERIC_NULL = "not stated by the detector (its explanation in the findings below says what the numbers mean)"
GENERIC_LIMITS = (
    "A watermark finding is statistical evidence about the weights in this file: it does not by itself prove"
    " who trained the model, when, or how it was obtained, and a negative finding does not prove that the"
    " model is independent of the owner's."
)
#: How a mantissa and its power of ten are joined: a multiplication sign between spaces.
TIMES = " \u00d7 "
#: The smallest positive normal float: a probability below it has no exact float (only a denormal or 0).
SMALLEST_NORMAL = 2.2250738585072014e-308
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


def exact_float(log10: float) -> float | None:
    """The probability ``10 ** log10`` as a float where one holds it to full precision, else ``None`` (below
    the smallest normal float a probability would be a denormal or 0 pretending to be exact; its log10,
    stored beside it, is the number)."""
    if not math.isfinite(log10):
        return 0.0 if log10 < 0 else None
    value = 10.0 ** min(log10, 0.0)
    return value if value >= SMALLEST_NORMAL else None


def power_of_ten(log10: Any) -> str:
    """A probability given by its exact log10, as the report writes it: a plain number down to 0.001, a power
    of ten below that (4.3 times 10^-329 is ``4.3 \u00d7 10^-329``), however far below the smallest float;
    never 0 unless exactly 0."""
    if isinstance(log10, bool) or not isinstance(log10, int | float) or math.isnan(log10):
        return "—"
    if math.isinf(log10):
        return "0 (exactly)" if log10 < 0 else "—"
    if log10 >= -3:
        return f"{10.0 ** min(log10, 0.0):.3g}"
    exponent = math.floor(log10)
    mantissa = f"{10.0 ** (log10 - exponent):.2g}"
    if mantissa == "10":  # 9.96 rounds up to the next power
        mantissa, exponent = "1", exponent + 1
    return f"10^{exponent}" if mantissa == "1" else f"{mantissa}{TIMES}10^{exponent}"


def natural_key(key: Any) -> tuple[int, float, str]:
    """A sort key that puts numeric keys first, in numeric order (``"2"`` before ``"10"``), then the rest by text."""
    text = str(key)
    try:
        number = float(text)
    except ValueError:
        return (1, 0.0, text)
    return (0, number, text) if math.isfinite(number) else (1, 0.0, text)


def sorted_items(mapping: Any) -> list[tuple[Any, Any]]:
    """``mapping``'s items sorted by :func:`natural_key` (channel numbers as numbers, not as text)."""
    return sorted(mapping.items(), key=lambda kv: natural_key(kv[0])) if isinstance(mapping, dict) else []


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
        if abs(value) < SMALLEST_NORMAL and key.endswith(("_p", "p_value", "forging_bound")):
            # A probability this small underflows (to a denormal or 0) in floating point: its log10 is the number.
            return "below 10^-308 (see its log10)"
        if value == 0:
            return "0"
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
        return ", ".join(f"{k}={fmt(v, str(k))}" for k, v in sorted_items(value))
    return str(value)


def columns(order: Sequence[str], rows: list[Any], limit: int = 10) -> tuple[list[str], bool]:
    """The columns a table of ``rows`` (dicts) shows: ``order`` (the component's), else ``name``, then the
    rest sorted; at most ``limit`` (the JSON twin has them all). Returns the columns and whether some were cut."""
    present = sorted({k for row in rows if isinstance(row, dict) for k in row})
    known = [c for c in (order or ("name",)) if c in present]
    ordered = known + [c for c in present if c not in known]
    return ordered[:limit], len(ordered) > limit


def scalar_items(mapping: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``mapping``'s plain values (no lists or objects), by key (numbers numerically)."""
    return [(k, v) for k, v in sorted_items(mapping) if not isinstance(v, dict | list)]


def nested_items(mapping: dict[str, Any], *skip: str) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``mapping``'s lists and objects, by key (numbers numerically), leaving out ``skip``."""
    return [(k, v) for k, v in sorted_items(mapping) if isinstance(v, dict | list) and k not in skip]
