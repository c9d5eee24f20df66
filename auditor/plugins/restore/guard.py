"""The integrity guard: restore only a suspect demonstrably derived from the reference.

Restoring is a search for the reading of the suspect that looks most like
the reference: every channel is moved, rescaled and sign-flipped towards the
reference's. Done to an independently trained model, that search itself
manufactures similarity (tests/test_restore_guard.py shows it raising an
innocent model's Greedy Residuals match rate). So restorers act only where
the similarity found is far above anything independent models reach.

The evidence is the plan's matched similarity: per producer, the mean
|cosine| between each reference channel's weights and the suspect channel
matched to it, input channels aligned (cut-off slots count as 0). Layers
with short rows (fewer than :data:`MIN_ROW` weights: a first convolution's
3x3 kernels over one input channel) are listed but not counted, since a few
numbers agree by chance. The score is the mean over the counted layers,
weighted by their weights; the suspect counts as derived when it reaches
:data:`THRESHOLD`. The threshold comes from the calibration in
docs/restore.md (``python -m auditor.plugins.restore.calibrate``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # plan imports torch; the guard's numbers are plain floats
    from auditor.plugins.restore.plan import LayerMatch

__all__ = ["MIN_ROW", "THRESHOLD", "Evidence", "assess"]

#: Rows shorter than this are not evidence (few numbers agree by chance).
MIN_ROW = 32
#: Derived when the weighted mean matched |cosine| reaches this (calibration: docs/restore.md).
THRESHOLD = 0.5


@dataclass
class Evidence:
    """The guard's decision and the numbers behind it."""

    derived: bool
    score: float | None
    threshold: float
    layers: dict[str, float] = field(default_factory=dict)
    not_counted: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {
            "derived": self.derived,
            "score": None if self.score is None else round(self.score, 6),
            "threshold": self.threshold,
            "layers": {k: round(v, 6) for k, v in self.layers.items()},
            "not_counted": dict(self.not_counted),
            "reason": self.reason,
        }


def assess(matches: Iterable[LayerMatch], *, threshold: float = THRESHOLD) -> Evidence:
    """Whether the matched similarities show a derived model (see the module docstring)."""
    layers: dict[str, float] = {}
    weights: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for m in matches:
        if not m.inputs_aligned:
            skipped[m.layer] = "its input channels could not be aligned with the reference's"
            continue
        if m.row_length < MIN_ROW:
            skipped[m.layer] = f"rows of {m.row_length} weights are too short to be evidence"
            continue
        layers[m.layer] = m.after
        weights[m.layer] = m.weights
    if not layers:
        return Evidence(False, None, threshold, {}, skipped, "no layer could be compared with the reference")
    score = sum(layers[k] * weights[k] for k in layers) / sum(weights.values())
    derived = score >= threshold
    verdict = "at or above" if derived else "below"
    reason = (
        f"matched channels agree with the reference's at mean |cosine| {score:.4f} over {len(layers)} layer(s),"
        f" {verdict} the threshold {threshold:g} that independently trained models stay far below"
    )
    return Evidence(derived, score, threshold, layers, skipped, reason)
