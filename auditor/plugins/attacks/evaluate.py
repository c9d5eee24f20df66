"""``auditor evaluate``: one watermarked model through the attack grid, audited after every attack.

Per cell: the attack writes the attacked model to a temporary file, which
goes through the audit pipeline of ``auditor audit``
(:func:`~auditor.audit.pipeline.audit_suspect`): every detector on the file as
it is (``direct``) and, with a reference model, again after the restore stage
(``restored``); its accuracy is measured on the test split of ``data_factory`` (the owner's data)
or of the bundled digits when it can be run; attacks that train are given
the same factory (the thief's data is the owner's train split). Each
finished cell is written at once to ``state.json`` in the output folder, so an
interrupted run picks up where it stopped; ``robustness.json``, ``.md`` and
``.html`` are written at the end (:mod:`.render`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from auditor.bases import Attack
from auditor.errors import AuditorError, NotApplicableError, UsageError
from auditor.findings import Finding
from auditor.plugins.attacks.grid import BASELINE, Cell, full_grid, quick_grid, select

__all__ = ["STATE_FILE", "cell_task", "evaluate_model", "failures", "finding_row"]

STATE_FILE = "state.json"
STATE_VERSION = 1


def finding_row(f: Finding) -> dict[str, Any]:
    """What the table shows of one finding: verdict, the detector's own measure and its p-value, as the
    detector declares them (:attr:`auditor.bases.Detector.measure`, ``p_metric``, ``table_metrics``)."""
    from auditor.bases import Detector
    from auditor.plugin_manager import registered

    m = f.metrics
    row: dict[str, Any] = {"detector": f.detector, "scheme": f.scheme, "verdict": f.verdict.value}
    reg = registered("detectors").get(f.detector)
    d = reg.component if reg is not None and isinstance(reg.component, Detector) else None
    key, words = d.measure if d is not None else ("", "")
    row.update(
        measure=words, value=m.get(key) if key else None, log10_p=m.get(d.p_metric) if d and d.p_metric else None
    )
    if d is not None:
        row.update({name: m.get(metric) for name, metric in d.table_metrics.items()})
    if f.verdict.value in ("inconclusive", "error"):
        row["why"] = f.summary
    return row


def failures(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(cell label, reason)`` for every cell of ``results`` that failed: the attack or the audit
    raised (``status`` error), or a detector ended in an error finding on it. ``auditor evaluate``
    prints each and exits non-zero when there is any."""
    found = []
    for cell in results["cells"]:
        if cell.get("status") == "error":
            found.append((str(cell["label"]), str(cell.get("error", "failed"))))
            continue
        for which in ("direct", "restored"):
            for row in cell.get(which) or []:
                if row.get("verdict") == "error":
                    found.append((str(cell["label"]), f"{row['detector']} ({which}): {row.get('why', 'error')}"))
    return found


def _sha256(path: Path) -> str:
    from auditor.safeio import sha256_file

    return sha256_file(path) if path.is_file() else f"folder:{path.resolve()}"


def _write_json(path: Path, data: Any) -> None:
    from auditor.safeio import write_atomically

    write_atomically(path, (json.dumps(data, indent=1, sort_keys=False, default=str) + "\n").encode())


class _Context:
    """What every cell needs, loaded once: the audit's inputs (as ``auditor audit`` loads them) and the test data."""

    def __init__(
        self,
        model: Path,
        bundles: Sequence[Path],
        reference: Path | None,
        model_factory: str | None,
        data_factory: str | None = None,
    ):
        from auditor.audit.pipeline import load_inputs
        from auditor.toolkit import data as datasets
        from auditor.toolkit.modelio import predictor

        self.model, self.model_factory, self.data_factory = model, model_factory, data_factory
        self.inputs = load_inputs(bundles=[Path(b) for b in bundles], reference=reference)
        # The same inputs without the reference: the detectors on the attacked file as it is.
        self.direct = dataclasses.replace(self.inputs, reference=None)
        by_path = {b.path: b for b in self.inputs.bundles}
        self.bundles = [by_path[Path(b)] for b in bundles]  # in the order given
        self.test = datasets.owner_dataset(data_factory).test
        inputs = self.test.tensors[0]
        #: One example's shape and dtype, from the data: what every attack traces and exports the model on.
        self.probe = (tuple(inputs.shape[1:]), inputs.dtype)
        self._check_probe(model_factory, data_factory)
        run = predictor(model, model_factory=model_factory)
        self.original = run(inputs) if run is not None else None

    def _check_probe(self, model_factory: str | None, data_factory: str | None) -> None:
        """Refuse a model that declares an input other than the test data's (a factory given without
        its data would otherwise be fed digits)."""
        from auditor.toolkit import models as zoo
        from auditor.toolkit.data import load_factory

        if not model_factory:
            return
        with torch.random.fork_rng(devices=[]):  # building the model must not move anyone's random draws
            module = load_factory(model_factory)()
        declared = zoo.declared_input(module) if isinstance(module, torch.nn.Module) else None
        if declared is not None and declared != self.probe:
            data = data_factory or "the bundled digits"
            raise UsageError(
                f"the model factory's model takes inputs of shape {list(declared[0])} ({declared[1]}) but the test "
                f"data ({data}) has {list(self.probe[0])} ({self.probe[1]}); name your data with --data-factory"
            )

    def audit(self, path: Path) -> dict[str, Any]:
        """Accuracy, change of outputs, and the detectors' rows before and after restore."""
        from auditor.audit.pipeline import audit_suspect
        from auditor.toolkit.modelio import predictor

        result: dict[str, Any] = {"accuracy": None, "max_output_change": None}
        run = predictor(path, model_factory=self.model_factory)
        if run is not None:
            logits = run(self.test.tensors[0])
            result["accuracy"] = float((logits.argmax(1) == self.test.tensors[1]).float().mean())
            if self.original is not None and logits.shape == self.original.shape:
                result["max_output_change"] = float((logits - self.original).abs().max())
        result["direct"] = [finding_row(f) for f in audit_suspect(path, self.direct).findings]
        if self.inputs.reference is not None:
            record = audit_suspect(path, self.inputs)
            result["restore"] = [
                {"restorer": e["restorer"], "status": e["status"], "acted": bool(e.get("log", {}).get("acted")),
                 "reason": e.get("log", {}).get("reason", e.get("error", ""))} for e in record.restore
            ]  # fmt: skip
            result["restored"] = [finding_row(f) for f in record.findings]
        return result


