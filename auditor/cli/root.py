"""The ``auditor`` command line: thin commands over keyword-only core functions.

Errors a user can cause end as ``error: <one line>`` on stderr and the exit
code documented in the README (:mod:`auditor.errors`); never a traceback.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from auditor import __version__
from auditor.cli.audit import report_app
from auditor.cli.calibrate import calibrate_command
from auditor.cli.console import emit_json, err, out, printable, shown
from auditor.cli.keys import keys_app
from auditor.errors import EXIT_INTERNAL, EXIT_USAGE, AuditorError, PluginError, UsageError

if TYPE_CHECKING:
    from auditor.graph import Edge, Layer, LayerGraph

app = typer.Typer(
    name="auditor",
    help="Forensic auditing of watermarked deep-learning models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
#: ``auditor embed NAME``: embedder plugins add their command here from ``register_commands``.
embed_app = typer.Typer(help="Train an owner's model with a watermark.", no_args_is_help=True)
app.add_typer(embed_app, name="embed")
app.add_typer(keys_app, name="keys")
app.add_typer(report_app, name="report")
app.command(name="calibrate")(calibrate_command)
out_console = out  # the audit command's parameter --out shadows the module's name


def _version(value: bool) -> None:
    if value:
        typer.echo(f"auditor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only verdicts and errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print notes: loader, restore.")] = False,
) -> None:
    """Forensic auditing of watermarked deep-learning models."""
    from auditor.cli import console

    if quiet and verbose:
        raise UsageError("--quiet and --verbose exclude each other")
    console.verbosity = -1 if quiet else (1 if verbose else 0)


@contextmanager
def _few_collections() -> Iterator[None]:
    """Rarer garbage collections while a model's graph is built and used (``inspect``, ``audit``).

    A file of 200,000 tensors makes millions of small objects that all stay alive until the command
    ends; at CPython's default thresholds the collector scans them again and again, which took
    most of ``inspect``'s time and a third of ``audit``'s. Reference counting still frees everything
    else as usual, and the collector still runs, every 100,000 allocations instead of 700."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], 100_000), max(old[1], 50), max(old[2], 100))
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _load_and_hash(path: Path) -> tuple[LayerGraph, list[dict[str, Any]]]:
    """Load ``path`` while its files are hashed in the background (all at once, see
    :mod:`auditor.audit.load`), with a progress bar on a terminal for large ones; the files' path, size and
    SHA-256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from auditor.audit.load import hashed_load

    columns = (TextColumn("hashing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("hashing", total=None, visible=False)  # shown once the files are known
        with hashed_load(path, progress=lambda n: progress.advance(task, n)) as loading:
            total = sum(Path(f).stat().st_size for f in loading.graph.files)
            progress.update(task, total=total, visible=total > 256 << 20)
            model = loading.finish()
    return model.graph, [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in model.files]


def _description(path: Path, graph: LayerGraph, files: list[dict[str, Any]], *, lazy: bool) -> dict[str, Any]:
    description = graph.describe(lazy=lazy)
    description["files"] = files
    description["sha256"] = files[0]["sha256"] if path.is_file() and files else None
    return description


def inspect_model(*, path: Path) -> dict[str, Any]:
    """Load ``path`` safely and describe it: format, file hashes, layers, edges, totals."""
    with _few_collections():
        graph, files = _load_and_hash(path)
        return _description(path, graph, files, lazy=False)


def _plain(text: str) -> str:
    # Most names are printable already: skip printable()'s character-by-character walk.
    return text if text.isprintable() else printable(text)


def _write_lines(lines: Iterable[str]) -> None:
    """Write ``lines`` to standard output in batches: one write per line (rich's, or print's) costs
    more than the line itself when a model has hundreds of thousands of layers."""
    file = out.file
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= 4096:
            file.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        file.write("\n".join(batch) + "\n")
    file.flush()


_END = object()


def json_lines(data: Mapping[str, Any]) -> Iterator[str]:
    """``data`` as JSON, a line at a time: one key of ``data`` per line (a mapping indented below it),
    and each entry of a list (or iterator) on a line of its own.

    The same data :func:`~auditor.cli.console.emit_json` writes, laid out so that a model of 200,000
    layers is one line per layer (easy to grep) and each line is encoded by json's C encoder (its
    indenting encoder is pure Python and took most of the time); iterators are consumed as written,
    so the entries need not all be held at once."""
    yield "{"
    for n, (key, value) in enumerate(data.items()):
        comma = "," if n < len(data) - 1 else ""
        head = f"  {json.dumps(key)}: "
        if isinstance(value, list | Iterator):
            items = iter(value)
            prev = next(items, _END)
            if prev is _END:
                yield f"{head}[]{comma}"
                continue
            yield head + "["
            for item in items:
                yield f"    {json.dumps(prev)},"
                prev = item
            yield f"    {json.dumps(prev)}"
            yield f"  ]{comma}"
        else:
            yield head + json.dumps(value, indent=2).replace("\n", "\n  ") + comma
    yield "}"


_COLUMNS = ("#", "layer", "kind", "shape", "dtype", "parameters")
_RIGHT = (True, False, False, False, False, True)  # numbers align right
#: No column is padded wider than this: one hostile megabyte-long name must not widen every row.
_MAX_WIDTH = 64


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def _layer_row(i: int, layer: Layer) -> tuple[str, ...]:
    w = layer.params.get("weight") or next(iter(layer.params.values()), None)
    shape = "x".join(map(str, w.shape)) if w is not None else "-"
    dtype = w.dtype + (" (quantized)" if w.quantization is not None else "") if w is not None else "-"
    return str(i), _plain(layer.name), layer.kind.value, shape, dtype, f"{layer.parameter_count:,d}"


def _table(rows: list[tuple[str, ...]]) -> Iterator[str]:
    """The layer table as plain aligned lines, header first; linear in the rows (rich's Table is not)."""
    widths = [min(_MAX_WIDTH, max(map(_width, column))) for column in zip(_COLUMNS, *rows, strict=True)]
    for row in [_COLUMNS, *rows]:
        cells = []
        for text, width, right in zip(row, widths, _RIGHT, strict=True):
            pad = " " * max(0, width - _width(text))
            cells.append(pad + text if right else text + pad)
        yield "  ".join(cells).rstrip()


def _edge_line(e: Edge) -> str:
    via = " -> ".join(e.via) if e.via else "direct"
    offset = f"  offset {e.offset}" if e.offset else ""
    return _plain(f"  {e.src} -> {e.dst}  via {via}{offset}")


def _print_inspection(graph: LayerGraph, files: list[dict[str, Any]]) -> None:
    out.print(f"[bold]{shown(graph.path)}[/bold]  format: {shown(graph.format)}")
    _write_lines(f"  {f['sha256']}  {f['size']:>12,d} B  {_plain(f['path'])}" for f in files)
    lines = _table([_layer_row(i, layer) for i, layer in enumerate(graph.layers)])
    out.print(next(lines), style="bold", markup=False)
    _write_lines(lines)
    out.print(f"edges ({graph.edge_source.value}):", markup=False)
    _write_lines(_edge_line(e) for e in graph.edges)
    _write_lines(_plain(f"note: {note}") for note in graph.notes)
    out.print(
        f"totals: {len(graph.layers)} layers, {graph.parameter_count:,d} parameters, {graph.nbytes:,d} bytes, "
        f"{len(graph.edges)} edges"
    )


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Model file or folder (PyTorch, TorchScript, ONNX, safetensors).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON (one line per layer, edge, file and note).")
    ] = False,
) -> None:
    """Load a model without running anything in it and show its layers, edges and the loader's notes."""
    with _few_collections():
        graph, files = _load_and_hash(model)
        if as_json:
            _write_lines(json_lines(_description(model, graph, files, lazy=True)))
        else:
            _print_inspection(graph, files)
        del graph  # freed here, so that the collector's first pass at its usual thresholds does not scan it all


