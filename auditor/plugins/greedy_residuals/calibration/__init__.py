"""The calibrations shipped with the Greedy Residuals detector: for each built-in architecture, the null
distribution of the combined p-value (``log10_combined_p``) on independent models trained from scratch on the
bundled digits by the embedder's default recipe, made by ``scripts/calibrate_builtins.py`` (docs/calibration.md).

One file per architecture, named after it (``cnn.json``); :func:`shipped` picks the one an owner bundle names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FOLDER", "shipped"]

FOLDER = Path(__file__).resolve().parent


def shipped(payload: Mapping[str, Any]) -> Path | None:
    """The shipped calibration for the built-in architecture a Greedy Residuals bundle's payload names
    (``model.architecture``), when the owner trained on the bundled digits (or the bundle does not say);
    ``None`` for any other model. The name is looked up among the files, never joined into a path."""
    model, training = payload.get("model"), payload.get("training")
    architecture = model.get("architecture") if isinstance(model, Mapping) else None
    data = training.get("dataset") if isinstance(training, Mapping) else None
    if isinstance(data, Mapping) and data.get("name") != "digits":
        return None
    return {p.stem: p for p in FOLDER.glob("*.json")}.get(architecture) if isinstance(architecture, str) else None
