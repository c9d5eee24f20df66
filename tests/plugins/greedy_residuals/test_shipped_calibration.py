"""The calibration the Greedy Residuals detector ships (scripts/calibrate_builtins.py, docs/calibration.md):
found for bundles naming its architecture, and what it holds."""

from __future__ import annotations

import hashlib

import pytest

from auditor.audit.calibration import load_calibration
from auditor.plugins.greedy_residuals.calibration import FOLDER
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        ({"model": {"architecture": "cnn"}}, "cnn.json"),
        ({"model": {"architecture": "cnn"}, "training": {"dataset": {"name": "digits"}}}, "cnn.json"),
        ({"model": {"architecture": "cnn"}, "training": {"dataset": {"name": "mine:data"}}}, None),
        ({"model": {"architecture": "cnn-width2"}}, None),
        ({"model": {"architecture": "../hufunet/calibration/cnn-width2"}}, None),
        ({"model": {"architecture": ["cnn"]}}, None),
        ({"model": "cnn"}, None),
        ({}, None),
    ],
)
def test_the_shipped_calibration_is_the_one_the_bundle_names(payload: dict, found: str | None) -> None:
    path = GreedyResidualsDetector().shipped_calibration(payload)
    assert (path.name if path else None) == found
    assert path is None or path.parent == FOLDER


def test_the_shipped_calibration_holds_60_independent_models_and_no_false_positive() -> None:
    cal = load_calibration(FOLDER / "cnn.json", shipped=True)
    doc = cal.document
    assert cal.sha256 == hashlib.sha256((FOLDER / "cnn.json").read_bytes()).hexdigest()
    assert doc["made"]["how"] == "trained" and doc["made"]["architecture"] == "cnn" and doc["made"]["width"] == 1
    assert doc["made"]["seeds"] == [1000, 1059] and doc["made"]["data"]["name"] == "digits"
    assert len(doc["models"]) == 60 and len({m["sha256"] for m in doc["models"]}) == 60
    assert all(m["test_accuracy"] > 0.95 for m in doc["models"])
    assert doc["reference"] is not None  # audited as an analyst would, restore stage included
    assert doc["command"].startswith("auditor calibrate --bundle calibration-work/greedy-residuals/owner/")
    [entry] = doc["detectors"]
    assert (entry["detector"], entry["statistic"]) == ("greedy-residuals", GreedyResidualsDetector.p_metric)
    assert entry["false_positive_rate"]["false_positives"] == 0 and entry["false_positive_rate"]["decided"] == 60
    assert round(entry["false_positive_rate"]["upper_bound"], 4) == 0.0487
    assert all(-6 < v <= 0 for v in entry["values"])  # far from the 1e-6 threshold
