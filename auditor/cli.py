"""The ``auditor`` command line: thin commands over keyword-only core functions.

Errors a user can cause end as ``error: <one line>`` on stderr and the exit
code documented in the README (:mod:`auditor.errors`); never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from auditor import __version__
from auditor.cli_keys import keys_app
from auditor.errors import (
    EXIT_INCONCLUSIVE,
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    AuditorError,
    PluginError,
    UsageError,
)
from auditor.findings import Verdict

app = typer.Typer(
    name="auditor",
    help="Forensic auditing of watermarked deep-learning models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
#: ``auditor embed NAME``: embedder plugins add their command here from ``register_commands``.
embed_app = typer.Typer(help="Train an owner's model with a watermark.", no_args_is_help=True)
app.add_typer(embed_app, name="embed")
app.add_typer(keys_app, name="keys")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"auditor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Forensic auditing of watermarked deep-learning models."""


def shown(text: object) -> str:
    """``text`` made safe for the terminal: control characters escaped (a hostile
    file's names must not move the cursor or recolour the screen) and rich
    markup neutralised."""
    s = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return escape(s)


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def hash_files(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of each file, with a progress bar on a terminal for large ones."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from auditor.hashing import sha256_file

    sizes = [p.stat().st_size for p in paths]
    show = err.is_terminal and sum(sizes) > 256 << 20
    with Progress(
        TextColumn("hashing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not show,
    ) as progress:
        task = progress.add_task("hashing", total=sum(sizes))
        return [
            {"path": str(p), "size": size, "sha256": sha256_file(p, progress=lambda n: progress.advance(task, n))}
            for p, size in zip(paths, sizes, strict=True)
        ]


def inspect_model(*, path: Path) -> dict[str, Any]:
    """Load ``path`` safely and describe it: format, file hashes, layers, edges, totals."""
    from auditor.loading import load_model

    graph = load_model(path)
    files = hash_files(graph.files)
    description = graph.describe()
    description["files"] = files
    description["sha256"] = files[0]["sha256"] if path.is_file() and files else None
    return description


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Model file or folder (PyTorch, TorchScript, ONNX, safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Load a model without running anything in it and show its layers."""
    info = inspect_model(path=model)
    if as_json:
        _emit_json(info)
        return
    out.print(f"[bold]{shown(info['path'])}[/bold]  format: {shown(info['format'])}")
    for f in info["files"]:
        out.print(f"  {f['sha256']}  {f['size']:>12,d} B  {shown(f['path'])}")
    table = Table("#", "layer", "kind", "shape", "dtype", "parameters", box=None, pad_edge=False)
    for i, layer in enumerate(info["layers"]):
        w = layer["params"].get("weight") or next(iter(layer["params"].values()), None)
        shape = "x".join(map(str, w["shape"])) if w else "-"
        dtype = w["dtype"] + (" (quantized)" if w and w["quantized"] else "") if w else "-"
        table.add_row(str(i), shown(layer["name"]), layer["kind"], shape, shown(dtype), f"{layer['parameters']:,d}")
    out.print(table)
    out.print(f"edges ({info['edge_source']}):")
    for e in info["edges"]:
        via = " -> ".join(e["via"]) if e["via"] else "direct"
        offset = f"  offset {e['offset']}" if e["offset"] else ""
        out.print(shown(f"  {e['src']} -> {e['dst']}  via {via}{offset}"))
    for note in info["notes"]:
        out.print(shown(f"note: {note}"))
    t = info["totals"]
    out.print(
        f"totals: {t['layers']} layers, {t['parameters']:,d} parameters, {t['bytes']:,d} bytes, {t['edges']} edges"
    )


def list_plugins() -> list[dict[str, Any]]:
    """Every loaded plugin: name, origin, hooks it implements, components it registered."""
    from auditor.plugin_manager import KINDS, get_plugin_manager, plugin_origin, registered

    pm = get_plugin_manager()
    supplied: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for cid, reg in registered(kind).items():
            supplied.setdefault(reg.plugin, {}).setdefault(kind, []).append(cid)
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append(
            {"name": name, "origin": plugin_origin(name), "hooks": hooks, "registers": supplied.get(name, {})}
        )
    return rows


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the loaded plugins, their hooks and where they came from."""
    rows = list_plugins()
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        out.print(f"[bold]{shown(row['name'])}[/bold]  ({shown(row['origin'])})")
        out.print(f"  hooks: {', '.join(row['hooks']) or '-'}")
        for kind, ids in row["registers"].items():
            out.print(shown(f"  {kind}: {', '.join(ids)}"))


def audit_model(
    *, suspect: Path, bundles: Sequence[Path] = (), context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load the owner bundles and ``suspect`` safely and run every applicable detector."""
    from auditor.bundle import load_bundle
    from auditor.detection import overall_verdict, run_detectors
    from auditor.loading import load_model

    loaded = [load_bundle(p) for p in bundles]
    graph = load_model(suspect)
    findings = run_detectors(graph, bundles=loaded, context=context)
    return {
        "suspect": {"path": str(suspect), "format": graph.format, "files": hash_files(graph.files)},
        "bundles": [{"path": str(b.path), "scheme": b.scheme, "sha256": b.sha256} for b in loaded],
        "verdict": overall_verdict(findings).value,
        "findings": [f.to_dict() for f in findings],
    }


_EXIT_FOR_VERDICT = {
    Verdict.DETECTED.value: EXIT_OK,
    Verdict.NOT_DETECTED.value: EXIT_NOT_FOUND,
    Verdict.INCONCLUSIVE.value: EXIT_INCONCLUSIVE,
}


@app.command()
def audit(
    suspect: Annotated[Path, typer.Argument(help="Suspect model file or folder.")],
    bundle: Annotated[
        list[Path] | None, typer.Option("--bundle", help="Owner bundle to check the suspect against (repeatable).")
    ] = None,
    p_threshold: Annotated[
        float, typer.Option(help="Greedy Residuals: combined p-value below which the watermark counts as found.")
    ] = 1e-6,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Check a suspect model against owners' bundles and print one verdict per finding.

    Exit code 0: watermark found; 1: not found; 3: inconclusive (also when no
    bundle was given); 4/5: the suspect or a bundle could not be read safely."""
    if not 0.0 < p_threshold < 1.0:
        raise UsageError(f"--p-threshold must be between 0 and 1, not {p_threshold}")
    result = audit_model(
        suspect=suspect, bundles=bundle or [], context={"greedy_residuals.p_threshold": p_threshold}
    )
    if as_json:
        _emit_json(result)
    else:
        for f in result["findings"]:
            out.print(shown(f"{f['detector']}: {f['verdict']}: {f['summary']}"))
        out.print(f"verdict: {result['verdict']}")
    raise typer.Exit(_EXIT_FOR_VERDICT[result["verdict"]])


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``auditor`` script: run the CLI, turning errors into exit codes."""
    global _plugins_added
    debug = os.environ.get("AUDITOR_DEBUG") == "1"
    try:
        if not _plugins_added:
            _plugins_added = True
            _add_plugin_commands()
        app(args=argv, prog_name="auditor", standalone_mode=True)
    except AuditorError as exc:
        if debug:
            raise
        err.print(f"error: {shown(exc)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # a bug: one line, and the way to see more
        if debug:
            raise
        err.print(
            f"internal error: {type(exc).__name__}: {shown(exc)} "
            "(a bug in auditor; set AUDITOR_DEBUG=1 for the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
