"""The evidence report: the data (a JSON-ready dict), its HTML rendering and its sealed JSON twin.

The data is built from an audit (:class:`auditor.audit.pipeline.AuditRecord`) by
whitelisting: what a report holds of an owner bundle is named field by field
(:func:`bundle_entry`), never "everything but the secrets". Its top level
(docs/report.md has the full outline):

* ``run``: case id, analyst and date, the only fields that differ between two
  runs of the same audit; ``integrity`` (:mod:`auditor.report.seal`) seals the rest;
* ``tool``, ``command``, ``suspect``, ``reference``, ``bundles``, ``restore``,
  ``findings``, ``verdict``, ``exit_code``.

Everything is sorted or kept in the order the audit defines (findings by
their stable key, bundles by scheme and SHA-256), so the same audit gives the
same bytes apart from the run and integrity blocks.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import os
import platform
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor import __version__
from auditor.errors import UsageError
from auditor.findings import Finding
from auditor.report.guard import SecretGuard

if TYPE_CHECKING:
    from auditor.audit.pipeline import AuditInputs, AuditRecord
    from auditor.bundle import OwnerBundle
    from auditor.keys import PrivateKey

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "build_report",
    "bundle_entry",
    "dump_json",
    "jsonable",
    "render_html",
    "run_block",
    "tool_info",
    "write_atomically",
    "write_report",
]

REPORT_FORMAT = "auditor-evidence-report"
REPORT_VERSION = 1
DEPENDENCIES = ("cryptography", "jinja2", "numpy", "onnx", "safetensors", "scipy", "torch")
#: Per known scheme, the finding ``details`` a report carries; an unknown detector's go in whole, checked
#: by :class:`SecretGuard`. Greedy Residuals' identity block is cut to the fields named here.
DETAIL_KEYS = {
    "greedy-residuals": ("identity", "params", "params_note", "layers", "notes", "forging_check"),
    "hufunet": ("host_layers", "notes"),
}
#: The bundle section names the public key by its fingerprint; the detector's own hash of the PEM text is left out.
IDENTITY_KEYS = ("verified", "reason", "signature_algorithm", "message")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, the same whatever order it was built in: mapping keys as sorted
    strings, sets sorted, numpy and torch scalars unwrapped, NaN and infinities as strings."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a hostile file's names
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)  # a numpy float64 becomes a plain float
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return dict(sorted(((str(k), jsonable(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    return jsonable(str(value))


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


def _get(payload: Mapping[str, Any], *path: str) -> Any:
    value: Any = payload
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, str | int | float | bool) else None


def _fingerprint(pem: Any) -> str | None:
    from auditor import keys
    from auditor.errors import InputError

    try:
        return keys.fingerprint(keys.load_public_key(pem)) if isinstance(pem, str) else None
    except InputError:
        return None


def bundle_entry(bundle: OwnerBundle) -> dict[str, Any]:
    """What a report holds of an owner bundle: its file, hash and scheme, and only the payload fields named
    here (a public key's fingerprint, the copyright statement, the owner's released model's hash)."""
    path, p = bundle.path, bundle.payload
    entry: dict[str, Any] = {
        "name": path.name if path else None, "path": str(path) if path else None, "sha256": bundle.sha256,
        "scheme": bundle.scheme, "version": bundle.version, "secret": bundle.secret,
        "released_model": {"file": _get(p, "model", "file"), "sha256": _get(p, "model", "sha256")},
    }  # fmt: skip
    if bundle.scheme == "greedy-residuals":
        entry["identity"] = {
            "message": _get(p, "message"), "signature_algorithm": _get(p, "signature_algorithm"),
            "public_key_sha256": _fingerprint(p.get("public_key")),
        }  # fmt: skip
        layers = p.get("layers")
        entry["layers"] = [_get(e, "name") for e in layers] if isinstance(layers, list) else []
    if bundle.scheme == "hufunet":
        entry["host_architecture"] = _get(p, "host", "architecture")
    return jsonable(entry)


def finding_entry(finding: Finding, guard: SecretGuard) -> dict[str, Any]:
    """A finding as the report holds it: the detector's words and numbers, its known details, the explanation."""
    from auditor.report.text import explanation

    details = dict(finding.details)
    if finding.scheme in DETAIL_KEYS:
        details = {k: v for k, v in details.items() if k in DETAIL_KEYS[finding.scheme]}
        if isinstance(details.get("identity"), Mapping):
            details["identity"] = {k: v for k, v in details["identity"].items() if k in IDENTITY_KEYS}
    entry = jsonable(finding.to_dict() | {"details": details})
    if guard.leaks(entry):
        entry.update(
            summary="This finding's words and numbers are withheld: they contain material from a secret owner"
            " bundle, which a report never shows.",
            metrics={}, details={}, withheld=True,
        )  # fmt: skip
    entry["explanation"] = explanation(finding.scheme, finding.detector, entry["verdict"])
    return entry


def build_report(record: AuditRecord, *, inputs: AuditInputs, run: Mapping[str, str], command: str) -> dict[str, Any]:
    """The report data of one audited suspect (unsealed: :func:`write_report` adds the integrity block)."""
    from auditor.audit.pipeline import EXIT_FOR_VERDICT, LoadedModel

    guard = SecretGuard(inputs.bundles)
    bundles = [bundle_entry(b) for b in inputs.bundles]
    suspect = LoadedModel(record.path, record.graph, record.files).entry()
    hashes = {f["sha256"] for f in record.files}
    suspect.update(
        edge_source=record.graph.edge_source.value, loader_notes=list(record.graph.notes),
        identical_to_release=sorted(b["sha256"] for b in bundles if b["released_model"]["sha256"] in hashes),
    )  # fmt: skip
    restore = {"reference_given": inputs.reference is not None, "entries": jsonable(record.restore)}
    if guard.leaks(restore):
        restore["entries"] = [{"restorer": e.get("restorer"), "status": "withheld"} for e in record.restore]
    report = {
        "report_format": REPORT_FORMAT, "report_version": REPORT_VERSION, "run": dict(run), "tool": tool_info(),
        "command": command, "suspect": jsonable(suspect), "reference": inputs.reference_entry(), "bundles": bundles,
        "restore": restore, "findings": [finding_entry(f, guard) for f in record.findings],
        "verdict": record.verdict.value, "exit_code": EXIT_FOR_VERDICT[record.verdict.value],
    }  # fmt: skip
    if guard.leaks(report):  # every part was whitelisted or checked: reaching this is a bug, never a leak
        raise RuntimeError("the report would contain material from a secret owner bundle; nothing was written")
    return report


def render_html(document: Mapping[str, Any], *, template: str, seal: Mapping[str, Any]) -> str:
    """``document`` rendered with ``template`` (``report.html.j2`` or ``summary.html.j2``); ``seal`` holds
    the hashes and signer the page shows."""
    from auditor.report import svg as report_svg
    from auditor.report import text as report_text
    from auditor.report.html import jinja_environment

    env = jinja_environment()
    env.filters.update(fmt=report_text.fmt, label=report_text.label)
    env.globals.update(
        svg=report_svg, text=report_text, verdict_words=report_text.VERDICT_WORDS, columns=report_text.columns
    )
    return env.get_template(template).render(r=document, seal=seal)


def dump_json(document: Any) -> bytes:
    """The JSON twin's bytes: indented, keys sorted, UTF-8, a newline at the end."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot write the report: {exc.strerror or exc}") from None


def write_report(
    document: dict[str, Any],
    *,
    html_path: Path | None,
    json_path: Path | None,
    key: PrivateKey | None = None,
    template: str = "report.html.j2",
) -> dict[str, Any]:
    """Seal ``document``, write its HTML and JSON twin where asked, and return the sealed document."""
    from auditor.report import seal as report_sign

    preview = {
        "content_sha256": report_sign.content_sha256(document),
        "evidence_sha256": report_sign.evidence_sha256(document),
        "signer": report_sign.signer(key),
    }
    html = render_html(document, template=template, seal=preview).encode("utf-8") if html_path else None
    sealed = {**document, report_sign.INTEGRITY: report_sign.seal(document, html=html, key=key)}
    if html_path is not None and html is not None:
        write_atomically(html_path, html)
    if json_path is not None:
        write_atomically(json_path, dump_json(sealed))
    return sealed
