"""Restore v2's evidence (issue 13, items 4 and 5): structural edits undone, and innocent models never claimed.

Two commands::

    python scripts/restore_evidence.py evidence [--arch cnn resnet] [--out DIR] [--write-docs]
    python scripts/restore_evidence.py innocents [--arch cnn resnet lstm] [--models 20] [--write-docs]

``evidence`` trains each architecture's owner (both watermarks; the recipe of
scripts/robustness.py) and, for every structural edit among the registered
attacks (a missing one is reported as such), writes the stolen copy alone and
composed (permute -> scale -> bn-fold -> the edit), as safetensors and as ONNX
(the ONNX export is the last step), with the attack plugins themselves. Each
copy's largest logit change against the owner's model is measured where the
file runs (onnxruntime for ONNX, the recognised module for a state dict);
where it does not (a factored state dict fits no built-in architecture) the
bound is the last runnable step's change plus the edit's own check. The copy
is then audited as ``auditor audit --reference`` would (the pipeline's
load_inputs / audit_suspect), once without the reference (the copy as it is)
and once with it: the verdicts, Greedy Residuals' best rate against its release
rate, HufuNet's DiffAcc against tau, each restorer's guard score, what it did,
and its canonicalisation steps (every log entry beyond the common ones).

``innocents`` trains ``--models`` independent models per architecture (other
seeds, other shuffling and train/test split, no watermark), audits each
against the owner's bundles with the owner's model as the reference and every
registered restorer on, and reports the verdicts and each restorer's guard
score (min / median / max). Any claim is a failure (exit status 1).

``--json FILE`` writes the rows; ``--owner-epochs`` and ``--epochs`` shorten
training (the tests use both). Everything is seeded and runs on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import OWNER_RECIPES, machine, make_owner  # scripts/ is no package

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "restore.md"

#: The structural edits of issue 13 (item 1) by attack id, and the lossy one of item 2.
STRUCTURAL = (
    "factor-linear", "chain", "insert-identity", "bn-between", "invertible-map",
    "split-outputs", "split-inputs", "neuron-clique", "neuron-split",
)  # fmt: skip
LOSSY = ("quantize-dynamic",)
#: The per-channel edits composed before a structural one; the ONNX form ends in an export.
COMPOSED = ("permute", "scale", "bn-fold")
#: Edits that need a structure the built-in models lack, and the edit that makes it first ("alone" then means
#: on top of that one): an invertible map goes between two linear layers with nothing nonlinear between them.
NEEDS = {"invertible-map": "factor-linear"}
FORMS = ("safetensors", "onnx")
MODES = ("alone", "composed")
#: Largest logit change a function-preserving copy may show.
TOLERANCE = 1e-4
#: Other seeds tried when an attack refuses to write because its own function check failed (a random map of
#: condition 10 can push float32 rounding past 1e-4 on a trained model): each refusal is kept in the row.
RETRIES = 2
#: Log keys every built-in restorer writes; anything else in a log is a canonicalisation step.
COMMON_LOG_KEYS = {"acted", "reason", "guard", "evidence", "edges_from", "notes", "layers"}


def say(line: str) -> None:
    """Progress, as it comes (the output may be a file)."""
    print(line, flush=True)


# --- one stolen copy --------------------------------------------------------------------------------------------


def _attack(attack_id: str) -> Any:
    from auditor.plugin_manager import registered

    entry = registered("attacks").get(attack_id)
    return None if entry is None else entry.component


def _logits(path: Path, x: torch.Tensor, factory: str | None = None) -> torch.Tensor | None:
    from auditor.toolkit.modelio import predictor

    try:
        run = predictor(path, model_factory=factory)
    except Exception:  # a file auditor reads but no runtime can run (a factored state dict)
        return None
    return None if run is None else run(x).float()


def factored_module(arch: str) -> torch.nn.Module:
    """The owner's architecture with every layer factored as ``factor-linear`` leaves it (the module
    ``invertible-map`` runs: its state dict has the factored names)."""
    from auditor.toolkit import edits
    from auditor.toolkit import models as zoo

    width = OWNER_RECIPES.get(arch, (1, 0))[0]
    return edits.factor_linear(zoo.build(arch, **({"width": width} if width != 1 else {})), seed=0)[0]


def factored_cnn() -> torch.nn.Module:
    """``--model-factory`` for a factored CNN."""
    return factored_module("cnn")


def factored_resnet() -> torch.nn.Module:
    """``--model-factory`` for a factored ResNet."""
    return factored_module("resnet")


Step = tuple[str, str, "str | None"]  # attack, suffix written, model factory


def steps_for(edit: str, form: str, mode: str, arch: str) -> list[Step] | None:
    """The attacks, in order, the suffix each writes and the model factory it needs; None where the edit
    cannot give this form. An edit of :data:`NEEDS` runs on the factored model (with a factory for it),
    and folding then comes after it."""
    attack = _attack(edit)
    suffixes = getattr(attack, "suffixes", (".safetensors", ".onnx"))
    last = f".{form}"
    if last not in suffixes and not (form == "onnx" and ".safetensors" in suffixes):
        return None
    factory = f"{Path(__file__).resolve()}:factored_{arch}" if edit in NEEDS else None
    channel = [a for a in COMPOSED if a != "bn-fold" or factory is None] if mode == "composed" else []
    steps: list[Step] = [(a, ".safetensors", None) for a in channel]
    if factory is not None:
        steps.append((NEEDS[edit], ".safetensors", None))
    if last in suffixes:
        steps.append((edit, last, factory))
    else:
        steps += [(edit, ".safetensors", factory), ("onnx-export", ".onnx", factory)]
    if factory is not None and mode == "composed" and form == "safetensors":
        steps.append(("bn-fold", ".safetensors", factory))
    return steps


def make_copy(
    edit: str, form: str, mode: str, *, model: Path, work: Path, x: torch.Tensor, seed: int, arch: str
) -> dict[str, Any]:
    """Apply the steps with the registered attacks; the final file and the function check: the largest logit
    change where the file runs, else the last runnable step's plus the later steps' own checks (a bound)."""
    row: dict[str, Any] = {"edit": edit, "form": form, "mode": mode}
    if _attack(edit) is None:
        return {**row, "status": "not registered", "why": f"no attack {edit!r} is registered"}
    steps = steps_for(edit, form, mode, arch)
    if steps is None:
        return {**row, "status": "n/a", "why": f"{edit} does not write this form"}
    missing = [a for a, _, _ in steps if _attack(a) is None]
    if missing:
        return {**row, "status": "not registered", "why": f"missing: {', '.join(missing)}"}
    original = _logits(model, x)
    assert original is not None, model
    current, runnable_change, own = model, 0.0, 0.0
    done: list[dict[str, Any]] = []
    for i, (attack_id, suffix, factory) in enumerate(steps):
        out = work / f"{edit}-{form}-{mode}-{i}-{attack_id}{suffix}"
        refused: list[str] = []
        for attempt in range(RETRIES + 1):
            options = {"seed": seed + i + 100 * attempt, "overwrite": True,
                       **({"model_factory": factory} if factory else {})}  # fmt: skip
            try:
                summary = _attack(attack_id).apply(current, out, options=options)
                break
            except Exception as exc:  # reported in the row, never hidden
                why = f"{attack_id}: {type(exc).__name__}: {exc}"
                if "changed the outputs" not in str(exc) or attempt == RETRIES:
                    return {**row, "status": "attack failed", "why": why, "refused": refused, "steps": done}
                refused.append(f"seed {options['seed']}: {exc}")  # its own function check: a thief tries another
        logits = _logits(out, x, factory if suffix != ".onnx" else None)
        change = None if logits is None else float((logits - original).abs().max())
        checked = summary.get("max_output_change")
        done.append({"attack": attack_id, "file": out.name, "change": change, "own_check": checked,
                     "seed": options["seed"], "refused": refused})  # fmt: skip
        if change is not None:
            runnable_change, own = change, 0.0
        else:
            own += float("inf") if checked is None else float(checked)
        current = out
    final = done[-1]["change"]
    measured = final is not None
    change = final if measured else runnable_change + own
    return {**row, "status": "ok", "file": current, "steps": done, "max_logit_change": change,
            "change_measured": measured, "function_kept": change <= TOLERANCE}  # fmt: skip


# --- the audit ---------------------------------------------------------------------------------------------------


def finding_row(finding: Any) -> dict[str, Any]:
    """A finding's verdict and the numbers that decide it."""
    m = finding.metrics
    row: dict[str, Any] = {"scheme": finding.scheme, "verdict": finding.verdict.value}
    if finding.scheme == "greedy-residuals":
        layers: list[dict[str, Any]] = finding.details.get("layers") or []
        best = next((r for r in layers if r.get("name") == m.get("best_layer")), {})
        release = best.get("release_rate")  # the rate the owner's model showed, as the bundle records it
        row.update(rate=m.get("best_detection_rate"), log10_p=m.get("log10_combined_p"), layer=m.get("best_layer"),
                   release_rate=None if release is None else max(release, 1 - release))  # fmt: skip
    elif finding.scheme == "hufunet":
        row.update(acc_combined=m.get("acc_combined"), diff_acc=m.get("diff_acc"), tau=m.get("tau_acc"))
    else:
        row.update(summary=finding.summary)
    if finding.verdict.value in ("inconclusive", "error"):
        row["why"] = finding.summary
    return row


