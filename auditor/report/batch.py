"""Several suspects in one audit: a report each, a sealed summary of them all, batch-wide error control and
one Merkle root over the reports.

Each suspect is one task (:func:`suspect_task`) run by an engine (:mod:`auditor.audit.engine`: a local
process pool or Ray): in a worker it loads the suspect safely (hashing it meanwhile), restores and
detects, and returns its row and report data as JSON text; the owner bundles, reference, controls and
calibrations are loaded once per worker. The driver seals, signs and writes each report as results
arrive, stores them in the result cache (:mod:`auditor.audit.cache`) and writes the summary at the end.

A file that cannot be audited (missing, malformed, refused as unsafe, a bug in auditor, a worker lost
past its retries) becomes one row of the summary with its error and exit code; the other files go on.
The batch's exit code is the most serious of the files' (:data:`auditor.audit.pipeline.BATCH_SEVERITY`).

Batch-wide error control: the p-values of the findings made with one owner bundle by one detector over
all suspects are one family; each finding's p-value is shown beside its Holm-adjusted one (Holm's
step-down over the family), and a finding *survives* when it was "detected" and its adjusted p-value is
still below the detector's own threshold. The summary says how many survive.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_UNSAFE, AuditorError
from auditor.report.attest import merkle_root

if TYPE_CHECKING:
    from auditor.audit.cache import ResultCache
    from auditor.audit.engine import Engine
    from auditor.audit.pipeline import AuditInputs
    from auditor.keys import PrivateKey

__all__ = [
    "MERKLE_ALGORITHM",
    "SUMMARY_FORMAT",
    "audit_batch",
    "audit_document",
    "audit_one_row",
    "error_control",
    "holm_log10",
    "merkle_root",
    "report_names",
    "suspect_task",
    "verdict_of",
]

SUMMARY_FORMAT = "auditor-audit-summary"
EXIT_RULE = (
    "the most serious outcome over all files, in this order: 70 internal error (a bug, or a worker lost past"
    " its retries), 6 plugin error, 5 refused as unsafe, 4 input error (the batch is incomplete), 0 a watermark"
    " found in at least one file, 3 none found and at least one inconclusive, 1 none found in any file;"
    " 130 when the run was interrupted (what was done is in the result cache)"
)
#: How the summary's Merkle root is computed: RFC 6962's tree hash (leaf = SHA-256(0x00 || leaf), node =
#: SHA-256(0x01 || left || right), the left subtree the largest power of two) over the reports' evidence
#: SHA-256s (32 bytes each), in the order of the summary's rows.
MERKLE_ALGORITHM = "rfc6962-sha256 over the reports' evidence_sha256, in row order"
#: Error rows that depend on the file's bytes alone, and so may be kept in the cache.
_CACHEABLE_ERRORS = (EXIT_INPUT, EXIT_UNSAFE)
_ERROR_HASH_LIMIT = 1 << 30


# --------------------------------------------------------------------------- one suspect


def audit_document(
    path: Path, inputs: AuditInputs, *, run: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Audit one suspect: its summary row so far and its report data (unsealed), or the error row and ``None``."""
    from auditor.audit.pipeline import audit_suspect
    from auditor.report.document import build_report

    row: dict[str, Any] = {"name": path.name, "path": str(path), "report": None, "error": None}
    try:
        record = audit_suspect(path, inputs)
        document = build_report(record, inputs=inputs, run=run, command=inputs.command(path))
    except AuditorError as exc:  # the row names the file: its error says only what went wrong
        return row | {"verdict": "error", "exit_code": exc.exit_code, "error": _without_path(str(exc), path)}, None
    except Exception as exc:  # a bug on one file must not lose the others
        return row | {"verdict": "error", "exit_code": EXIT_INTERNAL, "error": f"{type(exc).__name__}: {exc}"}, None
    return row, document


