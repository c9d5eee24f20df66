"""How the restorers' logs are shown: the explanation, the per-layer table's columns and labels, the
similarity chart and each layer's channel-matching drawing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from auditor.toolkit.figures import alignment

__all__ = ["COLUMNS", "EXPLANATION", "METRIC_LABELS", "figure"]

EXPLANATION = (
    "Restorers undo edits that keep a model working while scrambling where its weights sit: channels put in"
    " another order, scaled or negated, batch-norm folded into the convolution, channels cut off or added."
    " Each restorer compares the suspect with the owner's reference model and aligns it; the detectors then"
    " read the aligned weights. The table gives, per layer, how many channels were moved and how similar the"
    " suspect's channels were to the reference before and after aligning (1 is identical, 0 unrelated)."
    " A high similarity after aligning shows that the layer is derived from the reference; it is not the"
    " watermark evidence, which comes from the detectors' findings below."
)

METRIC_LABELS: dict[str, str] = {}
COLUMNS = {
    "layers": (
        "name", "reference", "moved", "similarity_before", "similarity_after", "scale", "sign", "negated",
        "padded", "dropped", "derived", "note",
    ),
}  # fmt: skip


def figure(entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
    """The similarity chart of a restore log, and the channel matching of its first twelve layers."""
    return alignment(entry)