def restore_rows(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each restorer's status, whether it acted, the guard's score and the canonicalisation steps it logged."""
    rows = []
    for entry in log:
        inner = entry.get("log") or {}
        evidence = inner.get("evidence") or {}
        rows.append({
            "restorer": entry["restorer"], "status": entry["status"], "acted": bool(inner.get("acted")),
            "score": evidence.get("score"), "derived": evidence.get("derived"),
            "reason": inner.get("reason", entry.get("error", "")),
            "steps": {k: v for k, v in inner.items() if k not in COMMON_LOG_KEYS},
        })  # fmt: skip
    return rows


def audit(path: Path, inputs: Any) -> dict[str, Any]:
    """The copy audited as it is and with the reference: verdicts, findings, the restore log."""
    from auditor.audit.pipeline import audit_suspect

    direct = audit_suspect(path, dataclasses.replace(inputs, reference=None))
    restored = audit_suspect(path, inputs)
    return {
        "direct": {f.scheme: finding_row(f) for f in direct.findings if f.scheme},
        "restored": {f.scheme: finding_row(f) for f in restored.findings if f.scheme},
        "other": {f.detector: finding_row(f) for f in restored.findings if not f.scheme},
        "restore": restore_rows(restored.restore),
    }


def evidence(
    owner: dict[str, Path], arch: str, work: Path, *, edits: Sequence[str], forms: Sequence[str],
    modes: Sequence[str], seed: int = 0, log: Callable[[str], None] = say,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (edit, form, mode) of one owner: the copy, its function check and its audits."""
    from auditor.audit.inputs import load_inputs
    from auditor.toolkit import data as datasets

    inputs = load_inputs(bundles=[p for k, p in owner.items() if k != "model"], reference=owner["model"])
    x = datasets.digits().test.tensors[0]
    rows = []
    for edit in edits:
        for form in forms:
            for mode in modes:
                started = time.perf_counter()
                row = {
                    "arch": arch,
                    **make_copy(edit, form, mode, model=owner["model"], work=work, x=x, seed=seed, arch=arch),
                }
                if row["status"] == "ok":
                    row.update(audit(row.pop("file"), inputs))
                row["seconds"] = round(time.perf_counter() - started, 2)
                log(one_line(row))
                rows.append(row)
    return rows


def recovered(row: dict[str, Any]) -> bool:
    """Every scheme detected after restore, and the function kept (within :data:`TOLERANCE`) unless the edit
    is lossy by design (:data:`LOSSY`)."""
    found = row.get("restored", {})
    kept = row.get("function_kept", False) or row["edit"] in LOSSY
    return bool(found) and kept and all(f["verdict"] == "detected" for f in found.values())


# --- innocents ---------------------------------------------------------------------------------------------------


def train_innocent(arch: str, index: int, epochs: int, folder: Path) -> Path:
    """An independently trained model of ``arch`` (the owner's width): its own seed, shuffling and split."""
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    seed = 5000 + index
    width = OWNER_RECIPES.get(arch, (1, 0))[0]
    model = zoo.build(arch, seed=seed, **({"width": width} if width != 1 else {}))
    data = datasets.digits(split_seed=seed)
    training.train(model, data.train, training.TrainConfig(epochs=epochs, lr=1e-2, seed=seed))
    return training.save_model(model.eval(), folder, f"{arch}_innocent{index}", overwrite=True)["safetensors"]


def innocents(owner: dict[str, Path], arch: str, count: int, epochs: int, folder: Path, *,
              edits: Sequence[str] = (), forms: Sequence[str] = FORMS,
              log: Callable[[str], None] = say) -> list[dict[str, Any]]:  # fmt: skip
    """``count`` independent models audited against ``owner`` with every restorer on: each as trained, and
    each copy of it that the structural ``edits`` give (alone, in every form), so that every restore step
    has something to act on and its guard is asked."""
    from auditor.audit.inputs import load_inputs
    from auditor.audit.pipeline import audit_suspect
    from auditor.toolkit import data as datasets

    inputs = load_inputs(bundles=[p for k, p in owner.items() if k != "model"], reference=owner["model"])
    x = datasets.digits().test.tensors[0]
    rows = []
    for i in range(count):
        path = train_innocent(arch, i, epochs, folder)
        copies: list[dict[str, Any]] = [{"edit": "none", "form": "safetensors", "status": "ok", "file": path}]
        copies += [
            make_copy(e, f, "alone", model=path, work=folder, x=x, seed=i, arch=arch) for e in edits for f in forms
        ]
        copies = [c for c in copies if c["status"] != "n/a"]
        for copy in copies:
            row = {"arch": arch, "model": i, "edit": copy["edit"], "form": copy["form"], "status": copy["status"],
                   "why": copy.get("why")}  # fmt: skip
            if copy["status"] == "ok":
                record = audit_suspect(copy["file"], inputs)
                found = {f.scheme or f.detector: finding_row(f) for f in record.findings}
                row.update(verdict=record.verdict.value, findings=found, restore=restore_rows(record.restore))
            rows.append(row)
        audited = [r for r in rows if r["model"] == i and r["status"] == "ok"]
        scores: dict[str, list[float]] = {}
        for r in audited:
            for e in r["restore"]:
                scores.setdefault(e["restorer"], []).extend([e["score"]] if e["score"] is not None else [])
        highest = ", ".join(f"{n} {_num(max(v, default=None))}" for n, v in scores.items())
        log(f"{arch} innocent {i}: {len(audited)} files, claimed {sum(r['verdict'] == 'detected' for r in audited)}; "
            f"highest guard scores: {highest}")  # fmt: skip
    return rows


# --- presentation ------------------------------------------------------------------------------------------------


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _finding(f: dict[str, Any] | None) -> str:
    if f is None:
        return "-"
    if f["scheme"] == "greedy-residuals" and f.get("rate") is not None:
        release = f" (release {_num(f['release_rate'])})" if f.get("release_rate") is not None else ""
        return f"{f['verdict']} {_num(f['rate'])}{release}"
    if f["scheme"] == "hufunet" and f.get("diff_acc") is not None:
        return f"{f['verdict']} DiffAcc {_num(f['diff_acc'])} (tau {_num(f['tau'], '{:g}')})"
    return f["verdict"]


def _acted(row: dict[str, Any]) -> str:
    parts = []
    for r in row.get("restore", []):
        if r["status"] != "ok":
            parts.append(f"{r['restorer']}: error")
        elif r["acted"]:
            parts.append(f"{r['restorer'].removeprefix('restore-')} {_num(r['score'])}")
    return ", ".join(parts) or "none acted"


def _canon(row: dict[str, Any]) -> str:
    """What the restorers before channel alignment logged as steps: counts per kind, largest residual."""
    parts = []
    for r in row.get("restore", []):
        for key, value in r["steps"].items():
            if isinstance(value, list) and value and r["acted"]:
                rows = [v for v in value if isinstance(v, dict) and v.get("residual") is not None]
                residuals = [float(v["residual"]) for v in rows]
                worst = f", residual <= {max(residuals):.0e}" if residuals else ""
                parts.append(f"{len(value)} {key}{worst}")
    return "; ".join(parts) or "-"


def one_line(row: dict[str, Any]) -> str:
    head = f"{row['arch']} {row['edit']} {row['form']} {row['mode']}: "
    if row["status"] != "ok":
        return head + row["status"] + (f" ({row['why']})" if row.get("why") else "")
    found = row["restored"]
    return (head + f"change {row['max_logit_change']:.1e}; restored: "
            + "; ".join(_finding(f) for f in found.values())
            + f"; direct: {'; '.join(f['verdict'] for f in row['direct'].values())}; {_acted(row)}")  # fmt: skip


def evidence_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``evidence`` rows."""
    lines = [
        "| architecture | edit | form | composed | largest logit change | Greedy Residuals after restore "
        "| HufuNet after restore | without restore (GR; HufuNet) | restorers that acted (guard score) "
        "| canonicalisation logged |",
        "|---|---|---|---|---:|---|---|---|---|---|",
    ]
    for row in rows:
        lead = f"| {row['arch']} | `{row['edit']}` | {row['form']} | {'yes' if row['mode'] == 'composed' else 'no'} "
        if row["status"] != "ok":
            lines.append(lead + f"| {row['status']}{': ' + row['why'] if row.get('why') else ''} | | | | | |")
            continue
        change = f"{row['max_logit_change']:.1e}" + ("" if row["change_measured"] else " (bound)")
        retried = sum(len(step.get("refused", [])) for step in row["steps"])
        change += f"; {retried} seed(s) refused by the attack's own check" if retried else ""
        direct = "; ".join(f["verdict"] for f in row["direct"].values())
        lines.append(
            lead + f"| {change} | {_finding(row['restored'].get('greedy-residuals'))} "
            f"| {_finding(row['restored'].get('hufunet'))} | {direct} | {_acted(row)} | {_canon(row)} |"
        )
    return "\n".join(lines)


def evidence_summary(rows: list[dict[str, Any]]) -> str:
    """One line per edit: in how many settings it was recovered."""
    lines = []
    for edit in dict.fromkeys(r["edit"] for r in rows):
        mine = [r for r in rows if r["edit"] == edit]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            lines.append(f"- `{edit}`: {mine[0]['status']}" + (f" ({mine[0]['why']})" if mine[0].get("why") else ""))
            continue
        good = [r for r in ok if recovered(r)]
        missed = [f"{r['arch']} {r['form']} {r['mode']}" for r in ok if not recovered(r)]
        what = "every scheme detected after restore" + ("" if edit in LOSSY else ", function kept within 1e-4")
        unmade = [f"{r['arch']} {r['form']} {r['mode']} ({r['status']})" for r in mine
                  if r["status"] not in ("ok", "n/a")]  # fmt: skip
        lines.append(f"- `{edit}`: recovered ({what}) in {len(good)} of {len(ok)} settings"
                     + (f"; not in: {', '.join(missed)}" if missed else "")
                     + (f"; no copy made: {', '.join(unmade)}" if unmade else ""))  # fmt: skip
    return "\n".join(lines)


def innocent_table(rows: list[dict[str, Any]]) -> str:
    """Per architecture: files audited and claimed, and each restorer's guard score min / median / max (over
    the files where it asked the guard) and how often it acted; then which edited copies could not be made."""
    lines = ["| architecture | models | files audited | claimed | restorer | guard asked | score min | median | max "
             "| acted |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch and r["status"] == "ok"]
        models = len({r["model"] for r in rows if r["arch"] == arch})
        claimed = sum(r["verdict"] == "detected" for r in mine)
        for name in dict.fromkeys(e["restorer"] for r in mine for e in r["restore"]):
            entries = [e for r in mine for e in r["restore"] if e["restorer"] == name]
            scores = [e["score"] for e in entries if e["score"] is not None]
            spread = (f"{min(scores):.4f} | {statistics.median(scores):.4f} | {max(scores):.4f}" if scores
                      else "- | - | -")  # fmt: skip
            errors = sum(e["status"] != "ok" for e in entries)
            lines.append(
                f"| {arch} | {models} | {len(mine)} | {claimed} | `{name}` | {len(scores)} | {spread} "
                f"| {sum(e['acted'] for e in entries)}" + (f" ({errors} errors)" if errors else "") + " |"
            )
    edits = [e for e in dict.fromkeys(r["edit"] for r in rows) if e != "none"]
    if edits:
        lines += ["", "| edit (innocent copies) | " + " | ".join(dict.fromkeys(r["arch"] for r in rows)) + " |",
                  "|---|" + "---|" * len(dict.fromkeys(r["arch"] for r in rows))]  # fmt: skip
        for edit in edits:
            cells = []
            for arch in dict.fromkeys(r["arch"] for r in rows):
                mine = [r for r in rows if r["arch"] == arch and r["edit"] == edit]
                ok = [r for r in mine if r["status"] == "ok"]
                cell = f"{len(ok)} audited, {sum(r['verdict'] == 'detected' for r in ok)} claimed"
                if len(ok) < len(mine):
                    bad = next(r for r in mine if r["status"] != "ok")
                    why = str(bad.get("why")).replace(f"{ROOT}/", "")  # the docs name files from the repository root
                    cell += f"; {len(mine) - len(ok)} not made ({bad['status']}: {why[:80]})"
                cells.append(cell)
            lines.append(f"| `{edit}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(name: str, section: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in docs/restore.md."""
    text = DOCS.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text:
        raise SystemExit(f"docs/restore.md has no {start} marker")
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{section.strip()}\n{end}", text,
                 flags=re.S)  # fmt: skip
    DOCS.write_text(new)


