"""The calibrations shipped with the HufuNet detector: for each built-in host, the null distribution of the
binomial p-value of the rebuilt HufuNet (``log10_binomial_p``) on independent hosts trained from scratch on the
bundled digits by the embedder's default recipe, made by ``scripts/calibrate_builtins.py`` (docs/calibration.md).

One file per host, named after its architecture and width (``cnn-width2.json``); :func:`shipped` picks the one
an owner bundle names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FOLDER", "shipped"]

FOLDER = Path(__file__).resolve().parent


def shipped(payload: Mapping[str, Any]) -> Path | None:
    """The shipped calibration for the built-in host a HufuNet bundle's payload names (``host.architecture``
    and ``host.width``), when the owner trained on the bundled digits (or the bundle does not say); ``None``
    for any other host. The name is looked up among the files, never joined into a path."""
    host, training = payload.get("host"), payload.get("training")
    if not isinstance(host, Mapping) or not isinstance(host.get("architecture"), str):
        return None
    data = training.get("dataset") if isinstance(training, Mapping) else None
    if isinstance(data, Mapping) and data.get("name") != "digits":
        return None
    width = host.get("width")
    key = host["architecture"] if width in (None, 1) else f"{host['architecture']}-width{width}"
    return {p.stem: p for p in FOLDER.glob("*.json")}.get(key)
