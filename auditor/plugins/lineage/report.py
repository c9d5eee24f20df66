"""How lineage findings are shown: the explanation, the null, what it does not prove, labels, columns, the
summary sentence, the headline, the first screen and the per-layer figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from auditor.findings import Verdict
from auditor.report.text import power_of_ten
from auditor.toolkit.figures import bars

__all__ = [
    "COLUMNS",
    "EXPLANATION",
    "LIMITATIONS",
    "METRIC_LABELS",
    "NULL_HYPOTHESIS",
    "figure",
    "first_screen",
    "headline",
    "summary",
]

EXPLANATION = (
    "A lineage test asks whether the suspect's weights were derived from the reference model's (copied, then"
    " fine-tuned, pruned, averaged or re-marked), not whether it carries anyone's watermark. For each layer whose"
    " units (filters, neurons) are interchangeable, it measures how alike the suspect's and the reference's units"
    " are in the order they stand after restore (the mean |cosine| of each unit with its counterpart), and"
    " compares that with the same measure after random re-orderings of the reference's units. Two independently"
    " initialised models have no preferred pairing of units, so the true order does no better than a random one;"
    " a derived model keeps its units where the reference had them, far above every re-ordering. The p-value of a"
    " layer is the share of the re-orderings (and the true order) that reach the true order's similarity: exact"
    " under the null, whatever the training data. Holm's correction over the tested layers names the derived"
    " layers; the model's p-value is the number of layers times the smallest layer p-value. What it does not"
    " prove: who owns either model; that the reference came first (a derived pair is derived either way); and a"
    " 'no' is not proof of independence: a model distilled into fresh weights, or whose units were re-ordered"
    " without the restore stage undoing it, shares no weights with the reference and is reported as not derived."
)

NULL_HYPOTHESIS = (
    "The suspect and the reference were initialised and trained independently: given the suspect, every"
    " re-ordering of the reference's units in a layer is as likely as the order it has."
)

LIMITATIONS = (
    "Derived from the reference is not carrying the owner's watermark, and says nothing of who owns either model or"
    " which came first. 'Not derived' does not prove independence: distillation into fresh weights, or a"
    " re-ordering of units the restore stage did not undo, leaves no shared weights to find."
)

METRIC_LABELS = {
    "p": "p-value (Bonferroni over the tested layers)",
    "log10_p": "log10 p-value",
    "layers_derived": "layers derived (Holm)",
    "layers_tested": "layers tested",
    "alpha": "threshold (family-wise level)",
    "strongest_layer": "strongest layer",
    "strongest_statistic": "its matched |cosine|",
    "strongest_null_max": "largest over the re-orderings",
    "permutations": "re-orderings per layer",
    "seed": "seed of the re-orderings",
    "restored": "aligned by the restore stage",
    "smallest_reachable_p": "smallest p-value the test can give",
}

COLUMNS = {
    "layers": ("name", "derived", "statistic", "null_max", "null_mean", "p", "holm_p", "reached", "units",
               "suspect_layer"),
    "untested": ("name", "why"),
}  # fmt: skip


def _p(metrics: Mapping[str, Any]) -> str:
    log10 = metrics.get("log10_p")
    return power_of_ten(float(log10)) if isinstance(log10, int | float) else "untested"


def summary(
    verdict: Verdict, metrics: Mapping[str, Any], derived: Sequence[str], rows: Sequence[Mapping[str, Any]],
    untested: Sequence[Mapping[str, Any]],
) -> str:  # fmt: skip
    """The finding's one sentence."""
    tested = len(rows)
    if verdict is Verdict.INCONCLUSIVE and not rows:
        return (
            "No layer of the suspect could be compared with the reference's (no layer of the same kind and shape),"
            " so whether it derives from the reference is untested."
        )
    if verdict is Verdict.INCONCLUSIVE:
        return (
            f"Untested: with {metrics.get('permutations')} re-orderings per layer over {tested} layers the smallest"
            f" p-value the test can give is {metrics.get('smallest_reachable_p'):.3g}, above the threshold"
            f" {metrics.get('alpha')}, so even a copy could not be called derived; raise the lineage.permutations"
            " option."
        )
    if verdict is Verdict.DETECTED:
        kept = [r["name"] for r in rows if not r["derived"]]
        rest = f"; not derived: {', '.join(kept)}" if kept else ""
        return (
            f"The suspect's weights derive from the reference's (p = {_p(metrics)}, exact permutation test,"
            f" Bonferroni over {tested} layers): derived in {len(derived)} of {tested} layers ({', '.join(derived)})"
            f"{rest}. This is lineage evidence, not a watermark."
        )
    return (
        f"No tested layer's units match the reference's better than random re-orderings do (p = {_p(metrics)} over"
        f" {tested} layers, threshold {metrics.get('alpha')}): no evidence that the suspect's weights derive from"
        " the reference's, which does not prove it independent."
    )


def headline(entry: Mapping[str, Any]) -> str:
    """One line beside the answer (which the report and the terminal give from the verdict): the p-value and
    the layer count, or why it is untested."""
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
    assert isinstance(metrics, Mapping)
    if not metrics.get("layers_tested"):
        return "no layer of the suspect has the shape of a reference layer"
    return f"p = {_p(metrics)}; {metrics.get('layers_derived')} of {metrics.get('layers_tested')} layers derived"


def first_screen(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What the first screen says: no owner, the strongest layer against its re-orderings, the p-value."""
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
    assert isinstance(metrics, Mapping)
    shown: dict[str, Any] = {
        "owner": "no owner: a lineage test reads no owner bundle; it compares the suspect with the reference model",
        "null_hypothesis": NULL_HYPOTHESIS,
        "not_proven": LIMITATIONS,
        "log10_p": metrics.get("log10_p"),
        "p_label": f"exact permutation p-value, Bonferroni over {metrics.get('layers_tested')} layers",
    }
    if metrics.get("strongest_layer"):
        shown["statistic"] = (
            f"{metrics.get('layers_derived')} of {metrics.get('layers_tested')} layers derived (Holm, level"
            f" {metrics.get('alpha')}); strongest layer {metrics.get('strongest_layer')}: matched |cosine|"
            f" {metrics.get('strongest_statistic'):.3f} against at most {metrics.get('strongest_null_max'):.3f}"
            f" over {metrics.get('permutations')} random re-orderings"
        )
    if metrics.get("restored"):
        shown["p_label"] += "; at the alignment the restore stage chose (its guard judged the suspect derived)"
    return shown


def figure(entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """Per tested layer, the matched units' mean |cosine| as a bar; its note gives the largest value over the
    random re-orderings and the Holm-adjusted p-value."""
    details = entry.get("details") if isinstance(entry.get("details"), Mapping) else {}
    assert isinstance(details, Mapping)
    rows = details.get("layers")
    if not isinstance(rows, list) or not rows:
        return None
    drawn = bars(
        [(str(r.get("name")), r.get("statistic"),
          f"re-orderings at most {float(r.get('null_max', 0)):.2f}; {'derived' if r.get('derived') else 'not derived'}")
         for r in rows if isinstance(r, Mapping)],
        title="Matched units' similarity per layer, against random re-orderings",
    )  # fmt: skip
    if drawn is None:
        return None
    return (
        "Each bar: the mean |cosine| of the suspect's units with the reference's as they stand; the note: the"
        " largest any random re-ordering of the reference's units reached, and Holm's decision.",
        str(drawn),
    )
