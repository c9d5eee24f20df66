"""Measure a detector's error rate: audit models known to be independent of the owner's against one owner
bundle and record the null distribution of each detector's deciding statistic.

The statistic is the one the detector's contract names (:attr:`auditor.bases.Detector.p_metric`); each model
is audited exactly as a suspect is (:func:`auditor.audit.pipeline.audit_suspect`: the same loaders, the same
restore stage when a reference is given, the same options). Nothing here trains a model or knows a scheme:
the models are given (``auditor calibrate`` can train them first), and the file format and the bound are in
:mod:`auditor.audit.calibration`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from auditor import __version__
from auditor.audit.calibration import CALIBRATION_FORMAT, CALIBRATION_VERSION, error_rate
from auditor.audit.inputs import AuditInputs
from auditor.errors import UsageError
from auditor.findings import Finding

__all__ = ["calibrate", "deciding"]


def deciding(findings: Sequence[Finding], detector_id: str, scheme: str, statistic: str) -> tuple[str, Any, Any]:
    """One model's verdict, deciding statistic and measure for ``detector_id`` from its ``findings``: the
    strongest (lowest) statistic when it gave several, "detected" if any was; ("error", None, None) when it
    gave none."""
    own = [f for f in findings if f.detector == detector_id and f.scheme == scheme]
    if not own:
        return "error", None, None
    verdicts = [f.verdict.value for f in own]
    verdict = "detected" if "detected" in verdicts else verdicts[0]
    values = [
        (float(v), f) for f in own if isinstance(v := f.metrics.get(statistic), int | float) and not isinstance(v, bool)
    ]
    if not values:
        return verdict, None, None
    value, best = min(values, key=lambda vf: vf[0])
    return verdict, value, best


def _model_entry(record: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    entry = record.model.entry()
    row: dict[str, Any] = {"name": entry["name"], "sha256": entry["sha256"], "size": entry["size"]}
    if entry["sha256"] is None:  # a folder model: each of its files
        row["files"] = [{"name": f["name"], "sha256": f["sha256"], "size": f["size"]} for f in entry["files"]]
    row.update(extra or {})
    return row


def calibrate(
    models: Sequence[Path],
    inputs: AuditInputs,
    *,
    made: Mapping[str, Any],
    command: str,
    name: str = "",
    model_info: Sequence[Mapping[str, Any]] | None = None,
    on_model: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """The calibration document of ``models`` (each independent of the owner's) audited against the one owner
    bundle of ``inputs``, with its reference and options.

    ``made`` says how the models were made (``how``: ``trained`` or ``supplied``; ``description``: one
    sentence; anything else that reproduces them); ``model_info`` adds per-model facts (seed, accuracy) in
    the order of ``models``; ``on_model`` sees each path after it is audited. Every model must load: a
    calibration with holes would measure another set than it names."""
    from auditor.audit.pipeline import audit_suspect
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    if len(inputs.bundles) != 1:
        raise UsageError("a calibration is made against exactly one owner bundle")
    if not models:
        raise UsageError("a calibration needs at least one independent model")
    bundle = inputs.bundles[0]
    readers = [d for d in components("detectors", Detector) if d.scheme and d.scheme == bundle.scheme]
    if not readers:
        raise UsageError(f"no installed detector reads owner bundles of scheme {bundle.scheme!r}")
    info = list(model_info or [{} for _ in models])
    rows: list[dict[str, Any]] = []
    per: dict[str, tuple[list[str], list[Any], list[Any]]] = {d.id: ([], [], []) for d in readers}
    for path, extra in zip(models, info, strict=True):
        record = audit_suspect(path, inputs)
        rows.append(_model_entry(record, extra))
        for d in readers:
            verdict, value, best = deciding(record.findings, d.id, d.scheme, d.p_metric)
            measure = best.metrics.get(d.measure[0]) if best is not None and d.measure[0] else None
            per[d.id][0].append(verdict)
            per[d.id][1].append(value)
            per[d.id][2].append(measure if isinstance(measure, int | float) and not isinstance(measure, bool) else None)
        if on_model is not None:
            on_model(path)
    detectors = [
        {
            "detector": d.id, "scheme": d.scheme, "title": d.display_name, "statistic": d.p_metric,
            "statistic_label": d.metric_labels.get(d.p_metric, d.p_metric), "direction": "lower is stronger",
            "measure": d.measure[0], "measure_label": d.measure[1],
            "options": d.options(inputs.options.get(d.id, {})),
            "verdicts": per[d.id][0], "values": per[d.id][1], "measures": per[d.id][2],
            "false_positive_rate": error_rate(per[d.id][0]),
        }
        for d in readers
    ]  # fmt: skip
    reference = inputs.reference
    return {
        "calibration_format": CALIBRATION_FORMAT, "calibration_version": CALIBRATION_VERSION,
        "name": name or f"{len(models)} independent models against a {bundle.scheme} owner bundle",
        "tool": {"name": "auditor", "version": __version__}, "command": command, "made": dict(made),
        "bundle": {"name": bundle.path.name if bundle.path else None, "sha256": bundle.sha256, "scheme": bundle.scheme},
        "reference": None if reference is None else {"name": reference.path.name, **_sha(reference.entry())},
        "models": rows, "detectors": detectors,
    }  # fmt: skip


def _sha(entry: Mapping[str, Any]) -> dict[str, Any]:
    if entry["sha256"] is not None:
        return {"sha256": entry["sha256"]}
    import hashlib

    # A folder reference: one digest over its files' names and digests, in order, and the files themselves.
    joined = "\n".join(f"{f['name']} {f['sha256']}" for f in entry["files"])
    return {"sha256": hashlib.sha256(joined.encode()).hexdigest(), "files": entry["files"]}