def _run_cell(cell: Cell, ctx: _Context, work: Path, seed: int) -> dict[str, Any]:
    from auditor.plugin_manager import registered

    record: dict[str, Any] = {
        "key": cell.key, "attack": cell.attack, "label": cell.label, "group": cell.group,
        "options": dict(cell.options), "series": cell.series, "strength": cell.strength,
    }  # fmt: skip
    started = time.perf_counter()
    target = ctx.model
    try:
        if cell.attack != BASELINE:
            attack = registered("attacks")[cell.attack].component
            assert isinstance(attack, Attack)  # the registry checked it
            record["function_preserving"] = attack.function_preserving
            target = work / f"attacked{cell.suffix}"
            options = {"seed": seed, **cell.options, "overwrite": True}
            if ctx.model_factory:
                options["model_factory"] = ctx.model_factory
            if ctx.data_factory and any(p.name == "data_factory" for p in getattr(attack, "params", ())):
                options["data_factory"] = ctx.data_factory
            summary = attack.apply(ctx.model, target, options=options)
            record["summary"] = {k: v for k, v in summary.items() if k not in ("input", "out", "attack", "options")}
        record.update(ctx.audit(target), status="ok")
    except NotApplicableError as exc:  # the model has nothing the attack edits: no result, and no failure
        record.update(status="n/a", why=str(exc))
    except AuditorError as exc:
        record.update(status="error", error=str(exc))
    except Exception as exc:  # one broken cell must not lose the evaluation
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
    finally:
        if target != ctx.model:
            target.unlink(missing_ok=True)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _load_state(path: Path, identity: Mapping[str, Any], restart: bool) -> dict[str, Any]:
    if path.exists() and not restart:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{path}: the saved progress cannot be read; rerun with --restart") from None
        if state.get("identity") != identity:
            raise UsageError(f"{path.parent} holds an evaluation of other inputs or settings; use another --out "
                             "or --restart")  # fmt: skip
        return state
    return {"version": STATE_VERSION, "identity": dict(identity), "cells": {}}


