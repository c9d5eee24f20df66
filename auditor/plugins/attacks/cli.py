"""``auditor attack`` and ``auditor evaluate``, added through the ``register_commands`` hook."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from auditor import hookimpl
from auditor.bases import Attack
from auditor.errors import UsageError
from auditor.toolkit import options as opt

__all__ = ["attack_catalogue", "parse_params", "register_commands"]


def attack_catalogue() -> list[dict[str, Any]]:
    """Every registered attack: id, whether it keeps the function, description, options with defaults."""
    from auditor.plugin_manager import registered

    rows = []
    for aid, reg in registered("attacks").items():
        attack = reg.component
        assert isinstance(attack, Attack)  # the registry checked it
        all_params = getattr(attack, "all_params", None)
        params = all_params() if callable(all_params) else ()
        rows.append({
            "id": aid, "function_preserving": attack.function_preserving, "description": attack.description,
            "paper": getattr(attack, "paper", ""), "plugin": reg.plugin,
            "options": [{"name": p.name, "default": p.default, "help": p.help, "choices": list(p.choices)}
                        for p in params],
        })  # fmt: skip
    return rows


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """``["rate=0.3", "scope=layer"]`` as a dict; UsageError for an item without ``=``."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes KEY=VALUE, not {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _print_catalogue(as_json: bool) -> None:
    from auditor.cli.console import emit_json, out, shown

    rows = attack_catalogue()
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        keeps = "  \\[function-preserving]" if row["function_preserving"] else ""
        out.print(f"[bold]{shown(row['id'])}[/bold]{keeps}  {shown(row['description'])}")
        if row["paper"]:
            out.print(f"    measured in: {shown(row['paper'])}")
        own = [o for o in row["options"] if o["name"] not in ("seed", "overwrite", "model_factory")]
        for o in own:
            out.print(shown(f"    {o['name']}={o['default']}  {o['help']}"))
    out.print("every attack also takes seed=0, overwrite=false and model_factory=module:function")


def attack(  # noqa: PLR0917 (typer passes options positionally)
    name: Annotated[str | None, typer.Argument(help="The attack (see --list).", show_default=False)] = None,
    model: Annotated[
        Path | None, typer.Argument(help="Model file or folder to attack; it is never changed.", show_default=False)
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="The attacked model to write: .safetensors, .pt (a state dict) or .onnx."),
    ] = None,
    list_attacks: Annotated[bool, typer.Option("--list", help="List the attacks and their options.")] = False,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="An attack option as KEY=VALUE (repeatable; --list shows each attack's)."),
    ] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Shortcut for -p rate=R (pruning).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Shortcut for -p epochs=N (training).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Shortcut for -p lr=F (training).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the attack's random choices.")] = None,
    model_factory: opt.ModelFactory = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    as_json: opt.Json = False,
) -> None:
    """Attack a model and write the result to a new file (the input is never changed); --list shows the attacks."""
    from auditor.cli.console import emit_json, out, shown
    from auditor.plugin_manager import registered

    if list_attacks:
        _print_catalogue(as_json)
        return
    if name is None or model is None or out_path is None:
        raise UsageError("usage: auditor attack NAME MODEL --out PATH [-p KEY=VALUE ...]; "
                         "`auditor attack --list` shows the attacks")  # fmt: skip
    attacks = registered("attacks")
    if name not in attacks:
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(attacks)}")
    options: dict[str, Any] = parse_params(param)
    shortcuts = {"rate": rate, "epochs": epochs, "lr": lr, "seed": seed, "model_factory": model_factory}
    options.update({k: v for k, v in shortcuts.items() if v is not None})
    if overwrite:
        options["overwrite"] = True
    chosen = attacks[name].component
    assert isinstance(chosen, Attack)  # the registry checked it
    summary = chosen.apply(model, out_path, options=options)
    if as_json:
        emit_json(summary)
        return
    out.print(f"wrote {shown(summary.get('out', out_path))} ({shown(name)}, {summary.get('seconds', 0):.1f} s)")
    for key, value in summary.items():
        if key not in ("attack", "input", "out", "seconds", "options"):
            out.print(shown(f"  {key}: {value}"))


def evaluate(  # noqa: PLR0917
    bundle: Annotated[list[Path], typer.Option("--bundle", help="Owner bundle (repeatable: one per scheme).")],
    model: Annotated[Path, typer.Option("--model", help="The watermarked model as released.")],
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference", help="The owner's reference model: every attacked model is also audited after restore."
        ),
    ] = None,
    attacks: Annotated[
        list[str] | None,
        typer.Option("--attacks", help="Only these attacks (repeatable or comma-separated; default: the whole grid)."),
    ] = None,
    grid: Annotated[str, typer.Option("--grid", help="full (the papers' strengths) or quick (a smoke test).")] = "full",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for state.json and the robustness table.")] = Path(
        "robustness"
    ),
    model_factory: opt.ModelFactory = None,
    data_factory: opt.DataFactory = None,
    seed: opt.Seed = 0,
    restart: Annotated[bool, typer.Option("--restart", help="Forget the progress saved in --out.")] = False,
    no_progress: opt.NoProgress = False,
    as_json: opt.Json = False,
    engine: Annotated[
        str | None,
        typer.Option("--engine", help="Run the cells as tasks: 'local' (a process pool, -j) or 'ray' (a Ray cluster;"
                     " cells that train ask for a GPU where it has one). Default: one after the other here."),
    ] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Local engine: worker processes.", min=1)] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray engine: 'auto' or ray://HOST:PORT (default: local).")
    ] = None,
) -> None:
    """Attack the model across a grid of attacks and strengths and audit each result; resumable.

    Exit code 0 when every cell ran, 3 when any failed (each is printed with its reason on stderr)."""
    from auditor.audit.engine import Engine
    from auditor.cli.console import emit_json, err, out, shown
    from auditor.errors import EXIT_INCONCLUSIVE
    from auditor.plugins.attacks.evaluate import evaluate_model, failures
    from auditor.plugins.attacks.render import summary

    chosen = [a.strip() for item in attacks or [] for a in item.split(",") if a.strip()]
    on = Engine(engine, jobs, ray_address) if engine is not None else None
    results = evaluate_model(model=model, bundles=bundle, out_dir=out_dir, reference=reference, attacks=chosen,
                             grid=grid, model_factory=model_factory, data_factory=data_factory, seed=seed,
                             restart=restart, progress=not no_progress, engine=on)  # fmt: skip
    failed = failures(results)
    if as_json:
        emit_json({k: v for k, v in results.items() if k != "cells"} | {"summary": summary(results)}
                  | {"failed": [{"cell": label, "reason": why} for label, why in failed]})  # fmt: skip
    else:
        for line in summary(results):
            out.print(shown(line))
        for kind, path in results["files"].items():
            out.print(f"wrote {shown(path)} ({kind})")
    for label, why in failed:
        err.print(shown(f"error: cell {label}: {why}"))
    if failed:
        err.print(f"{len(failed)} of {len(results['cells'])} cells failed (exit {EXIT_INCONCLUSIVE})")
        raise typer.Exit(EXIT_INCONCLUSIVE)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """Add ``auditor attack`` and ``auditor evaluate``."""
    names = {c.name for c in app.registered_commands}
    if "attack" in names:
        return  # already added (the CLI was started twice in one process)
    app.command("attack")(attack)
    app.command("evaluate")(evaluate)