def list_plugins() -> list[dict[str, Any]]:
    """Every loaded plugin: name, origin, hooks it implements, components it registered."""
    from auditor.plugin_manager import KINDS, get_plugin_manager, plugin_origin, registered

    pm = get_plugin_manager()
    supplied: dict[str, dict[str, list[str]]] = {}
    options: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind in KINDS:
        for cid, reg in registered(kind).items():
            supplied.setdefault(reg.plugin, {}).setdefault(kind, []).append(cid)
            if reg.component.params:
                options.setdefault(reg.plugin, {})[f"{kind}/{cid}"] = [_param_row(p) for p in reg.component.params]
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append(
            {"name": name, "origin": plugin_origin(name), "hooks": hooks, "registers": supplied.get(name, {}),
             "options": options.get(name, {})}
        )  # fmt: skip
    return rows


def _param_row(p: Any) -> dict[str, Any]:
    from auditor.jsondata import jsonable

    return {"name": p.name, "default": jsonable(p.default), "expects": p.expected(), "help": p.help,
            "aliases": list(p.aliases)}  # fmt: skip


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the loaded plugins, their hooks and where they came from."""
    rows = list_plugins()
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        out.print(f"[bold]{shown(row['name'])}[/bold]  ({shown(row['origin'])})")
        out.print(f"  hooks: {', '.join(row['hooks']) or '-'}")
        for kind, ids in row["registers"].items():
            out.print(shown(f"  {kind}: {', '.join(ids)}"))
        for component, params in row["options"].items():
            if component.startswith("detectors/"):  # audit options; the rest: --json, or the command's --help
                for p in params:
                    name = f"{component.split('/', 1)[1]}.{p['name']}"
                    out.print(shown(f"  option {name} = {p['default']!r}: {p['help']} ({p['expects']})"))


def audit_model(
    *, suspect: Path, bundles: Sequence[Path] = (), options: Mapping[str, Any] | Sequence[str] = ()
) -> dict[str, Any]:
    """Load the owner bundles and ``suspect`` safely, run every applicable detector, and return the
    report data (unsealed; see :mod:`auditor.report.document`). ``options`` sets detector options
    (``{"DETECTOR.NAME": value}`` or ``["DETECTOR.NAME=VALUE"]``)."""
    from auditor.audit.pipeline import audit_suspect, load_inputs
    from auditor.report.document import build_report, run_block

    inputs = load_inputs(bundles=bundles, reference=None, options=options)
    record = audit_suspect(suspect, inputs)
    return build_report(record, inputs=inputs, run=run_block(), command=inputs.command(suspect))


@app.command()
def audit(  # noqa: PLR0917 (typer passes options positionally)
    suspects: Annotated[
        list[Path],
        typer.Argument(
            help="Suspect model files or folders; a folder that is not itself a model stands for the files in it.",
            show_default=False,
        ),
    ],
    bundle: Annotated[
        list[Path] | None, typer.Option("--bundle", help="Owner bundle to check the suspect against (repeatable).")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="The owner's released model: restorers align the suspect with it first."),
    ] = None,
    case_id: Annotated[str, typer.Option("--case-id", help="Case identifier printed in the report.")] = "",
    analyst: Annotated[str, typer.Option("--analyst", help="Analyst's name printed in the report.")] = "",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write the HTML report to this file (its JSON twin goes next to it, .json); with several"
            " suspects, a folder for a report each plus summary.html and summary.json.",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Write the sealed JSON twin here (one suspect).", dir_okay=False)
    ] = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="PEM private key to sign the report with.", dir_okay=False)
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option("--passphrase-file", help="Read the signing key's passphrase from this file's first line."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-O",
            help="A detector option, DETECTOR.NAME=VALUE (repeatable; `auditor plugins` lists each detector's"
            " options). Validated before anything is read, and recorded in the report's reproducible command.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report (several suspects: the summary) as JSON.")
    ] = False,
    control: Annotated[
        list[Path] | None,
        typer.Option(
            "--control",
            help="A negative control: a model known to be independent of the owner's, audited in the same run"
            " with the same bundles, reference and options (repeatable). Its numbers are shown beside the"
            " suspect's; it never changes the suspect's verdict or exit code.",
        ),
    ] = None,
    calibration: Annotated[
        list[Path] | None,
        typer.Option(
            "--calibration",
            help="A calibration file from `auditor calibrate` (repeatable): the report shows its measured"
            " false-positive rate beside the exact tail bound. Without it, a detector's shipped calibration for"
            " the bundle's architecture applies where there is one.",
        ),
    ] = None,
    attest: Annotated[
        bool,
        typer.Option(
            "--attest",
            help="Also write the report as an in-toto attestation (REPORT.intoto.jsonl beside the JSON twin: a"
            " Statement binding every input file and the report, in a DSSE envelope signed with --sign-key).",
        ),
    ] = False,
    model_signer_key: Annotated[
        Path | None,
        typer.Option(
            "--model-signer-key",
            help="PEM public key (elliptic curve) to verify an OpenSSF model-signing signature (model.sig or"
            " FILE.sig) that came with the suspect or reference; the result is in the report.",
            dir_okay=False,
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="Several suspects: where each is audited, 'local' (a process pool, -j) or 'ray' (a Ray cluster;"
            " pip install 'auditor[ray]').",
        ),
    ] = "local",
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", help="Local engine: worker processes (default: the CPU cores).", min=1),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray engine: 'auto' or ray://HOST:PORT (default: a local Ray instance)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Several suspects: the result cache (SQLite; default ~/.cache/auditor/results.sqlite); a re-run"
            " skips what is done, an interrupted run resumes.",
            dir_okay=False,
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the result cache.")] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Audit every suspect again and store the new results in the cache.")
    ] = False,
) -> None:
    """Check suspect models against owners' bundles; print one line per finding and write the evidence report.

    Exit code 0: watermark found; 1: not found; 3: inconclusive (also when no
    bundle was given); 4/5: the suspect or a bundle could not be read safely.
    With several suspects: the most serious outcome over all files (see the README);
    130 when interrupted (the result cache keeps what was done)."""
    from auditor.cli.audit import run_audit

    with _few_collections():  # a suspect of 200,000 tensors: see inspect
        code = run_audit(
            suspects=suspects, bundles=bundle or [], reference=reference, case_id=case_id, analyst=analyst, out=out,
            json_out=json_out, sign_key=sign_key, passphrase_file=passphrase_file, options=option or [],
            as_json=as_json, console=out_console, controls=control or [], calibrations=calibration or [],
            attest=attest, model_signer_key=model_signer_key, engine=engine, jobs=jobs, ray_address=ray_address,
            cache=cache, no_cache=no_cache, refresh=refresh,
        )  # fmt: skip
    raise typer.Exit(code)


def _command_names(typer_app: typer.Typer) -> list[str]:
    names = [
        c.name or (c.callback.__name__.replace("_", "-") if c.callback else "") for c in typer_app.registered_commands
    ]
    names += [g.name or "" for g in typer_app.registered_groups]
    return names


def _add_plugin_commands() -> None:
    from auditor.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    for impl in sorted(pm.hook.register_commands.get_hookimpls(), key=lambda i: i.plugin_name):
        commands, groups = len(app.registered_commands), len(app.registered_groups)
        impl.function(app=app)
        seen: set[str] = set()
        for name in _command_names(app):
            if name in seen:
                # Take out everything this plugin added, so the built-in stays the one that runs.
                del app.registered_commands[commands:]
                del app.registered_groups[groups:]
                raise PluginError(f"plugin {impl.plugin_name!r} adds command {name!r}, which already exists")
            seen.add(name)


_plugins_added = False


def _detector_params() -> list[tuple[str, Any]]:
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    return [(d.id, p) for d in components("detectors", Detector) for p in d.params]


def _audit_argv(argv: list[str]) -> list[str]:
    """``argv`` with the detectors' documented aliases (``--p-threshold X``) spelled as ``--option ID.NAME=X``,
    and the detector options listed under ``auditor audit --help``."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command != "audit":
        return argv
    params = _detector_params()
    aliases = {alias: f"{did}.{p.name}" for did, p in params for alias in p.aliases}
    lines = [
        f"{did}.{p.name}: {p.help} ({p.expected()}; default {p.default!r}"
        + (f"; alias {', '.join(p.aliases)}" if p.aliases else "") + ")"
        for did, p in params
    ]  # fmt: skip
    for info in app.registered_commands:
        if (info.name or (info.callback.__name__ if info.callback else "")) == "audit":
            info.epilog = "Detector options (--option DETECTOR.NAME=VALUE):\n\n" + "\n\n".join(lines)
    out_args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in aliases and eq:
            out_args += ["--option", f"{aliases[name]}={value}"]
        elif arg in aliases and i + 1 < len(argv):
            out_args += ["--option", f"{aliases[arg]}={argv[i + 1]}"]
            i += 1
        else:
            out_args.append(arg)
        i += 1
    return out_args