def evaluate_model(
    *,
    model: Path,
    bundles: Sequence[Path],
    out_dir: Path,
    reference: Path | None = None,
    attacks: list[str] | None = None,
    grid: str = "full",
    model_factory: str | None = None,
    data_factory: str | None = None,
    seed: int = 0,
    restart: bool = False,
    progress: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Run the grid (``full`` or ``quick``, limited to ``attacks``) on ``model``; return the results
    and write them under ``out_dir`` (see the module docstring). Cells already in ``out_dir``'s
    state for the same inputs are not run again; ``restart`` starts afresh. With ``engine`` (an
    :class:`auditor.audit.engine.Engine`) each cell is a task on it (:func:`cell_task`)."""
    from auditor.plugin_manager import registered
    from auditor.plugins.attacks.render import write_outputs

    if not bundles:
        raise UsageError("name at least one owner bundle (--bundle)")
    if grid not in ("full", "quick"):
        raise UsageError(f"unknown grid {grid!r}; full or quick")
    model, out_dir = Path(model), Path(out_dir)
    ctx = _Context(model, bundles, reference, model_factory, data_factory)
    by_scheme: dict[str, str] = {}
    for p, b in zip(bundles, ctx.bundles, strict=True):
        by_scheme.setdefault(b.scheme, str(Path(p).resolve()))
    cells = select((full_grid if grid == "full" else quick_grid)(bundles=by_scheme), attacks, registered("attacks"))
    identity = {
        "model_sha256": _sha256(model), "bundles_sha256": sorted(b.sha256 for b in ctx.bundles),
        "reference_sha256": _sha256(reference) if reference is not None else None, "seed": seed,
        "model_factory": model_factory, "data_factory": data_factory,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    state = _load_state(state_path, identity, restart)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    todo = [c for c in cells if c.key not in state["cells"]]
    started = time.perf_counter()
    from auditor.toolkit.models import probe_input

    with _progress(progress, len(cells), len(cells) - len(todo)) as advance, probe_input(*ctx.probe):
        done = _on_engine(engine, todo, model=model, bundles=bundles, reference=reference, work=work, seed=seed,
                          factories=(model_factory, data_factory))  # fmt: skip
        for cell, finished in done if done is not None else ((c, None) for c in todo):
            record = finished
            if record is None:
                advance(cell.label, 0)
                with _threads(1):
                    record = _run_cell(cell, ctx, work, seed)
            state["cells"][cell.key] = record
            _write_json(state_path, state)
            if on_cell is not None:
                on_cell(record)
            advance(cell.label, 1)
    shutil.rmtree(work, ignore_errors=True)
    results = {
        "model": str(model), "reference": str(reference) if reference else None,
        "bundles": [{"path": str(p), "scheme": b.scheme, "sha256": b.sha256} for p, b in zip(bundles, ctx.bundles,
                                                                                              strict=True)],
        "identity": identity, "grid": grid, "seconds_this_run": round(time.perf_counter() - started, 1),
        "cells": [state["cells"][c.key] for c in cells], "torch_threads": 1,
    }  # fmt: skip
    results["files"] = {k: str(v) for k, v in write_outputs(results, out_dir).items()}
    return results


class _threads:
    """Small models run several times faster on one thread of a shared machine."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


class _progress:
    def __init__(self, show: bool, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[cell]}"))  # fmt: skip
        self.bar = Progress(*columns, console=Console(stderr=True), disable=not show)
        self.task = self.bar.add_task("evaluate", total=total, completed=done, cell="")

    def __enter__(self) -> Callable[[str, int], None]:
        self.bar.__enter__()
        return lambda label, step: self.bar.update(self.task, advance=step, cell=label)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


# --------------------------------------------------------------------------- cells as engine tasks

#: A worker's context (inputs, test data, the original's outputs), loaded once per worker process.
_CONTEXTS: dict[str, _Context] = {}


def cell_task(job: Mapping[str, Any]) -> str:
    """One grid cell as an engine's worker runs it (``job``: plain data, the context's paths and the cell);
    the cell's record as JSON text."""
    from auditor.toolkit.models import probe_input

    spec = job["context"]
    key = json.dumps(spec, sort_keys=True)
    if key not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[key] = _Context(Path(spec["model"]), [Path(b) for b in spec["bundles"]],
                                  Path(spec["reference"]) if spec["reference"] else None, spec["model_factory"],
                                  spec["data_factory"])  # fmt: skip
    ctx = _CONTEXTS[key]
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    with probe_input(*ctx.probe), _threads(1):
        record = _run_cell(Cell(**job["cell"]), ctx, work, int(job["seed"]))
    return json.dumps(record, default=str)


def _on_engine(
    engine: Any, todo: Sequence[Cell], *, model: Path, bundles: Sequence[Path], reference: Path | None,
    work: Path, seed: int, factories: tuple[str | None, str | None],
) -> Any:  # fmt: skip
    """``(cell, record)`` as the cells of ``todo`` complete on ``engine`` (``None`` without one). A cell whose
    attack trains (it takes ``epochs``) asks Ray for a GPU where the cluster has one."""
    if engine is None:
        return None
    from functools import cache

    from auditor.audit.engine import TaskFailed, cluster_has_gpu, run_tasks
    from auditor.plugin_manager import registered

    context = {"model": str(model.absolute()), "bundles": [str(Path(b).absolute()) for b in bundles],
               "reference": str(Path(reference).absolute()) if reference else None,
               "model_factory": factories[0], "data_factory": factories[1]}  # fmt: skip
    attacks = registered("attacks")

    def trains(cell: Cell) -> bool:
        attack = attacks[cell.attack].component if cell.attack in attacks else None
        return any(p.name == "epochs" for p in getattr(attack, "params", ()))

    jobs = [{"context": context, "cell": dataclasses.asdict(c) | {"options": dict(c.options)}, "seed": seed,
             "work": str((work / f"cell-{i}").absolute()), "trains": trains(c)}
            for i, c in enumerate(todo)]  # fmt: skip
    gpu = cache(cluster_has_gpu) if engine.name == "ray" else (lambda: False)

    def results() -> Any:
        for i, text in run_tasks(cell_task, jobs, engine=engine,
                                 resources=lambda job: {"num_gpus": 1} if job["trains"] and gpu() else {}):  # fmt: skip
            if isinstance(text, TaskFailed):
                cell = todo[i]
                yield cell, {"key": cell.key, "attack": cell.attack, "label": cell.label, "group": cell.group,
                             "options": dict(cell.options), "series": cell.series, "strength": cell.strength,
                             "status": "error", "error": text.message}  # fmt: skip
            else:
                yield todo[i], json.loads(text)

    return results()
