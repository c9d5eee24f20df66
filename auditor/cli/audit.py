"""What ``auditor audit`` does with its options, and ``auditor report verify``.

The audit command in :mod:`auditor.cli.root` parses options and calls :func:`run_audit`;
this module decides between one suspect (one report) and a batch (a report
each and a summary), writes the files and prints one line per finding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from auditor.cli.console import note, printable, shown
from auditor.errors import EXIT_NOT_FOUND, EXIT_OK, UsageError

__all__ = ["MAX_LIST_BYTES", "named_suspects", "report_app", "run_audit", "verify"]

#: A list file (``@FILE``) of suspects is read up to this size: a million paths of 200 characters.
MAX_LIST_BYTES = 256 << 20
#: One suspect shows a progress bar (on a terminal) from this size on; several always show one.
LARGE = 256 << 20
report_app = typer.Typer(help="Check evidence reports.", no_args_is_help=True)


@report_app.callback()
def _report() -> None:
    """Check evidence reports."""


def verbosity() -> int:
    """-1 with ``auditor -q``, 1 with ``-v``, else 0."""
    from auditor.cli import console

    return console.verbosity


def _outputs(suspect: Path, out: Path | None, json_out: Path | None) -> tuple[Path | None, Path | None]:
    if out is not None and out.is_dir():
        from auditor.report.batch import report_names

        name = report_names([suspect])[0]
        return out / f"{name}.html", json_out or out / f"{name}.json"
    if out is not None and json_out is None:
        json_out = out.with_suffix(".json") if out.suffix.lower() != ".json" else out.with_name(out.name + ".json")
    return out, json_out


def named_suspects(given: Sequence[Path]) -> list[Path]:
    """The suspects as named, with each ``@FILE`` (a file that does not exist under that name) replaced by
    the paths it lists, one a line (blank lines and lines starting with ``#`` skipped; relative paths are
    from the current folder), and each glob pattern (``*``, ``?``, ``[``; ``**`` spans folders) that names no
    existing file replaced by the paths it matches, sorted."""
    import glob

    from auditor.errors import InputError
    from auditor.safeio import read_small_file

    found: list[Path] = []
    for p in given:
        text = str(p)
        if p.exists():
            found.append(p)
        elif text.startswith("@") and len(text) > 1:
            listing = Path(text[1:])
            data = read_small_file(listing, limit=MAX_LIST_BYTES, what="a list of suspects")
            try:
                lines = data.decode("utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise InputError(
                    listing, f"a list of suspects must be UTF-8 text (bad byte at offset {exc.start})"
                ) from None
            if any("\0" in line for line in lines):
                raise InputError(listing, "a list of suspects holds a NUL character")
            found += [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"{text}: the pattern matches no file")
            found += [Path(m) for m in matches]
        else:
            found.append(p)
    if not found:
        raise UsageError("the suspects named hold no path")
    return found


def _refuse_overwriting_inputs(outputs: Sequence[Path | None], inputs: Sequence[Path | None]) -> None:
    taken = {p.resolve() for p in inputs if p is not None and p.exists()}
    written = [p for p in outputs if p is not None]
    for p in written:
        if p.resolve() in taken:
            raise UsageError(f"{p}: is one of the audit's input files; auditor never writes over its inputs")
    if len({p.resolve() for p in written}) < len(written):
        raise UsageError("the HTML report and its JSON twin must be different files")


def _load_key(sign_key: Path | None, passphrase_file: Path | None) -> Any:
    from auditor import keys
    from auditor.cli.keys import read_passphrase_file

    if sign_key is None:
        if passphrase_file is not None:
            raise UsageError("--passphrase-file goes with --sign-key")
        return None
    passphrase = read_passphrase_file(passphrase_file) if passphrase_file is not None else None
    return keys.load_private_key(sign_key, passphrase)


def run_audit(
    *,
    suspects: Sequence[Path],
    bundles: Sequence[Path],
    reference: Path | None,
    case_id: str,
    analyst: str,
    out: Path | None,
    json_out: Path | None,
    sign_key: Path | None,
    passphrase_file: Path | None,
    options: Sequence[str] = (),
    as_json: bool,
    console: Console,
    controls: Sequence[Path] = (),
    calibrations: Sequence[Path] = (),
    attest: bool = False,
    model_signer_key: Path | None = None,
    engine: str = "local",
    jobs: int | None = None,
    ray_address: str | None = None,
    cache: Path | None = None,
    no_cache: bool = False,
    refresh: bool = False,
) -> int:
    """Run the audit the command line asked for, write its reports, print its lines; the exit code.

    ``controls`` are negative controls, audited once with the same inputs and shown in every report;
    ``calibrations`` are calibration files whose measured false-positive rates the reports show. ``engine``,
    ``jobs`` and ``ray_address`` say where a batch's suspects are audited (:mod:`auditor.audit.engine`);
    ``cache`` is the batch's result cache (:mod:`auditor.audit.cache`; default path unless ``no_cache``),
    ``refresh`` audits everything again."""
    from auditor.audit.load import is_model
    from auditor.audit.pipeline import expand_suspects, load_inputs
    from auditor.report.document import run_block

    listed = named_suspects(suspects)
    paths, batch = expand_suspects(listed)
    batch = batch or listed != list(suspects)  # a list file or a pattern names a batch, even of one
    if attest and sign_key is None:
        raise UsageError("--attest needs --sign-key: the attestation is signed with the analyst's key")
    from auditor.audit.engine import Engine

    batch_engine = Engine(engine, jobs, ray_address)
    if no_cache and (cache is not None or refresh):
        raise UsageError("--no-cache does not go with --cache or --refresh")
    if attest and batch and out is None:
        raise UsageError("--attest needs --out: a batch's attestation goes beside its summary")
    if model_signer_key is not None and batch:
        raise UsageError("--model-signer-key applies to one suspect: audit each suspect on its own")
    if attest and out is None and json_out is None:
        raise UsageError("--attest needs --out or --json-out: the attestation goes beside the JSON twin")
    key = _load_key(sign_key, passphrase_file)
    inputs = load_inputs(
        bundles=bundles, reference=reference, options=options, controls=controls, calibrations=calibrations
    )
    run = run_block(case_id=case_id, analyst=analyst)
    given: list[Path | None] = [
        *paths,
        *bundles,
        reference,
        sign_key,
        passphrase_file,
        *controls,
        *calibrations,
        model_signer_key,
    ]
    if batch:
        if json_out is not None:
            raise UsageError("with several suspects, --out names a folder for every report; --json-out does not apply")
        from auditor.audit.cache import default_cache_path

        cache_path = None if no_cache else (cache or default_cache_path())
        code = _run_batch(paths, suspects, inputs=inputs, run=run, out=out, key=key, given=given, as_json=as_json,
                          console=console, engine=batch_engine, cache=cache_path, refresh=refresh,
                          attest=attest)  # fmt: skip
    else:
        code = _run_single(paths[0], inputs=inputs, run=run, out=out, json_out=json_out, key=key, given=given,
                           as_json=as_json, console=console, attest=attest,
                           provenance=(reference, model_signer_key))  # fmt: skip
    # Hints after the result, so that they never stand between the user and an error line.
    named = sum(1 for p in suspects if not p.is_dir() or is_model(p))
    if named > len({p.resolve() if p.exists() else p.absolute() for p in suspects}):
        note("a suspect was named more than once; each file was audited once")
    if not bundles:
        note("no owner bundle was given (--bundle OWNER_BUNDLE): no watermark was looked for, so the verdict can"
             " only be inconclusive; give the bundle the owner handed over")  # fmt: skip
    return code


def _run_single(
    suspect: Path, *, inputs: Any, run: Any, out: Path | None, json_out: Path | None, key: Any,
    given: list[Path | None], as_json: bool, console: Console, attest: bool = False,
    provenance: tuple[Path | None, Path | None] = (None, None),
) -> int:  # fmt: skip
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from auditor.audit.pipeline import audit_suspect
    from auditor.report.attest import attestation_path
    from auditor.report.document import build_report, write_report

    html_path, json_path = _outputs(suspect, out, json_out)
    attested = attestation_path(json_path) if attest and json_path is not None else None
    _refuse_overwriting_inputs([html_path, json_path, attested], given)
    _audit_controls(inputs, as_json=as_json, console=console)
    size = suspect.stat().st_size if suspect.is_file() else 0
    err = Console(stderr=True, highlight=False)
    with Progress(
        TextColumn("auditing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal or size < LARGE,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=size)
        record = audit_suspect(suspect, inputs, progress=lambda n: progress.advance(task, n))
    document = build_report(record, inputs=inputs, run=run, command=inputs.command(suspect))
    from auditor.audit.provenance import attach

    warn = Console(stderr=True, highlight=False, soft_wrap=True)
    for alert in attach(document, suspect=suspect, reference=provenance[0], signer_key=provenance[1]):
        warn.print(shown(f"warning: {alert}"))
    sealed = write_report(document, html_path=html_path, json_path=json_path, key=key, attestation_path=attested)
    if as_json:
        typer.echo(json.dumps(sealed, indent=2, ensure_ascii=False))
    else:
        from auditor.report.view import view_of

        if verbosity() >= 0:
            for f in sealed["findings"]:
                headline = view_of("detectors", f["detector"]).headline(f)
                console.print(shown(f"{f['detector']}: {_said(f)}: {headline}"))
        if verbosity() > 0:
            for line in sealed["suspect"].get("loader_notes", []):
                note(f"loader: {line}", level=1)
            for e in sealed["restore"]["entries"]:
                note(f"restore: {e.get('restorer')}: {e.get('status')}", level=1)
        console.print(f"verdict: {sealed['verdict']}")
        for what, path in (("report", html_path), ("json", json_path), ("attestation", attested)):
            if path is not None:
                console.print(shown(f"{what}: {path}"))
    return int(sealed["exit_code"])


def _said(finding: dict[str, Any]) -> str:
    """A finding's verdict, or for a separate line of evidence its question and answer (never a watermark's)."""
    from auditor.report.view import view_of

    ev = view_of("detectors", str(finding.get("detector"))).evidence(finding)
    return f"{ev['question']}: {ev['answer']}" if ev else str(finding.get("verdict"))


def _audit_controls(inputs: Any, *, as_json: bool, console: Console) -> None:
    """Audit the negative controls (if any) before the suspects; a line each, and a warning on standard error
    for one that failed or came out "detected" (which never changes the suspect's verdict or exit code)."""
    from auditor.audit.pipeline import AuditRecord, audit_controls

    if not inputs.control_paths:
        return
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for result in audit_controls(inputs):
        if not isinstance(result, AuditRecord):
            err.print(shown(f"warning: control {result.path}: not audited (exit {result.exit_code}): {result.error}"))
            continue
        watermarks = [f for f in result.findings if f.scheme]
        found = "; ".join(f"{f.detector}: {f.verdict.value}" for f in watermarks) or "no findings"
        if not as_json:
            console.print(shown(f"control {result.path}: {result.verdict.value} ({found})"))
        if result.verdict.value == "detected":
            err.print(shown(
                f"warning: control {result.path} came out detected: an independent model was claimed, which"
                " undermines the method as applied (the suspect's verdict and exit code are unchanged)"
            ))  # fmt: skip


def _run_batch(
    paths: list[Path], suspects: Sequence[Path], *, inputs: Any, run: Any, out: Path | None, key: Any,
    given: list[Path | None], as_json: bool, console: Console, engine: Any = None, cache: Path | None = None,
    refresh: bool = False, attest: bool = False,
) -> int:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from auditor.audit.cache import ResultCache
    from auditor.report.batch import audit_batch, report_names

    names = report_names(paths)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: with several suspects, --out names a folder, and this is a file")
        if out.resolve() in {p.resolve() for p in suspects if p.is_dir()}:
            raise UsageError(f"{out}: the reports cannot go into the folder of suspects")
        written = [out / f"{n}.{ext}" for n in [*names, "summary"] for ext in ("html", "json")]
        _refuse_overwriting_inputs([*written, out / "summary.intoto.jsonl", cache], given)
    elif cache is not None:
        _refuse_overwriting_inputs([cache], given)
    _audit_controls(inputs, as_json=as_json, console=console)
    err = Console(stderr=True, highlight=False)
    results = ResultCache(cache, refresh=refresh) if cache is not None else None
    with Progress(
        TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        console=err, transient=True, disable=not err.is_terminal,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=len(paths))

        def done(row: dict[str, Any]) -> None:
            progress.update(task, advance=1, description=shown(Path(row["path"]).name))
            if as_json:
                return
            if row["error"]:
                console.print(shown(f"{row['path']}: error (exit {row['exit_code']}): {row['error']}"))
            elif verbosity() < 0:
                console.print(shown(f"{row['path']}: {row['verdict']}"))
            else:
                schemes = "; ".join(f"{f['detector']}: {_said(f)}" for f in row["findings"]) or "no findings"
                console.print(shown(f"{row['path']}: {row['verdict']} ({schemes})"))

        try:
            summary = audit_batch(
                paths, names, inputs=inputs, run=run, command=inputs.command(*suspects), out_dir=out, key=key,
                on_row=done, engine=engine, cache=results,
            )  # fmt: skip
        except KeyboardInterrupt:
            if results is not None:
                kept = results.hits + results.stored
                Console(stderr=True, highlight=False, soft_wrap=True).print(shown(
                    f"{kept} of {len(paths)} suspects done and kept in {cache}; the same command audits the rest"
                ), markup=False)  # fmt: skip
            raise
        finally:
            if results is not None:
                results.close()
    attested = _attest_batch(summary, out, key) if attest and out is not None else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        counts = ", ".join(f"{n} {v}" for v, n in summary["counts"].items())
        control = summary["error_control"]
        console.print(f"{len(paths)} suspects: {counts}; exit code {summary['exit_code']}")
        if control["detected"]:
            console.print(f"batch-wide (Holm): {control['survive']} of {control['detected']} detections survive")
        if results is not None and results.hits:
            note(f"{results.hits} results taken from the cache {cache} (--refresh audits them again)")
        if out is not None:
            console.print(shown(f"summary: {out / 'summary.html'}"))
        if attested is not None:
            console.print(shown(f"attestation: {attested}"))
    return int(summary["exit_code"])


def _attest_batch(summary: dict[str, Any], out: Path, key: Any) -> Path:
    """Write the batch's attestation beside its summary: one signature over the summary and the Merkle root."""
    import hashlib

    from auditor.jsondata import dump_json
    from auditor.report.attest import attestation_path, batch_statement, envelope, envelope_line
    from auditor.safeio import write_atomically

    json_path = out / "summary.json"
    digest = hashlib.sha256(dump_json(summary)).hexdigest()  # the bytes write_report wrote
    stmt = batch_statement(summary, json_name=json_path.name, json_sha256=digest, html_name="summary.html")
    path = attestation_path(json_path)
    write_atomically(path, envelope_line(envelope(stmt, key)))
    return path


@report_app.command()
def verify(
    report: Annotated[
        Path,
        typer.Argument(
            help="The report's JSON twin (REPORT.json), a batch's summary.json, or the report's attestation"
            " (REPORT.intoto.jsonl, checked with the JSON twin and HTML page beside it)."
        ),
    ],
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="PEM public key the report must be signed with.", dir_okay=False),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also check that this HTML page is the one the report seals.")
    ] = None,
    subject: Annotated[
        list[Path] | None,
        typer.Option(
            "--subject",
            help="With an attestation: a file (a suspect, bundle...) that must be among its subjects.",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Recompute a report's content hash and check its signature, or check its attestation; print one line.

    Exit code 0: intact; 1: altered, or the signature is missing (with
    --public-key), from another key or invalid, or a --subject is not attested; 4: not
    readable as a report or attestation (or a file is missing, not a regular file, or
    over its size limit)."""
    from auditor.report.attest import is_attestation

    if is_attestation(report):
        from auditor.report.attest import verify_attestation

        if html is not None:
            raise UsageError("--html does not apply to an attestation: it checks the HTML page it names itself")
        result: Any = verify_attestation(report, public_key=public_key, given=tuple(subject or ()))
    else:
        from auditor.report.seal import verify_report

        if subject:
            raise UsageError("--subject applies to an attestation (REPORT.intoto.jsonl)")
        result = verify_report(report, public_key=public_key, html=html)
    typer.echo(("intact" if result.intact else "FAILED") + f": {printable(report)}: {result.message}")
    raise typer.Exit(EXIT_OK if result.intact else EXIT_NOT_FOUND)
