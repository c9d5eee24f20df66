"""How HufuNet findings are shown: the explanation, metric labels (deciding number first), the public
details, table columns, the accuracy figure and the bundle summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from auditor.toolkit.figures import BLUE, GREY, RED, axis, finite, num, svg, text

__all__ = ["COLUMNS", "EXPLANATION", "METRIC_LABELS", "PERCENT", "PUBLIC_DETAILS", "bundle_summary", "figure"]

EXPLANATION = (
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
        marks.append((original * (1 - tau), f"threshold {original * (1 - tau):.1%} (DiffAcc < {tau:g})", RED, "5,3"))
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
        " threshold Acc_original x (1 - tau_acc) (red) and guessing (grey)."
    )
    return caption, picture


def bundle_summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a report shows of a HufuNet bundle: the host architecture (never the network, key or positions)."""
    host = payload.get("host")
    arch = host.get("architecture") if isinstance(host, Mapping) else None
    return {"host_architecture": arch if isinstance(arch, str | int | float | bool) else None}
