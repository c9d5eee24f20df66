"""The report's words: plain-language explanations per scheme, metric labels, number formatting.

Every number the HTML shows goes through :func:`fmt`, so the same value is
always written the same way (no locale, fixed significant digits).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "COLUMNS",
    "EXPLANATIONS",
    "METRIC_LABELS",
    "RESTORE_EXPLANATION",
    "VERDICT_WORDS",
    "columns",
    "explanation",
    "fmt",
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

_GR = (
    "Greedy Residuals hides a 256-bit code in the signs of averaged weights (the residuals) of a few chosen"
    " layers; the code is derived from the owner's digital signature on the copyright statement, and the"
    " audit first checks that this signature verifies under the public key in the owner's bundle. For each"
    " layer the audit counts how many residual signs agree with the code. A model that never carried the"
    " watermark agrees on about half of them, as coin flips would (the 50% line in the picture). The"
    " p-value is the probability that chance alone gives an agreement at least this far from half, corrected"
    " for the number of layers tried; the verdict is 'found' only when it is below the threshold shown. The"
    " forging bound is the paper's estimate of how likely a forger's random signature would fit as well."
    " What this does not prove: who owns the public key (that needs outside evidence, such as a dated"
    " publication of the key or the signed statement), when or by whom the suspect was copied, or that the"
    " owner did not train the suspect themselves. 'Not found' does not prove independence: heavy retraining,"
    " distillation or edits the restore stage did not undo can erase the code."
)
_HUFUNET = (
    "HufuNet splits a small secret network in two: the owner hides one piece (EPH, its convolution kernels)"
    " at positions in the model chosen with a secret key and keeps the other piece (SPH). The audit recomputes"
    " the positions from the owner's secret bundle, reads the kernels found there in the suspect, puts the"
    " secret network back together and measures its accuracy on a public test set (Acc_combined). If the"
    " hidden piece is there, the rebuilt network works almost as well as the owner's (Acc_original); DiffAcc"
    " is the relative drop, and the paper counts ownership when it is below tau_acc. Kernels taken from an"
    " unrelated model give about chance accuracy (one class in ten). The binomial p-value is the probability"
    " of at least that many correct answers by guessing, and the bit-identical fraction is the share of hidden"
    " weights found exactly unchanged. What this does not prove: whoever holds the secret bundle could plant"
    " the kernels, so the bundle's provenance (who made it, when, who has held it) needs outside evidence;"
    " 'not found' does not prove independence, since fine-tuning, pruning or re-training can destroy the"
    " kernels; the accuracy is measured on the test split identified by its SHA-256 and on nothing else."
)
_GENERIC = (
    "This finding comes from the detector '{detector}', which this report does not describe in its own words:"
    " the summary sentence and the numbers are the detector's own (see its documentation for what each"
    " measures). Like any watermark check, a finding is statistical evidence about the weights in this file;"
    " it does not by itself prove who trained the model, when, or how it was obtained, and a negative finding"
    " does not prove that the model is independent of the owner's."
)
_CORE = (
    "auditor itself recorded this finding: no installed detector reads owner bundles of this scheme, so the"
    " watermark was not looked for. It says nothing about the suspect either way."
)
_ERROR = (
    "The detector failed before it reached a result; the message above is what it reported. An error is not"
    " evidence about the suspect in either direction; the other findings stand on their own."
)
EXPLANATIONS = {"greedy-residuals": _GR, "hufunet": _HUFUNET}
RESTORE_EXPLANATION = (
    "Restorers undo edits that keep a model working while scrambling where its weights sit: channels put in"
    " another order, scaled or negated, batch-norm folded into the convolution, channels cut off or added."
    " Each restorer compares the suspect with the owner's reference model and aligns it; the detectors then"
    " read the aligned weights. The table gives, per layer, how many channels were moved and how similar the"
    " suspect's channels were to the reference before and after aligning (1 is identical, 0 unrelated)."
    " A high similarity after aligning shows that the layer is derived from the reference; it is not the"
    " watermark evidence, which comes from the detectors' findings below."
)

METRIC_LABELS = {
    "identity_verified": "owner's signature verifies",
    "p_threshold": "p-value threshold",
    "layers_tried": "layers compared",
    "layers_missing": "layers not found in the suspect",
    "suspect_layers_m": "suspect layers a forger could use (M)",
    "combined_p": "p-value (Bonferroni over layers)",
    "log10_combined_p": "log10 p-value (Bonferroni)",
    "fisher_p": "p-value (Fisher's method)",
    "log10_fisher_p": "log10 p-value (Fisher)",
    "best_layer": "best layer",
    "best_k": "matching bits in the best layer",
    "bits": "signature bits per layer",
    "best_rate": "match rate in the best layer",
    "best_detection_rate": "detection rate in the best layer",
    "min_forging_bound": "forging bound",
    "log10_min_forging_bound": "log10 forging bound",
    "acc_combined": "Acc_combined (rebuilt HufuNet)",
    "acc_original": "Acc_original (owner's HufuNet)",
    "acc_original_measured": "Acc_original measured here",
    "diff_acc": "DiffAcc",
    "tau_acc": "tau_acc (DiffAcc threshold)",
    "chance": "chance accuracy",
    "binomial_p": "binomial p-value",
    "log10_binomial_p": "log10 binomial p-value",
    "bit_identical_fraction": "EPH weights bit-identical",
    "kernels_identical_fraction": "EPH kernels bit-identical",
    "kernels": "EPH kernels",
    "host_kernels": "host kernels (N)",
    "eph_fraction": "EPH share of host kernels",
    "test_size": "test images",
    "correct": "correct answers",
    "non_finite_weights": "non-finite weights read",
    "error_type": "error",
    "k": "matching bits",
    "log10_p": "log10 p-value",
    "log10_forging_bound": "log10 forging bound",
    "suspect_name": "suspect layer",
    "found_by": "found by",
    "release_rate": "rate at release",
    "inverted": "negated",
}

#: Column order of known tables; other tables put ``name`` first and the rest in sorted order.
COLUMNS = {
    ("greedy-residuals", "layers"): (
        "name", "found_by", "suspect_name", "k", "bits", "rate", "inverted", "log10_p", "log10_forging_bound",
        "note", "release_rate", "folded",
    ),
    ("hufunet", "host_layers"): (
        "name", "found_by", "suspect_name", "kernels", "eph_kernels_here", "bit_identical_kernels",
        "bit_identical", "note",
    ),
    ("restore", "layers"): (
        "name", "reference", "moved", "similarity_before", "similarity_after", "scale", "sign", "negated",
        "padded", "dropped", "derived", "note",
    ),
}  # fmt: skip


_PERCENT = ("acc_combined", "acc_original", "acc_original_measured", "chance")


def label(key: str) -> str:
    """A metric's reader-facing name (the key itself where none is known)."""
    return METRIC_LABELS.get(key, key.replace("_", " "))


