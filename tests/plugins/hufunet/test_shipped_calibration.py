"""The calibration the HufuNet detector ships (scripts/calibrate_builtins.py, docs/calibration.md): found for
bundles naming its host, and what it holds."""

from __future__ import annotations

import pytest

from auditor.audit.calibration import load_calibration
from auditor.plugins.hufunet.calibration import FOLDER
from auditor.plugins.hufunet.detector import HufuNetDetector


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        ({"host": {"architecture": "cnn", "width": 2}}, "cnn-width2.json"),
        ({"host": {"architecture": "cnn", "width": 2}, "training": {}}, "cnn-width2.json"),
        ({"host": {"architecture": "cnn", "width": 2}, "training": {"dataset": {"name": "fashion"}}}, None),
        ({"host": {"architecture": "cnn", "width": 3}}, None),
        ({"host": {"architecture": "cnn", "width": None}}, None),  # width 1: none shipped
        ({"host": {"architecture": "../greedy_residuals/calibration/cnn"}}, None),
        ({"host": "cnn"}, None),
        ({}, None),
    ],
)
def test_the_shipped_calibration_is_the_one_the_bundle_names(payload: dict, found: str | None) -> None:
    path = HufuNetDetector().shipped_calibration(payload)
    assert (path.name if path else None) == found


def test_the_shipped_calibration_holds_60_independent_hosts_and_no_false_positive() -> None:
    doc = load_calibration(FOLDER / "cnn-width2.json", shipped=True).document
    assert (doc["made"]["architecture"], doc["made"]["width"], doc["made"]["seeds"]) == ("cnn", 2, [1000, 1059])
    assert len(doc["models"]) == 60 and doc["reference"] is not None and doc["bundle"]["scheme"] == "hufunet"
    [entry] = doc["detectors"]
    assert (entry["detector"], entry["statistic"]) == ("hufunet", HufuNetDetector.p_metric)
    assert entry["false_positive_rate"]["false_positives"] == 0 and entry["false_positive_rate"]["decided"] == 60
    assert all(m < 0.2 for m in entry["measures"])  # the rebuilt HufuNet is at chance on every innocent host
