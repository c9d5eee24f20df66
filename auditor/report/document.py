"""The evidence report: the data (a JSON-ready dict), its HTML rendering and its sealed JSON twin.

The data is built from an audit (:class:`auditor.audit.pipeline.AuditRecord`) by
whitelisting: what a report holds of an owner bundle is named field by field
(:func:`bundle_entry`), never "everything but the secrets". Its top level
(docs/report.md has the full outline):

* ``run``: case id, analyst and date, the only fields that differ between two
  runs of the same audit; ``integrity`` (:mod:`auditor.report.seal`) seals the rest;
* ``tool``, ``command``, ``suspect``, ``reference``, ``bundles``,
  ``reference_check`` (is the reference the owner's released model?), ``restore``,
  ``findings`` (each with what it was ``measured_on`` and its ``first_screen``), ``verdict``, ``evidence``
  (separate lines of evidence beside the verdict, which never change it), ``exit_code``.

Everything is sorted or kept in the order the audit defines (findings by
their stable key, bundles by scheme and SHA-256), so the same audit gives the
same bytes apart from the run and integrity blocks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor import __version__
from auditor.audit.detect import evidence_answer
from auditor.bases import Detector
from auditor.errors import UsageError
from auditor.findings import Finding
from auditor.jsondata import dump_json, jsonable
from auditor.report import text
from auditor.report.controls import attach_rates, calibration_block, controls_block
from auditor.report.guard import SecretGuard
from auditor.safeio import write_atomically

if TYPE_CHECKING:
    from auditor.audit.pipeline import AuditInputs, AuditRecord
    from auditor.bundle import OwnerBundle
    from auditor.keys import PrivateKey

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "build_report",
    "bundle_entry",
    "evidence_lines",
    "finding_entry",
    "reference_check",
    "run_block",
    "tool_info",
    "write_report",
]

REPORT_FORMAT = "auditor-evidence-report"
REPORT_VERSION = 1
DEPENDENCIES = ("cryptography", "jinja2", "numpy", "onnx", "safetensors", "scipy", "torch")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in DEPENDENCIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def tool_info() -> dict[str, Any]:
    """auditor's version, Python's, the dependencies' and the plugins that took part."""
    from auditor.plugin_manager import plugin_origin, registered

    plugins = [
        {"kind": kind, "id": cid, "plugin": reg.plugin, "origin": plugin_origin(reg.plugin)}
        for kind in ("formats", "restorers", "detectors")
        for cid, reg in registered(kind).items()
    ]
    return {
        "name": "auditor",
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "dependencies": _versions(),
        "plugins": sorted(plugins, key=lambda p: (p["kind"], p["id"])),
    }


