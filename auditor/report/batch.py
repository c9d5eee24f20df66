"""Several suspects in one audit: a report each, and a sealed summary of them all.

A file that cannot be audited (missing, malformed, refused as unsafe, or a bug
in auditor) becomes one row of the summary with its error and exit code; the
other files go on. The batch's exit code is the most serious of the files'
(:data:`auditor.audit.pipeline.BATCH_SEVERITY`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import EXIT_INTERNAL, AuditorError

if TYPE_CHECKING:
    from auditor.audit.pipeline import AuditInputs
    from auditor.keys import PrivateKey

__all__ = ["SUMMARY_FORMAT", "audit_batch", "audit_one_row", "report_names", "verdict_of"]

SUMMARY_FORMAT = "auditor-audit-summary"
EXIT_RULE = (
    "the most serious outcome over all files, in this order: 70 internal error, 6 plugin error, 5 refused as"
    " unsafe, 4 input error (the batch is incomplete), 0 a watermark found in at least one file, 3 none found"
    " and at least one inconclusive, 1 none found in any file"
)


def audit_one_row(
    path: Path,
    name: str,
    *,
    inputs: AuditInputs,
    run: Mapping[str, str],
    out_dir: Path | None,
    key: PrivateKey | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Audit one suspect of a batch: its summary row and its sealed report (``None`` when it failed)."""
    from auditor.audit.pipeline import audit_suspect
    from auditor.report.document import build_report, write_report

    row: dict[str, Any] = {"name": path.name, "path": str(path), "report": None, "error": None}
    try:
        record = audit_suspect(path, inputs)
        document = build_report(record, inputs=inputs, run=run, command=inputs.command(path))
        html, js = (out_dir / f"{name}.html", out_dir / f"{name}.json") if out_dir is not None else (None, None)
        sealed = write_report(document, html_path=html, json_path=js, key=key)
        if out_dir is not None:
            row["report"] = {"html": f"{name}.html", "json": f"{name}.json"}
    except AuditorError as exc:  # the row names the file: its error says only what went wrong
        return row | {"verdict": "error", "exit_code": exc.exit_code, "error": _without_path(str(exc), path)}, None
    except Exception as exc:  # a bug on one file must not lose the others
        return row | {"verdict": "error", "exit_code": EXIT_INTERNAL, "error": f"{type(exc).__name__}: {exc}"}, None
    s = sealed["suspect"]
    row.update(
        format=s["format"], size=s["size"], sha256=s["sha256"], verdict=sealed["verdict"],
        exit_code=sealed["exit_code"], findings=verdict_of(sealed["findings"]),
        evidence_sha256=sealed["integrity"]["evidence_sha256"], content_sha256=sealed["integrity"]["content_sha256"],
    )  # fmt: skip
    return row, sealed


def _without_path(message: str, path: Path) -> str:
    """``message`` without the leading ``path: `` an input error starts with (the row already names the file)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def audit_batch(
    suspects: Sequence[Path],
    names: Sequence[str],
    *,
    inputs: AuditInputs,
    run: Mapping[str, str],
    command: str,
    out_dir: Path | None = None,
    key: PrivateKey | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Audit every suspect in turn (``on_start`` sees each path before, ``on_row`` each row after) and return
    the sealed summary,
    written to ``out_dir``/summary.html and summary.json when ``out_dir`` is given."""
    from auditor.audit.pipeline import batch_exit_code
    from auditor.report.document import REPORT_VERSION, bundle_entry, reference_check, tool_info, write_report

    rows = []
    for path, name in zip(suspects, names, strict=True):
        if on_start is not None:
            on_start(path)
        row, _ = audit_one_row(path, name, inputs=inputs, run=run, out_dir=out_dir, key=key)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    code = batch_exit_code([r["exit_code"] for r in rows])
    summary = {
        "report_format": SUMMARY_FORMAT, "report_version": REPORT_VERSION, "run": dict(run), "tool": tool_info(),
        "command": command, "bundles": [bundle_entry(b) for b in inputs.bundles],
        "reference": inputs.reference_entry(), "reference_check": reference_check(inputs), "suspects": rows,
        "counts": dict(sorted(Counter(r["verdict"] for r in rows).items())), "exit_code": code, "exit_rule": EXIT_RULE,
    }  # fmt: skip
    html, js = (out_dir / "summary.html", out_dir / "summary.json") if out_dir is not None else (None, None)
    return write_report(summary, html_path=html, json_path=js, key=key, template="summary.html.j2")


def report_names(paths: Sequence[Path]) -> list[str]:
    """A distinct, file-system-safe report stem per suspect (``name``, ``name-2``... in order)."""
    used: set[str] = {"summary"}
    names = []
    for p in paths:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.name).strip(".") or "suspect"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.append(name)
    return names


def verdict_of(findings: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Scheme, detector and verdict of each finding (the summary's columns)."""
    return [{"scheme": f["scheme"], "detector": f["detector"], "verdict": f["verdict"]} for f in findings]