def _write_rendered(
    document: dict[str, Any], page: str, html: Path, js: Path, key: PrivateKey | None
) -> dict[str, Any]:
    """Seal (and sign) ``document`` with its HTML ``page`` rendered by a worker; write both; the sealed document."""
    from auditor.errors import UsageError
    from auditor.jsondata import dump_json
    from auditor.report import seal as report_seal
    from auditor.safeio import write_atomically

    data = page.encode("utf-8")
    sealed = {**document, report_seal.INTEGRITY: report_seal.seal(document, html=data, key=key)}
    for path, content in ((html, data), (js, dump_json(sealed))):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, content)
        except OSError as exc:
            raise UsageError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    return sealed


def _written_row(
    row: dict[str, Any], document: dict[str, Any] | None, name: str, *, out_dir: Path | None, key: PrivateKey | None,
    page: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
    """Seal (and sign) ``document``, write its HTML page (``page`` where a worker rendered it) and JSON twin to
    ``out_dir``, and complete ``row``."""
    from auditor.report.document import write_report

    row = dict(row)
    if document is None:
        return row, None
    try:
        html, js = (out_dir / f"{name}.html", out_dir / f"{name}.json") if out_dir is not None else (None, None)
        if page is not None and html is not None and js is not None:
            sealed = _write_rendered(document, page, html, js, key)
        else:
            sealed = write_report(document, html_path=html, json_path=js, key=key)
    except AuditorError as exc:
        return row | {"verdict": "error", "exit_code": exc.exit_code, "error": str(exc)}, None
    if out_dir is not None:
        row["report"] = {"html": f"{name}.html", "json": f"{name}.json"}
    s = sealed["suspect"]
    row.update(
        format=s["format"], size=s["size"], sha256=s["sha256"], verdict=sealed["verdict"],
        exit_code=sealed["exit_code"], findings=verdict_of(sealed["findings"]),
        evidence_sha256=sealed["integrity"]["evidence_sha256"], content_sha256=sealed["integrity"]["content_sha256"],
    )  # fmt: skip
    return row, sealed


def audit_one_row(
    path: Path,
    name: str,
    *,
    inputs: AuditInputs,
    run: Mapping[str, str],
    out_dir: Path | None,
    key: PrivateKey | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Audit one suspect of a batch in this process: its summary row and its sealed report (``None`` when it
    failed)."""
    row, document = audit_document(path, inputs, run=run)
    return _written_row(row, document, name, out_dir=out_dir, key=key)


def _without_path(message: str, path: Path) -> str:
    """``message`` without the leading ``path: `` an input error starts with (the row already names the file)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --------------------------------------------------------------------------- the task a worker runs

#: A worker's loaded inputs, by their spec (one entry: a worker serves one batch at a time).
_WORKER_INPUTS: dict[str, AuditInputs] = {}


def inputs_spec(inputs: AuditInputs) -> dict[str, Any]:
    """What a worker needs to load the same inputs: the paths as named, the folder they are named from,
    and the detector options (plain data, sent to each worker instead of the loaded objects)."""
    return {
        "cwd": os.getcwd(),
        "bundles": [str(p) for p in inputs.bundle_paths],
        "reference": str(inputs.reference.path) if inputs.reference is not None else None,
        "options": {f"{d}.{n}": v for d, values in sorted(inputs.options.items()) for n, v in sorted(values.items())},
        "controls": [str(p) for p in inputs.control_paths],
        "calibrations": [str(c.path) for c in inputs.calibrations if c.path is not None and not c.shipped],
    }


def _spec_key(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _worker_inputs(spec: Mapping[str, Any]) -> AuditInputs:
    """The inputs of ``spec``, loaded (and the controls audited) once per worker process."""
    key = _spec_key(spec)
    found = _WORKER_INPUTS.get(key)
    if found is not None:
        return found
    from auditor.audit.pipeline import audit_controls, load_inputs

    ref = spec.get("reference")
    inputs = load_inputs(
        bundles=[Path(p) for p in spec["bundles"]], reference=Path(ref) if ref else None, options=spec["options"],
        controls=[Path(p) for p in spec["controls"]], calibrations=[Path(p) for p in spec["calibrations"]],
    )  # fmt: skip
    audit_controls(inputs)
    _WORKER_INPUTS.clear()
    _WORKER_INPUTS[key] = inputs
    return inputs


def suspect_task(job: Mapping[str, Any]) -> str:
    """One suspect of a batch, as a worker runs it: load (hashed), restore, detect, build the report data.

    ``job`` is plain data: ``spec`` (:func:`inputs_spec`), ``path`` (the suspect as named), ``run`` (the run
    block), ``html`` (whether to render the HTML page) and ``signer`` (the public part of the signer the
    page names; the key stays with the driver, which seals and signs). Returns JSON text: ``row``,
    ``document`` (the unsealed report data, or ``null``), ``page`` (the HTML page, or ``null``),
    ``digest`` (the suspect's content digest where known) and ``stats`` (what ``stat`` said of its files
    before they were read, for the cache). Only this text goes back to the driver."""
    import time

    from auditor.audit.cache import file_stats, suspect_digest

    spec = job["spec"]
    if spec["cwd"] != os.getcwd() and Path(spec["cwd"]).is_dir():
        os.chdir(spec["cwd"])  # paths are named as on the driver (a cluster shares the file system)
    inputs = _worker_inputs(spec)
    path = Path(job["path"])
    started = time.time_ns()
    before = file_stats(path)
    row, document = audit_document(path, inputs, run=job["run"])
    digest, stats = None, None
    if document is not None:
        files = document["suspect"]["files"]
        digest = suspect_digest(files)
        after = file_stats(path, files)
        # Remembered only if nothing changed while it was read (a file changed since has a newer ctime).
        if before is not None and after is not None and after[0] == before[0]:
            stats = after if all(s[5] < started for s in after[1:]) else None
    elif row["exit_code"] in _CACHEABLE_ERRORS and before is not None and path.is_file():
        digest, stats = _error_digest(path, before)
    page = None
    if document is not None and job.get("html"):
        document = json.loads(json.dumps(document, allow_nan=False))  # exactly what the driver will seal
        page = _render(document, job.get("signer"))
    result = {"row": row, "document": document, "page": page, "digest": digest, "stats": stats}
    return json.dumps(result, allow_nan=False)


def _render(document: dict[str, Any], signer: Any) -> str:
    """The report's HTML page, showing the hashes the driver's seal will have (the most costly part of
    writing a report, so it runs in the worker)."""
    from auditor.report import seal as report_seal
    from auditor.report.html import render_html

    preview = {"content_sha256": report_seal.content_sha256(document),
               "evidence_sha256": report_seal.evidence_sha256(document), "signer": signer}  # fmt: skip
    return render_html(document, template="report.html.j2", seal=preview)


def _error_digest(path: Path, before: list[list[Any]]) -> tuple[str | None, list[list[Any]] | None]:
    from auditor.audit.cache import file_stats
    from auditor.safeio import sha256_file

    try:  # a refused file is hashed for the cache only up to 1 GiB: past that its refusal is cheaper to repeat
        digest = sha256_file(path, limit=_ERROR_HASH_LIMIT)
    except (AuditorError, OSError):
        return None, None
    return (digest, before) if file_stats(path) == before else (None, None)


# --------------------------------------------------------------------------- the batch


def _cache_material(inputs: AuditInputs) -> dict[str, Any]:
    """Everything but the suspect a cached result depends on: input hashes, versions, options."""
    from auditor.audit.pipeline import AuditRecord
    from auditor.report.document import tool_info

    controls = []
    for c in inputs.controls:
        controls.append([f["sha256"] for f in c.files] if isinstance(c, AuditRecord) else ["error", str(c.path)])
    ref = inputs.reference
    return {
        "bundles": sorted(b.sha256 for b in inputs.bundles),
        "reference": [f["sha256"] for f in ref.files] if ref is not None else None,
        "controls": controls,
        "calibrations": sorted(c.sha256 for c in inputs.calibrations),
        "options": inputs.options,
        "tool": tool_info(),
    }


def _complete(
    paths: Sequence[Path], inputs: AuditInputs, *, run: Mapping[str, str], engine: Engine | None,
    cache: ResultCache | None, on_start: Callable[[Path], None] | None, render: dict[str, Any],
) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None, str | None, bool]]:  # fmt: skip
    """Each suspect's ``(index, row, document, page, from_cache)``: cached ones first (their pages rendered
    here, since the run block is this run's), then as tasks complete."""
    from auditor.audit.cache import result_key
    from auditor.audit.engine import TaskFailed, run_tasks

    material = _cache_material(inputs) if cache is not None else {}
    todo: list[int] = []
    for i, path in enumerate(paths):
        sha = cache.known_sha256(path) if cache is not None else None
        hit = None
        if cache is not None and sha is not None:
            hit = cache.get(result_key(suspect_sha256=sha, command=inputs.command(path), inputs=material))
        if hit is not None and isinstance(hit.get("row"), dict):
            document = hit.get("document")
            if isinstance(document, dict):
                document = {**document, "run": dict(run)}
            yield i, hit["row"], document if isinstance(document, dict) else None, None, True
        else:
            todo.append(i)
    spec = inputs_spec(inputs)
    _WORKER_INPUTS.clear()
    _WORKER_INPUTS[_spec_key(spec)] = inputs  # tasks run in this process use what is loaded already
    jobs = [{"spec": spec, "path": str(paths[i]), "run": dict(run), **render} for i in todo]
    if on_start is not None and todo:
        on_start(paths[todo[0]])
    for j, text in run_tasks(suspect_task, jobs, engine=engine):
        i = todo[j]
        if isinstance(text, TaskFailed):
            row = {"name": paths[i].name, "path": str(paths[i]), "report": None, "verdict": "error",
                   "exit_code": EXIT_INTERNAL, "error": text.message}  # fmt: skip
            yield i, row, None, None, False
            continue
        result = json.loads(text)
        row, document, digest = result["row"], result["document"], result["digest"]
        if cache is not None and digest is not None:
            key = result_key(suspect_sha256=digest, command=inputs.command(paths[i]), inputs=material)
            stored = {"row": row, "document": {k: v for k, v in document.items() if k != "run"} if document else None}
            cache.put(key, path=paths[i], sha256=digest, result=stored, stats=result["stats"])
        yield i, row, document, result.get("page"), False


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
    engine: Engine | None = None,
    cache: ResultCache | None = None,
) -> dict[str, Any]:
    """Audit every suspect on ``engine`` (default: one after the other in this process), taking what ``cache``
    holds and storing what it does not; ``on_row`` sees each row as it completes (``on_start`` the first path
    sent to work).
    Returns the sealed summary (rows in the order of ``suspects``), written to ``out_dir``/summary.html and
    summary.json when ``out_dir`` is given. Ctrl-C (KeyboardInterrupt) passes through: every result that
    arrived before it is in the cache."""
    from auditor.audit.engine import Engine
    from auditor.audit.pipeline import audit_controls, batch_exit_code
    from auditor.report.document import REPORT_VERSION, bundle_entry, reference_check, tool_info, write_report

    engine = engine or Engine("local", jobs=1)
    if inputs.control_paths and not inputs.controls:
        audit_controls(inputs)
    from auditor.report.seal import signer

    rows: list[dict[str, Any] | None] = [None] * len(suspects)
    cached = 0
    render = {"html": out_dir is not None, "signer": signer(key)}
    for i, row, document, page, from_cache in _complete(suspects, inputs, run=run, engine=engine, cache=cache,
                                                        on_start=on_start, render=render):  # fmt: skip
        if rows[i] is not None:  # never twice, whatever an engine or the cache does
            continue
        written, _ = _written_row(row, document, names[i], out_dir=out_dir, key=key, page=page)
        rows[i] = written
        cached += from_cache
        if on_row is not None:
            on_row(written)
    done = [r for r in rows if r is not None]
    if len(done) != len(suspects):  # an engine that lost a result must not give a summary that looks whole
        raise RuntimeError(f"{len(suspects) - len(done)} suspects have no result")
    code = batch_exit_code([r["exit_code"] for r in done])
    summary_run = {**dict(run), "engine": engine.describe(),
                   "from_cache": str(cached)}  # fmt: skip
    summary = {
        "report_format": SUMMARY_FORMAT, "report_version": REPORT_VERSION, "run": summary_run, "tool": tool_info(),
        "command": command, "bundles": [bundle_entry(b) for b in inputs.bundles],
        "reference": inputs.reference_entry(), "reference_check": reference_check(inputs), "suspects": done,
        "counts": dict(sorted(Counter(r["verdict"] for r in done).items())), "exit_code": code, "exit_rule": EXIT_RULE,
        "error_control": error_control(done),
        "merkle": {"algorithm": MERKLE_ALGORITHM, "leaves": sum(1 for r in done if r.get("evidence_sha256")),
                   "root": merkle_root([r["evidence_sha256"] for r in done if r.get("evidence_sha256")])},
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


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def verdict_of(findings: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Scheme, detector, bundle and verdict of each watermark finding (the summary's columns), with its log10
    p-value and the threshold its verdict was decided at, where it has them."""
    out = []
    for f in findings:
        metrics = f.get("metrics") or {}
        first = f.get("first_screen") or {}
        out.append({
            "scheme": f["scheme"], "detector": f["detector"], "verdict": f["verdict"], "bundle": f.get("bundle", ""),
            "log10_p": _number(first.get("log10_p")), "p_threshold": _number(metrics.get("p_threshold")),
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- batch-wide error control


def holm_log10(log10_ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in log10 (p-values of 1e-70 do not underflow), in the order given:
    sorted ascending, the i-th (from 0) of m is ``min(1, (m - i) p)``, made non-decreasing."""
    m = len(log10_ps)
    order = sorted(range(m), key=lambda k: log10_ps[k])
    adjusted = [0.0] * m
    running = -math.inf
    for rank, k in enumerate(order):
        running = max(running, min(0.0, math.log10(m - rank) + log10_ps[k]))
        adjusted[k] = running
    return adjusted


def error_control(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Holm's correction over the batch, one family per owner bundle and detector: each finding of ``rows``
    gets ``log10_p_holm`` and ``survives``; the families and the number of surviving detections are returned."""
    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        for f in row.get("findings") or []:
            if f.get("scheme") and f.get("log10_p") is not None:
                families.setdefault((f.get("bundle", ""), f["detector"]), []).append(f)
    summary = []
    for (bundle, detector), found in sorted(families.items()):
        for f, adjusted in zip(found, holm_log10([f["log10_p"] for f in found]), strict=True):
            threshold = f.get("p_threshold")
            f["log10_p_holm"] = adjusted
            f["survives"] = f["verdict"] == "detected" and threshold is not None and adjusted < math.log10(threshold)
        summary.append({
            "bundle": bundle, "detector": detector, "tests": len(found),
            "detected": sum(f["verdict"] == "detected" for f in found), "survive": sum(f["survives"] for f in found),
        })  # fmt: skip
    return {
        "method": "holm",
        "family": "the findings of one owner bundle and one detector over every suspect of the batch",
        "families": summary,
        "detected": sum(s["detected"] for s in summary),
        "survive": sum(s["survive"] for s in summary),
    }