# --- command line ------------------------------------------------------------------------------------------------


def _owner(args: argparse.Namespace, arch: str, out: Path) -> dict[str, Path]:
    if args.model:
        owner = {"model": args.model}
        for i, b in enumerate(args.bundle):
            owner[f"bundle{i}"] = b
        return owner
    return make_owner(out / f"owner_{arch}", arch=arch, epochs=args.owner_epochs)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run ``evidence`` or ``innocents``; exit status 1 if an innocent was claimed."""
    from auditor.toolkit.models import ARCHITECTURES

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("evidence", "innocents"):
        p = sub.add_parser(name)
        p.add_argument("--arch", nargs="+", default=["cnn", "resnet"] if name == "evidence" else sorted(ARCHITECTURES),
                       choices=sorted(ARCHITECTURES))  # fmt: skip
        p.add_argument("--out", type=Path, default=None, help="keep the owners and the copies here")
        p.add_argument("--json", type=Path, default=None, help="write the rows to this file")
        p.add_argument("--write-docs", action="store_true", help="write the tables into docs/restore.md")
        p.add_argument("--owner-epochs", type=int, default=None, help="shorter owner training (tests)")
        p.add_argument("--model", type=Path, default=None, help="an existing owner's model (one --arch)")
        p.add_argument("--bundle", type=Path, action="append", default=[], help="its bundles (with --model)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--edits", nargs="*", default=[*STRUCTURAL, *LOSSY], help="attack ids (default: all)")
        p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ev, inn = sub.choices["evidence"], sub.choices["innocents"]
    ev.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    inn.add_argument("--models", type=int, default=20, help="independent models per architecture")
    inn.add_argument("--epochs", type=int, default=8, help="their training epochs")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--out", "--json", "--write-docs"):  # where the results go, not what was measured
        while flag in given:
            at = given.index(flag)
            del given[at : at + (1 if flag == "--write-docs" else 2)]
    shown = " ".join(["python scripts/restore_evidence.py", *given, "--write-docs"])
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="restore-evidence-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for arch in args.arch:
        owner = _owner(args, arch, out)
        work = out / f"{args.command}_{arch}"
        work.mkdir(exist_ok=True)
        if args.command == "evidence":
            rows += evidence(owner, arch, work, edits=args.edits, forms=args.forms, modes=args.modes, seed=args.seed)
        else:
            rows += innocents(owner, arch, args.models, args.epochs, work, edits=args.edits, forms=args.forms)
    seconds = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps({"command": args.command, "rows": rows}, indent=1, default=str) + "\n")
    from auditor.plugin_manager import registered

    restorers = ", ".join(f"`{r}`" for r in registered("restorers"))
    if args.command == "evidence":
        body = (f"Command: `{shown}` ({machine()}; {seconds:.0f} s). "
                f"Restorers: {restorers}.\n\n{evidence_summary(rows)}\n\n{evidence_table(rows)}")  # fmt: skip
        failed = 0
    else:
        body = (f"Command: `{shown}` ({machine()}; {seconds:.0f} s). Restorers: {restorers}."
                f"\n\n{innocent_table(rows)}")  # fmt: skip
        failed = sum(r.get("verdict") == "detected" for r in rows)
    body = body.replace(str(out), "OUT")  # the docs name no folder of this machine
    print(body)
    if args.write_docs:
        write_docs(f"restore_{args.command}", body)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
