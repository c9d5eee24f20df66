"""The report's known error rates and negative controls: its ``calibration`` and ``controls`` blocks.

``calibration`` holds, for each watermark finding a calibration applies to, the measured false-positive rate
of its detector on independent models with its exact one-sided 95% bound, how the suspect's deciding
statistic compares with theirs, and which calibration set it came from (:mod:`auditor.audit.calibration`).
``controls`` holds the negative controls audited in the same run (``--control``): each model's hashes and,
per watermark finding, its verdict and deciding number, beside the suspect's. A control never changes the
suspect's verdict or exit code; one that comes out "detected" is named in ``controls.detected`` and stated at
the top of the page, because it undermines the method as applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from auditor.jsondata import jsonable

if TYPE_CHECKING:
    from auditor.audit.pipeline import AuditInputs, AuditRecord
    from auditor.findings import Finding
    from auditor.report.guard import SecretGuard

__all__ = ["CONTROL_WARNING", "attach_rates", "calibration_block", "controls_block", "rate_sentence"]

CONTROL_WARNING = (
    'A negative control came out "watermark found": a model that should be independent of the owner\'s was'
    " claimed with the same owner bundles, reference and options. Either the control is not independent of the"
    " owner's model, or the method as applied here claims independent models; the suspect's finding must be"
    " weighed with that in mind. The suspect's verdict and exit code are unchanged."
)


def _statistic(detector_id: str) -> str:
    from auditor.report.view import view_of

    component = view_of("detectors", detector_id).component
    return str(getattr(component, "p_metric", "") or "")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _rows(findings: Sequence[Finding], guard: SecretGuard) -> list[dict[str, Any]]:
    """Each watermark finding's verdict and deciding number (the detector's ``p_metric``)."""
    rows = []
    for f in findings:
        if not f.scheme:
            continue
        statistic = _statistic(f.detector)
        row = {
            "detector": f.detector, "scheme": f.scheme, "subject": f.subject, "bundle": getattr(f, "bundle", ""),
            "verdict": f.verdict.value, "statistic": statistic,
            "value": _number(f.metrics.get(statistic)) if statistic else None,
        }  # fmt: skip
        if guard.leaks(jsonable(row)):
            row["subject"] = "withheld"
        rows.append(row)
    return rows


def controls_block(record: AuditRecord, inputs: AuditInputs, guard: SecretGuard) -> dict[str, Any] | None:
    """The report's ``controls`` block (``None`` when no control was given): the suspect's row, then each
    control's (name, path, format, SHA-256 and files, verdict, per watermark finding its verdict and deciding
    number; or the error that kept it from being audited), and the names of the controls found "detected"."""
    from auditor.audit.pipeline import FailedControl

    if not inputs.control_paths:
        return None
    models: list[dict[str, Any]] = []
    for control in inputs.controls:
        if isinstance(control, FailedControl):
            models.append({"name": control.path.name, "path": str(control.path), "sha256": None, "files": [],
                           "verdict": "error", "error": control.error, "exit_code": control.exit_code,
                           "findings": []})  # fmt: skip
            continue
        entry = control.model.entry()
        models.append({
            "name": entry["name"], "path": entry["path"], "format": entry["format"], "sha256": entry["sha256"],
            "files": entry["files"], "verdict": control.verdict.value, "error": None,
            "findings": _rows(control.findings, guard),
        })  # fmt: skip
    suspect = record.model.entry()
    detected = [m["name"] for m in models if m["verdict"] == "detected"]
    return jsonable({
        "suspect": {"name": suspect["name"], "sha256": suspect["sha256"], "verdict": record.verdict.value,
                    "findings": _rows(record.findings, guard)},
        "models": models, "detected": detected, "warning": CONTROL_WARNING if detected else "",
        "failed": [m["name"] for m in models if m["verdict"] == "error"],
    })  # fmt: skip


def calibration_block(record: AuditRecord, inputs: AuditInputs) -> list[dict[str, Any]]:
    """The report's ``calibration`` block (:func:`auditor.audit.calibration.error_rates`): the calibrations
    given with ``--calibration``, else the one each finding's detector ships for its owner bundle."""
    from auditor.audit.calibration import error_rates

    return error_rates(
        record.findings, given=inputs.calibrations, bundles=inputs.bundles, options=inputs.options,
        reference=inputs.reference is not None,
    )  # fmt: skip


def rate_sentence(row: Mapping[str, Any]) -> str:
    """A calibration row's measured false-positive rate in one sentence."""
    fp = row.get("false_positives") or {}
    cal = row.get("calibration") or {}
    k, n, upper = fp.get("false_positives"), fp.get("decided"), fp.get("upper_bound")
    if not n:
        return f"no model of calibration set {cal.get('name')} gave a verdict, so no rate was measured"
    shipped = " (shipped with the detector)" if cal.get("shipped") else ""
    return (
        f"{k} of {n} independent models called found ({k / n:.1%}; exact one-sided"
        f" {fp.get('confidence', 0.95):.0%} upper bound {upper:.1%}); calibration set: {cal.get('name')}{shipped}"
    )


def attach_rates(findings: list[dict[str, Any]], record: AuditRecord, rows: Sequence[Mapping[str, Any]]) -> None:
    """Give each finding entry of the report the first calibration row that applies to it, as ``calibration``
    (``false_positives``, ``n``, ``upper_bound``, ``source``, ``summary``), for the first screen to show
    beside the exact tail bound. Rows and findings are matched by detector, scheme and subject, in order."""
    taken: set[int] = set()
    for row in rows:
        if row.get("verdict") is None or "error" in row:
            continue
        for i, (entry, finding) in enumerate(zip(findings, record.findings, strict=True)):
            same = (finding.detector, finding.scheme, finding.subject) == (
                row.get("detector"),
                row.get("scheme"),
                row.get("subject"),
            )
            if i in taken or not same:
                continue
            fp, cal = row["false_positives"], row["calibration"]
            entry["calibration"] = jsonable({
                "false_positives": fp["false_positives"], "n": fp["decided"], "upper_bound": fp["upper_bound"],
                "confidence": fp["confidence"], "source": cal["name"], "sha256": cal["sha256"],
                "summary": rate_sentence(row),
            })  # fmt: skip
            taken.add(i)
            break
