"""A minimal third-party auditor plugin: one detector that needs no owner bundle.

It checks every weight of the suspect for NaN and infinity, a quick sanity
check worth seeing in any report. It looks for no watermark, so its verdict
is always "inconclusive".

It shows the whole presentation contract a built-in detector uses: its own
explanation, metric labels (the deciding number first), table columns, an
option (``auditor audit --option example-non-finite.min_count=5``) and a
figure drawn with ``auditor.toolkit.figures``. auditor imports this module to
list the plugins, so torch is imported inside ``detect``, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from auditor import Detector, Finding, LayerGraph, Param, Verdict, hookimpl


class NonFiniteWeights(Detector):
    """Counts NaN and infinite weights, layer by layer."""

    id = "example-non-finite"
    description = "Example plugin: counts NaN and infinite weights (needs no owner bundle)"
    scheme = ""  # runs on every audit, with bundle=None
    title = "Non-finite weights (example plugin)"
    explanation = (
        "This check counts the weights that are not numbers (NaN) or are infinite. A trained model has none;"
        " a file with many was damaged, or edited by hand to break tools that read it. It looks for no"
        " watermark, so it says nothing about who owns the model: its verdict is always inconclusive."
    )
    metric_labels: ClassVar[dict[str, str]] = {  # the deciding number first
        "non_finite": "non-finite weights",
        "weights": "weights read",
        "tensors_flagged": "tensors with non-finite weights",
    }
    columns: ClassVar[dict[str, tuple[str, ...]]] = {"per_tensor": ("name", "non_finite", "size")}
    params = (Param("min_count", 1, "List a tensor from this many non-finite weights on.", int, minimum=1),)

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        import torch

        min_count = self.settings(context)["min_count"]
        rows: list[dict[str, Any]] = []
        total = 0
        for layer in suspect.layers:
            for role, ref in layer.params.items():
                values = ref.read(float32=True)
                if not values.is_floating_point():
                    continue
                total += values.numel()
                count = int((~torch.isfinite(values)).sum())
                rows.append({"name": f"{layer.name}.{role}", "non_finite": count, "size": values.numel()})
        flagged = [r for r in rows if r["non_finite"] >= min_count]
        n_bad = sum(r["non_finite"] for r in rows)
        return [
            Finding(
                detector=self.id,
                verdict=Verdict.INCONCLUSIVE,
                summary=f"{n_bad} of {total} weights are NaN or infinite; this check looks for no watermark.",
                metrics={"non_finite": n_bad, "weights": total, "tensors_flagged": len(flagged)},
                details={"per_tensor": flagged, "tensors": rows},
            )
        ]

    def public(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """The report carries the flagged tensors; the full list feeds the figure only."""
        return {"per_tensor": details.get("per_tensor", []), "tensors": details.get("tensors", [])[:12]}

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        """The share of finite weights in the first twelve tensors."""
        from auditor.toolkit import figures

        rows = entry.get("details", {}).get("tensors") or []
        bars = [
            (r["name"], 1 - r["non_finite"] / r["size"] if r["size"] else None, f"{r['non_finite']} non-finite")
            for r in rows
        ]
        chart = figures.bars(bars, title="Share of finite weights per tensor", mark=(1.0, "all finite"))
        return None if chart is None else ("Share of finite weights in each tensor (the first twelve).", chart)

    def headline(self, entry: Mapping[str, Any]) -> str:
        """One line: how many weights are not finite."""
        return f"{entry.get('metrics', {}).get('non_finite', '?')} non-finite weights"


@hookimpl
def register_detectors(register):  # type: ignore[no-untyped-def]
    """Hand auditor the detector."""
    register(NonFiniteWeights())
