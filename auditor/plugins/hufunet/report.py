"""How HufuNet findings are shown: the explanation, metric labels (deciding number first), the public
details, table columns, the accuracy figure and the bundle summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from auditor.toolkit.figures import BLUE, GREY, axis, finite, num, svg, text

if TYPE_CHECKING:
    from auditor.graph import LayerGraph

__all__ = [
    "COLUMNS",
    "EXPLANATION",
    "LIMITATIONS",
    "METRIC_LABELS",
    "NULL_HYPOTHESIS",
    "PERCENT",
    "PUBLIC_DETAILS",
    "bundle_summary",
    "describes",
    "figure",
    "first_screen",
]

#: The threshold line: neutral, dashed (no colour reads as guilty or innocent).
THRESHOLD = "#4a5568"
#: At or above this p-value the rebuilt network does no better than guessing: no evidence against chance.
NO_EVIDENCE_P = 0.05

EXPLANATION = (
    "HufuNet splits a small secret network in two: the owner hides one piece (EPH, its convolution kernels)"
    " at positions in the model chosen with a secret key and keeps the other piece (SPH). The audit recomputes"
    " the positions from the owner's secret bundle, reads the kernels found there in the suspect, puts the"
    " secret network back together and measures its accuracy on a public test set (Acc_combined). If the"
    " hidden piece is there, the rebuilt network works almost as well as the owner's (Acc_original); DiffAcc"
    " is the relative drop, and the paper counts ownership when it is below tau_acc. Kernels taken from an"
    " unrelated model give about chance accuracy (one class in ten). The binomial p-value is the probability"
    " of at least that many correct answers by guessing (computed exactly, in log space: one too small for a"
    " floating-point number is written as a power of ten, never as 0). The bit-identical fraction is the share"
    " of hidden weights found exactly unchanged in the weights the detector read: after restore, when a"
    " reference model was given, which realigns and rescales weights, so that share can be 0% on a file whose"
    " network is intact; it is not the deciding number. What this does not prove: whoever holds the secret"
    " bundle could plant the kernels, so the bundle's provenance (who made it, when, who has held it) needs"
    " outside evidence; 'not found' does not prove independence, since fine-tuning, pruning or re-training can"
    " destroy the kernels; the accuracy is measured on the test split identified by its SHA-256 and on"
    " nothing else."
)

#: The null hypothesis the binomial p-value is computed under.
NULL_HYPOTHESIS = (
    "The kernels at the owner's keyed positions are unrelated to the owner's HufuNet, so the rebuilt network can"
    " only guess: each public test image is classified correctly with the chance probability (one class in"
    " the number of classes), independently of the others."
)
#: What a finding does not prove, for the report's first screen.
LIMITATIONS = (
    "Who made the secret bundle, when, or who has held it: anyone holding it could plant the kernels, so its"
    " provenance needs outside evidence. 'Not found' does not prove independence: fine-tuning, pruning or"
    " retraining can destroy the kernels. The accuracy is measured on the public test split identified by its"
    " SHA-256 and on nothing else."
)

#: The deciding numbers first: the rebuilt network's accuracy, its drop against tau_acc, the chance tail.
METRIC_LABELS = {
    "acc_combined": "Acc_combined (rebuilt HufuNet)",
    "diff_acc": "DiffAcc",
    "tau_acc": "tau_acc (DiffAcc threshold)",
    "log10_binomial_p": "log10 binomial p-value",
    "binomial_p": "binomial p-value",
    "p_threshold": "p-value threshold",
    "acc_original": "Acc_original (owner's HufuNet)",
    "acc_original_measured": "Acc_original measured here",
    "chance": "chance accuracy",
    "correct": "correct answers",
    "test_size": "test images",
    "bit_identical_fraction": "EPH weights bit-identical",
    "kernels_identical_fraction": "EPH kernels bit-identical",
    "kernels": "EPH kernels",
    "host_kernels": "host kernels (N)",
    "eph_fraction": "EPH share of host kernels",
    "non_finite_weights": "non-finite weights read",
    "suspect_name": "suspect layer",
    "found_by": "found by",
}
PERCENT = ("acc_combined", "acc_original", "acc_original_measured", "chance")
PUBLIC_DETAILS = ("host_layers", "notes")
COLUMNS = {
    "host_layers": (
        "name", "found_by", "suspect_name", "kernels", "eph_kernels_here", "bit_identical_kernels",
        "bit_identical", "note",
    ),
}  # fmt: skip


def hufunet_accuracy(metrics: Mapping[str, Any]) -> Markup | None:
    """HufuNet: Acc_combined on an accuracy axis, with chance, the tau_acc threshold and Acc_original marked."""
    combined, original = finite(metrics.get("acc_combined")), finite(metrics.get("acc_original"))
    tau, chance = finite(metrics.get("tau_acc")), finite(metrics.get("chance"))
    if combined is None:
        return None
    x0, width, y = 20.0, 620.0, 70.0
    body = axis(x0, width, 50, y + 30, (0, 0.2, 0.4, 0.6, 0.8, 1))
    body.append(
        f'<rect x="{num(x0)}" y="{num(y)}" width="{num(width * min(max(combined, 0), 1))}" height="24" fill="{BLUE}"/>'
    )
    body.append(text(x0 + 6, y + 17, f"Acc_combined {combined:.2%}", fill="#fff"))
    marks: list[tuple[float, str, str, str]] = []
    if chance is not None:
        marks.append((chance, f"chance {chance:.0%}", GREY, "4,3"))
    if original is not None and tau is not None:
        marks.append(
            (original * (1 - tau), f"threshold {original * (1 - tau):.1%} (DiffAcc < {tau:g})", THRESHOLD, "5,3")
        )
    if original is not None:
        marks.append((original, f"Acc_original {original:.1%}", "#111", ""))
    for level, (value, words, colour, dash) in enumerate(sorted(marks)):
        x = x0 + width * min(max(value, 0), 1)
        label_y = 14 + 16 * (level % 3)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(
            f'<line x1="{num(x)}" y1="{num(label_y + 4)}" x2="{num(x)}" y2="{num(y + 30)}" stroke="{colour}"'
            f' stroke-width="2"{dashes}/>'
        )
        anchor = "end" if x > x0 + width * 0.7 else "start"
        body.append(text(x + (-4 if anchor == "end" else 4), label_y, words, anchor=anchor, size=11, fill=colour))
    return svg(y + 50, "Accuracy of the rebuilt HufuNet against chance and the ownership threshold", body)


def figure(entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
    """The accuracy chart of a finding that measured Acc_combined."""
    metrics = entry.get("metrics")
    picture = hufunet_accuracy(metrics) if isinstance(metrics, Mapping) else None
    if picture is None:
        return None
    caption = (
        "Accuracy of the rebuilt HufuNet on the public test set: the owner's HufuNet (black), the ownership"
        " threshold Acc_original x (1 - tau_acc) (dashed) and guessing (grey, dotted)."
    )
    return caption, picture


def bundle_summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a report shows of a HufuNet bundle: the host architecture (never the network, key or positions)."""
    host = payload.get("host")
    arch = host.get("architecture") if isinstance(host, Mapping) else None
    return {"host_architecture": arch if isinstance(arch, str | int | float | bool) else None}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def first_screen(entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The first screen of a HufuNet finding: the claim is that the holder of this secret bundle planted the
    network (HufuNet binds no name); the rebuilt network's accuracy and the binomial tail against guessing."""
    bundle = _mapping(bundle_entry)
    metrics = _mapping(entry.get("metrics"))
    name, sha = bundle.get("name"), bundle.get("sha256")
    host = bundle.get("host_architecture")
    screen: dict[str, Any] = {
        "owner": "Whoever holds the secret owner bundle" + (f" {name}" if name else "")
        + (f" (SHA-256 {sha})" if sha else "")
        + (f", made for a {host} host" if host else ""),
        "owner_basis": (
            "HufuNet binds no name or key to the watermark: holding the secret bundle is the claim. Who made it,"
            " when, and who has held it needs outside evidence."
        ),
        "null_hypothesis": NULL_HYPOTHESIS, "not_proven": LIMITATIONS, "log10_p": metrics.get("log10_binomial_p"),
    }  # fmt: skip
    acc, original, diff, tau, chance, log10_p = (
        finite(metrics.get(k))
        for k in ("acc_combined", "acc_original", "diff_acc", "tau_acc", "chance", "log10_binomial_p")
    )
    n, correct = metrics.get("test_size"), metrics.get("correct")
    if acc is None or original is None or diff is None or tau is None or chance is None or log10_p is None:
        screen["statistic"] = str(entry.get("summary", ""))
        return screen
    statistic = (
        f"The rebuilt HufuNet classifies {acc:.2%} of {n} public test images correctly (the owner's:"
        f" {original:.2%}; DiffAcc {diff:.3f} against tau_acc {tau:g})"
    )
    if log10_p >= math.log10(NO_EVIDENCE_P):
        statistic += ", no better than guessing: no evidence against chance"
    screen["statistic"] = statistic
    classes = round(1 / chance) if chance > 0 else 0
    screen["p_label"] = f"binomial tail of {correct} or more correct answers by guessing among {classes} classes"
    return screen


def describes(payload: Mapping[str, Any], graph: LayerGraph) -> str | None:
    """Why the bundle does not describe ``graph`` (a host layer it records has no counterpart of that kind and
    shape), or ``None`` when every host layer is found."""
    from auditor.toolkit.matching import missing_layer

    return missing_layer(
        graph,
        _mapping(payload.get("host")).get("layers"),
        none="the bundle records no host layer to compare it with",
        malformed="the bundle's host layers are malformed",
        like="the host layer {name}",
    )
