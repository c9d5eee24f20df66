"""The lineage detector: does the suspect derive from the reference model, layer by layer?

A bundle-free detector (no scheme): it runs on every audit given ``--reference``, after the restore stage,
and gives a separate line of evidence (its :attr:`~auditor.bases.Detector.evidence`), never a watermark
verdict. Each tested layer gets an exact permutation p-value (:mod:`.stats`); Holm's correction names the
derived layers, and the model-level p-value is Bonferroni's. docs/lineage.md has the method, the null and
the measured error rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from auditor import hookimpl
from auditor.bases import Detector, Param
from auditor.findings import Finding, Verdict
from auditor.graph import EdgeSource, Layer, LayerGraph, LayerKind
from auditor.plugins.lineage import report
from auditor.toolkit.matching import MISSING, LayerIndex, find_layer

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_ALPHA", "DEFAULT_PERMUTATIONS", "LineageDetector", "register_detectors", "layers_to_test"]

#: The documented threshold: a model (and a layer) is called derived when its Holm-adjusted p is at most this.
DEFAULT_ALPHA = 0.001
#: Permutations per layer: the smallest p-value a layer can reach is 1 / (n + 1).
DEFAULT_PERMUTATIONS = 19999
#: Units of a layer at most: its similarity matrix (units x units floats, 256 MiB here) bounds the test's memory.
MAX_UNITS = 8192
#: Weighted layers whose output units are tested (their rows are hidden units).
UNIT_KINDS = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR)

PARAMS = (
    Param("alpha", DEFAULT_ALPHA, "Family-wise level: a layer, and the model, whose Holm-adjusted p-value is at"
          " most this is called derived.", float, minimum=0.0, maximum=1.0, open=True),
    Param("permutations", DEFAULT_PERMUTATIONS, "Random permutations of the reference's units per layer (the"
          " smallest p-value a layer can reach is 1/(n+1)).", int, minimum=99, maximum=1_000_000),
    Param("seed", 0, "Seed of the permutations, which are drawn independently of the weights.", int, minimum=0),
)  # fmt: skip


def _output_layers(reference: LayerGraph, weighted: list[Layer]) -> set[str]:
    """The layers whose units are the model's outputs (the classes), which are not exchangeable: with a real
    computation graph, weighted layers that feed no other weighted layer; otherwise those whose width no
    weighted layer reads (no layer's input width is a multiple of it: a flatten reads a multiple)."""
    names = {layer.name for layer in weighted}
    if reference.edge_source is EdgeSource.GRAPH:
        feeding = {e.src for e in reference.edges if e.src in names and e.dst in names}
        return names - feeding
    widths = [layer.in_channels for layer in weighted if layer.in_channels]
    return {
        layer.name for layer in weighted
        if layer.out_channels and not any(w % layer.out_channels == 0 for w in widths if w)
    }  # fmt: skip


def layers_to_test(reference: LayerGraph) -> tuple[list[Layer], list[dict[str, str]]]:
    """The reference's layers whose units are tested, and the weighted layers left out with the reason: output
    layers (their units are the task's outputs, which are not exchangeable) and layers with fewer than two
    units."""
    weighted = [
        layer for layer in reference.layers
        if layer.kind in UNIT_KINDS and layer.weight is not None and len(layer.weight.shape) >= 2
    ]  # fmt: skip
    outputs = _output_layers(reference, weighted)
    left_out = []
    tested = []
    for layer in weighted:
        assert layer.weight is not None
        if layer.name in outputs:
            left_out.append({"name": layer.name, "why": "an output layer: its units are the task's outputs"})
        elif layer.weight.shape[0] < 2:
            left_out.append({"name": layer.name, "why": "fewer than two units"})
        elif layer.weight.shape[0] > MAX_UNITS:
            left_out.append({"name": layer.name, "why": f"more than {MAX_UNITS:,} units (the test's memory bound)"})
        else:
            tested.append(layer)
    return tested, left_out


def _weight(layer: Layer) -> torch.Tensor:
    assert layer.weight is not None
    return layer.weight.read(float32=True)


def _restored(context: Mapping[str, Any]) -> bool:
    """Whether a restorer changed the suspect (its log's ``acted``, docs/restore.md)."""
    log = context.get("restore")
    return isinstance(log, Sequence) and any(
        isinstance(e, Mapping) and e.get("status") == "ok" and isinstance(e.get("log"), Mapping)
        and e["log"].get("acted") is True
        for e in log
    )  # fmt: skip


class LineageDetector(Detector):
    """Exact permutation test of weight lineage against the reference model (bundle-free)."""

    id: ClassVar[str] = "lineage"
    description: ClassVar[str] = (
        "Was the suspect derived from the reference model? Exact permutation p-values per layer (needs --reference)."
    )
    title: ClassVar[str] = "Lineage test"
    short_title: ClassVar[str] = "lineage"
    evidence: ClassVar[str] = "derived from the reference"
    params: ClassVar[tuple[Param, ...]] = PARAMS
    p_metric: ClassVar[str] = "log10_p"
    explanation: ClassVar[str] = report.EXPLANATION
    null_hypothesis: ClassVar[str] = report.NULL_HYPOTHESIS
    limitations: ClassVar[str] = report.LIMITATIONS
    metric_labels: ClassVar[Mapping[str, str]] = report.METRIC_LABELS
    columns: ClassVar[Mapping[str, tuple[str, ...]]] = report.COLUMNS

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        """One finding when a reference model was given (none otherwise): the per-layer tests, Holm's
        derived layers and the model-level p-value."""
        reference = context.get("reference")
        if not isinstance(reference, LayerGraph):
            return []
        from auditor.plugins.lineage.stats import permutation_test, unit_similarity

        settings = self.settings(context)
        count = int(settings["permutations"])
        seed = int(settings["seed"])
        layers, untested = layers_to_test(reference)
        names = {layer.name for layer in layers}
        index = LayerIndex.of(suspect)
        rows: list[dict[str, Any]] = []
        kind_order: dict[str, int] = {}
        for ref_layer in reference.layers:
            kind_order.setdefault(ref_layer.kind.value, 0)
            position = kind_order[ref_layer.kind.value]
            kind_order[ref_layer.kind.value] += 1
            if ref_layer.name not in names:
                continue
            ref_w = _weight(ref_layer)
            entry = {"name": ref_layer.name, "kind": ref_layer.kind.value, "param": "weight",
                     "shape": list(ref_w.shape), "kind_index": position}  # fmt: skip
            match = find_layer(suspect, entry, index)
            if match.found_by == MISSING or match.layer is None:
                untested.append({"name": ref_layer.name, "why": "no suspect layer of its kind and shape"
                                 " (pruned, widened or replaced, and not restored)"})  # fmt: skip
                continue
            test = permutation_test(unit_similarity(_weight(match.layer), ref_w), count, seed)
            rows.append({
                "name": ref_layer.name, "suspect_layer": match.layer.name, "units": int(ref_w.shape[0]),
                "statistic": round(test.statistic, 6), "null_mean": round(test.null_mean, 6),
                "null_max": round(test.null_max, 6), "reached": test.reached, "p": test.p,
            })  # fmt: skip
        settings.update(restored=_restored(context))
        return [self._finding(rows, untested, settings)]

    def _finding(self, rows: list[dict[str, Any]], untested: list[dict[str, str]], settings: dict[str, Any]) -> Finding:
        from auditor.plugins.lineage.stats import holm

        alpha = float(settings["alpha"])

        adjusted = holm([r["p"] for r in rows])
        for row, value in zip(rows, adjusted, strict=True):
            row["holm_p"] = value
            row["derived"] = value <= alpha
        derived = [r["name"] for r in rows if r["derived"]]
        p = min(adjusted) if adjusted else None
        metrics: dict[str, Any] = {
            "p": p, "log10_p": math.log10(p) if p else None, "alpha": alpha, "layers_tested": len(rows),
            "layers_derived": len(derived), "permutations": settings["permutations"], "seed": settings["seed"],
            "restored": settings["restored"],
        }  # fmt: skip
        if rows:
            best = max(rows, key=lambda r: r["statistic"] - r["null_max"])
            metrics.update(strongest_layer=best["name"], strongest_statistic=best["statistic"],
                           strongest_null_max=best["null_max"])  # fmt: skip
        details = {"layers": rows, "untested": untested}
        reachable = len(rows) / (int(settings["permutations"]) + 1)  # the smallest model-level p there can be
        metrics["smallest_reachable_p"] = reachable if rows else None
        if p is None:
            verdict = Verdict.INCONCLUSIVE
        elif p <= alpha:
            verdict = Verdict.DETECTED
        else:  # "no" only where a derived model could have reached the threshold: otherwise untested
            verdict = Verdict.NOT_DETECTED if reachable <= alpha else Verdict.INCONCLUSIVE
        return Finding(
            detector=self.id, verdict=verdict, summary=report.summary(verdict, metrics, derived, rows, untested),
            metrics=metrics, details=details,
        )  # fmt: skip

    def headline(self, entry: Mapping[str, Any]) -> str:
        """``p = 10^-4; 3 of 3 layers derived``, beside the answer on a terminal or a summary row."""
        return report.headline(entry)

    def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
        """The first screen's words: no owner, the strongest layer's statistic, the combined p-value."""
        return report.first_screen(entry)

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """Per layer: the matched units' similarity against the largest any random re-ordering reached."""
        return report.figure(entry)


@hookimpl
def register_detectors(register: Any) -> None:
    """The lineage detector."""
    register(LineageDetector())