def run_block(*, case_id: str = "", analyst: str = "", date: dt.datetime | None = None) -> dict[str, str]:
    """The run block: case id, analyst and the date (UTC, to the second)."""
    when = (date or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(microsecond=0)
    return {"case_id": case_id, "analyst": analyst, "date": when.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _readers(scheme: str) -> list[Any]:
    """The registered detectors that read owner bundles of ``scheme``, in id order."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    return [d for d in components("detectors", Detector) if scheme and d.scheme == scheme]


def bundle_entry(bundle: OwnerBundle) -> dict[str, Any]:
    """What a report holds of an owner bundle: its file, hash and scheme, the owner's released model, and
    what the detectors of its scheme name field by field (:meth:`~auditor.bases.Detector.bundle_summary`)."""
    path, payload = bundle.path, bundle.payload
    raw_model = payload.get("model")
    model: Mapping[str, Any] = raw_model if isinstance(raw_model, Mapping) else {}
    entry: dict[str, Any] = {
        "name": path.name if path else None, "path": str(path) if path else None, "sha256": bundle.sha256,
        "scheme": bundle.scheme, "version": bundle.version, "secret": bundle.secret,
        "released_model": {"file": _plain(model.get("file")), "sha256": _plain(model.get("sha256"))},
    }  # fmt: skip
    for detector in _readers(bundle.scheme):
        extra = detector.bundle_summary(payload)
        entry.update({k: v for k, v in extra.items() if k not in entry})
    return jsonable(entry)


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) else None


def finding_entry(
    finding: Finding,
    guard: SecretGuard,
    *,
    bundle: Mapping[str, Any] | None = None,
    measured_on: str = text.AS_GIVEN,
) -> dict[str, Any]:
    """A finding as the report holds it: the detector's words and numbers, the details it declares public,
    its explanation, what its numbers were measured on (the suspect as given or after restore) and what the
    report's first screen says of it (``bundle`` is the report's entry for the owner bundle it was made
    with). A finding that would show secret material is withheld whole."""
    from auditor.report.view import view_of

    view = view_of("detectors", finding.detector)
    details = view.component.public(finding.details) if view.component is not None else dict(finding.details)
    entry = jsonable(finding.to_dict() | {"details": details, "measured_on": measured_on})
    if guard.leaks(entry):
        entry.update(
            summary="This finding's words and numbers are withheld: they contain material from a secret owner"
            " bundle, which a report never shows.",
            metrics={}, details={}, withheld=True,
        )  # fmt: skip
    entry["explanation"] = view.explanation(entry["verdict"])
    first = jsonable(view.first_screen(entry, bundle))
    if guard.leaks(first):  # the detector's own words quote a secret: the plain defaults stand in
        first = jsonable(view_of("detectors", "").first_screen(entry, bundle))
    entry["first_screen"] = first
    answer = evidence_answer(finding, view.component if isinstance(view.component, Detector) else None)
    if answer is not None:  # another question than a watermark's: shown beside the verdict, never as one
        entry["evidence"] = answer
    return entry


def evidence_lines(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's separate lines of evidence, one per finding that answers another question than a
    watermark's (:func:`auditor.audit.detect.evidence_answer`), in the findings' order: the question, the
    answer (yes, no, untested), its p-value and what it is, the detector and its one line."""
    from auditor.report.view import view_of

    lines = []
    for f in findings:
        if not isinstance(f.get("evidence"), dict):
            continue
        view, first = view_of("detectors", f["detector"]), f.get("first_screen") or {}
        lines.append({
            "detector": f["detector"], "title": view.title, **f["evidence"], "log10_p": first.get("log10_p"),
            "p_label": first.get("p_label", ""), "headline": view.headline(f),
        })  # fmt: skip
    return jsonable(lines)


def reference_check(inputs: AuditInputs) -> dict[str, Any] | None:
    """Whether the reference model given for the restore stage is the owner's released model: its SHA-256
    against the released-model hash each owner bundle records, and its architecture against what each
    bundle describes (asked of the scheme's detectors, :meth:`~auditor.bases.Detector.describes`).
    ``None`` without a reference; else ``verified``, the ``problems`` in words and one row per bundle."""
    if inputs.reference is None:
        return None
    ref = inputs.reference
    hashes = {f.get("sha256") for f in ref.files if isinstance(f, Mapping) and f.get("sha256")}
    ref_sha = ", ".join(sorted(str(h) for h in hashes)) or "none"
    rows, problems = [], []
    for bundle in inputs.bundles:
        entry = bundle_entry(bundle)
        name, released = entry["name"] or bundle.sha256[:12], entry["released_model"]["sha256"]
        if not released:
            state = "not recorded"
            problems.append(
                f"owner bundle {name} records no SHA-256 of the owner's released model, so the reference"
                f" {ref.path.name} cannot be matched to it"
            )
        elif released in hashes:
            state = "matches"
        else:
            state = "differs"
            problems.append(
                f"the reference {ref.path.name} (SHA-256 {ref_sha}) is not the model released with owner bundle"
                f" {name}, whose SHA-256 is {released}"
            )
        why = None
        for detector in _readers(bundle.scheme):
            try:
                why = detector.describes(bundle.payload, ref.graph)
            except Exception as exc:  # a broken check is no verification
                why = f"the {detector.id} detector could not check it ({type(exc).__name__}: {exc})"
            if why:
                problems.append(f"owner bundle {name} does not describe the reference's architecture: {why}")
                break
        rows.append({"bundle": bundle.sha256, "name": name, "released_sha256": released, "sha256": state,
                     "architecture": str(why) if why else None})  # fmt: skip
    if not inputs.bundles:
        problems.append("no owner bundle records the owner's released model, so the reference cannot be checked")
    return jsonable({
        "verified": not problems, "reference_sha256": sorted(str(h) for h in hashes), "bundles": rows,
        "problems": problems, "caveat": "" if not problems else text.UNVERIFIED_REFERENCE,
    })  # fmt: skip


def build_report(record: AuditRecord, *, inputs: AuditInputs, run: Mapping[str, str], command: str) -> dict[str, Any]:
    """The report data of one audited suspect (unsealed: :func:`write_report` adds the integrity block)."""

    guard = SecretGuard(inputs.bundles)
    bundles = [bundle_entry(b) for b in inputs.bundles]
    by_sha = {b["sha256"]: b for b in bundles}
    suspect = record.model.entry()
    hashes = {f["sha256"] for f in record.files}
    suspect.update(
        edge_source=record.graph.edge_source.value, loader_notes=list(record.graph.notes),
        identical_to_release=sorted(b["sha256"] for b in bundles if b["released_model"]["sha256"] in hashes),
    )  # fmt: skip
    restore = {"reference_given": inputs.reference is not None, "entries": jsonable(record.restore)}
    if guard.leaks(restore):
        restore["entries"] = [{"restorer": e.get("restorer"), "status": "withheld"} for e in record.restore]
    restored = any(e.get("status") == "ok" for e in record.restore)
    measured_on = text.AFTER_RESTORE if restored else text.AS_GIVEN
    findings = [finding_entry(f, guard, bundle=by_sha.get(f.bundle), measured_on=measured_on) for f in record.findings]
    report = {
        "report_format": REPORT_FORMAT, "report_version": REPORT_VERSION, "run": dict(run), "tool": tool_info(),
        "command": command, "suspect": jsonable(suspect), "reference": inputs.reference_entry(), "bundles": bundles,
        "reference_check": reference_check(inputs), "restore": restore, "findings": findings,
        "verdict": record.verdict.value, "evidence": evidence_lines(findings), "exit_code": record.exit_code,
    }  # fmt: skip
    rates = calibration_block(record, inputs)  # known error rates and negative controls: report/controls.py
    attach_rates(report["findings"], record, rates)
    report.update(calibration=rates, controls=controls_block(record, inputs, guard))
    if guard.leaks(report):  # every part was whitelisted or checked: reaching this is a bug, never a leak
        raise RuntimeError("the report would contain material from a secret owner bundle; nothing was written")
    return report


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, its folder created if need be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the report: {exc.strerror or exc}") from None


def write_report(
    document: dict[str, Any],
    *,
    html_path: Path | None = None,
    json_path: Path | None = None,
    key: PrivateKey | None = None,
    template: str = "report.html.j2",
    attestation_path: Path | None = None,
) -> dict[str, Any]:
    """Seal ``document`` (signed with ``key`` if given), write its HTML page and JSON twin where asked, and
    return the sealed document; with neither path, only seal it. With ``attestation_path`` (which needs
    ``json_path`` and ``key``) the report is also written as an in-toto attestation signed with ``key``
    (:mod:`auditor.report.attest`)."""
    from auditor.report import seal as report_sign
    from auditor.report.html import render_html

    html = None
    if html_path is not None:
        preview = {
            "content_sha256": report_sign.content_sha256(document),
            "evidence_sha256": report_sign.evidence_sha256(document),
            "signer": report_sign.signer(key),
        }
        html = render_html(document, template=template, seal=preview).encode("utf-8")
    sealed = {**document, report_sign.INTEGRITY: report_sign.seal(document, html=html, key=key)}
    if html_path is not None and html is not None:
        _write(html_path, html)
    twin = dump_json(sealed) if json_path is not None else b""
    if json_path is not None:
        _write(json_path, twin)
    if attestation_path is not None:
        from auditor.report import attest

        if json_path is None or key is None:
            raise UsageError("an attestation needs the JSON twin and a signing key (--out and --sign-key)")
        stmt = attest.statement(
            sealed, json_name=json_path.name, json_sha256=hashlib.sha256(twin).hexdigest(),
            html_name=html_path.name if html_path is not None else None,
        )  # fmt: skip
        _write(attestation_path, attest.envelope_line(attest.envelope(stmt, key)))
    return sealed
