"""A minimal third-party auditor plugin: one detector that needs no owner bundle.

It checks every weight of the suspect for NaN and infinity, a quick sanity
check worth seeing in any report. It looks for no watermark, so its verdict
is always "inconclusive".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from auditor import Detector, Finding, LayerGraph, Verdict, hookimpl


class NonFiniteWeights(Detector):
    """Counts NaN and infinite weights, layer by layer."""

    id = "example-non-finite"
    description = "Example plugin: counts NaN and infinite weights (needs no owner bundle)"
    scheme = ""  # runs on every audit, with bundle=None

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        bad: dict[str, int] = {}
        total = 0
        for layer in suspect.layers:
            for role, ref in layer.params.items():
                values = ref.read(float32=True)
                if not values.is_floating_point():
                    continue
                total += values.numel()
                count = int((~torch.isfinite(values)).sum())
                if count:
                    bad[f"{layer.name}.{role}"] = count
        n_bad = sum(bad.values())
        return [
            Finding(
                detector=self.id,
                verdict=Verdict.INCONCLUSIVE,
                summary=f"{n_bad} of {total} weights are NaN or infinite; this check looks for no watermark.",
                metrics={"non_finite": n_bad, "weights": total},
                details={"per_tensor": bad},
            )
        ]


@hookimpl
def register_detectors(register):  # type: ignore[no-untyped-def]
    """Hand auditor the detector."""
    register(NonFiniteWeights())