def explanation(scheme: str, detector: str, verdict: str) -> str:
    """The plain-language paragraph that goes with a finding."""
    if verdict == "error":
        return _ERROR
    if detector == "core":
        return _CORE
    return EXPLANATIONS.get(scheme, _GENERIC.format(detector=detector))


def fmt(value: Any, key: str = "") -> str:
    """``value`` as the report writes it: fixed digits, percentages for fractions and rates, no locale."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key.endswith(("_fraction", "rate")) or key in _PERCENT:
            return f"{value:.2%}"
        if key.startswith(("log10_", "similarity")) or key in ("diff_acc", "tau_acc"):
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


def columns(scheme: str, key: str, rows: list[Any], limit: int = 10) -> tuple[list[str], bool]:
    """The columns a table of ``rows`` (dicts) shows: a known table's order, else ``name`` then the rest
    sorted; at most ``limit`` (the JSON twin has them all). Returns the columns and whether some were left out."""
    present = sorted({k for row in rows if isinstance(row, dict) for k in row})
    known = [c for c in COLUMNS.get((scheme, key), ("name",)) if c in present]
    ordered = known + [c for c in present if c not in known]
    return ordered[:limit], len(ordered) > limit


def scalar_items(mapping: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (label, value) pairs of ``mapping``'s plain values (no lists or objects), by key."""
    return [(label(k), v) for k, v in sorted(mapping.items()) if not isinstance(v, dict | list)]


def nested_items(mapping: dict[str, Any], *skip: str) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``mapping``'s lists and objects, by key, leaving out ``skip``."""
    return [(k, v) for k, v in sorted(mapping.items()) if isinstance(v, dict | list) and k not in skip]