def _prehash(args: Sequence[str]) -> None:
    """Start hashing the model ``auditor inspect`` or a one-suspect ``auditor audit`` names, before the plugins
    load and the command line is parsed: reading every byte is most of such a command's time, and the rest
    (plugins, torch, the load) overlaps it (:func:`auditor.audit.load.prehash`). A guess from the words alone:
    the one argument that is neither an option nor an option's value (an option the command does not declare,
    a detector's alias, is taken to have one). The load of that file takes the hash over; a wrong guess only
    costs a hash that :func:`~auditor.audit.load.stop_prehashing` stops; the parser still decides everything."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in {"audit", "inspect"}:
        return
    from typer.main import get_command

    declared = get_command(app).commands[command].params  # type: ignore[attr-defined]
    flags = {o for p in declared if getattr(p, "is_flag", False) or getattr(p, "count", False) for o in p.opts}
    rest = args[args.index(command) + 1 :]
    named: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            named += rest[i + 1 :]
            break
        if word.startswith("-") and len(word) > 1:
            i += 0 if "=" in word or word in flags else 1  # skip its value
        else:
            named.append(word)
        i += 1
    if len(named) == 1:
        from auditor.audit.load import prehash

        prehash(Path(named[0]))


def _click_error(exc: Exception) -> int | None:
    """The exit code for an error of the command-line parser (click's, or the copy typer ships), after printing
    it as one line; ``None`` for any other exception. A group given alone prints its help instead."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "ClickException" not in names and "Abort" not in names:
        return None
    if "Abort" in names:
        err.print("interrupted", markup=False)
        return 130
    ctx = getattr(exc, "ctx", None)
    if "NoArgsIsHelpError" in names and ctx is not None:
        typer.echo(ctx.get_help())
        return EXIT_USAGE
    message = str(exc.format_message()).strip().replace("\n", " ")  # type: ignore[attr-defined]
    if "UsageError" in names:
        where = ctx.command_path if ctx is not None else "auditor"
        err.print(shown(f"error: {message} (see `{where} --help`)"))
        return EXIT_USAGE
    err.print(shown(f"error: {message}"))
    return int(getattr(exc, "exit_code", EXIT_USAGE))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``auditor`` script: run the CLI, turning errors into exit codes.

    Every error is one line on standard error: a usage error (unknown option, missing argument, a value of the
    wrong kind) exits 2, the others with the code documented for their kind."""
    global _plugins_added
    from auditor.cli import console

    debug = os.environ.get("AUDITOR_DEBUG") == "1"
    console.verbosity = 0
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _prehash(args)
        if not _plugins_added:
            _plugins_added = True
            _add_plugin_commands()
        code = app(args=_audit_argv(args), prog_name="auditor", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except AuditorError as exc:
        if debug:
            raise
        err.print(f"error: {shown(exc)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # a parser error (one line, exit 2), or a bug: one line, and the way to see more
        code = _click_error(exc)
        if code is not None:
            sys.exit(code)
        if debug:
            raise
        err.print(
            f"internal error: {type(exc).__name__}: {shown(exc)} "
            "(a bug in auditor; set AUDITOR_DEBUG=1 for the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
    finally:
        from auditor.audit.load import stop_prehashing

        stop_prehashing()
        if argv is None:  # the process ends here (the script, python -m auditor): its last collections need
            gc.freeze()  # not walk torch's objects (0.3 s of every audit's exit), all freed with the process
