"""Benchmark the restore stage on a ResNet-18-sized model: wall time and peak memory.

A plain script, not part of the test run::

    python benchmarks/bench_restore.py [--runs 3] [--threads 2] [--baseline TREE] [--write-docs]

The network is a ResNet-18 written here (the CIFAR variant: 3x3 stem, no
max-pool, four stages of two basic blocks, 11.2 M parameters; no
torchvision) with seeded random weights and batch-norm statistics. Every free
channel space is permuted with the restore package's own attack (its graph
from an unfolded ONNX export, so the residual adds are real), which keeps
the outputs; the result is saved as safetensors, the suspect. The restore
stage as the audit runs it (every registered restorer, in order) then runs
against the reference in two forms: the same bare safetensors file (no graph:
each layer's input is chosen from the data) and the ONNX export (a real
graph). Each timing runs in a fresh process (loading excluded, ``--runs``
times with the two forms interleaved, median and min-max shown); peak memory
is the process's peak resident size after restoring, and its growth over the
peak after loading both models. Every run checks that the restored weights
equal the reference's.

``--baseline TREE`` times another checkout's restore stage in the same run
(its ``auditor`` package first on ``PYTHONPATH``, the same files; each of its
runs follows one of this tree's) and adds the ratio of the medians: how the
restore v2 work was measured against the commit before it
(``git worktree add ../before 55e17d5^``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _docs import ROOT, write_section
from _models import ResNet18
from safetensors.torch import save_file
from torch import nn

HEADING = "## Restore: a permuted ResNet-18 against its reference"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare(folder: Path) -> dict[str, float]:
    """Write reference.safetensors, reference.onnx and suspect.safetensors; return facts about them."""
    from auditor.audit.load import load_model
    from auditor.toolkit import edits as attacks
    from auditor.toolkit.channels import tensors_of

    torch.manual_seed(0)
    model = ResNet18()
    with torch.no_grad():  # statistics that are not the identity, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                assert m.running_mean is not None and m.running_var is not None  # tracked by default
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "reference.safetensors"))
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(folder / "reference.onnx"), dynamo=False,
                          do_constant_folding=False)  # fmt: skip
    graph = load_model(folder / "reference.onnx")
    permuted, maps = attacks.permute(graph, tensors_of(graph), seed=1)
    state = model.state_dict()
    for key in state:
        module, _, role = key.rpartition(".")
        if role in permuted.get(module, {}):
            state[key] = permuted[module][role].to(state[key].dtype)
    thief = ResNet18()
    thief.load_state_dict(state)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((thief.eval()(x) - model(x)).abs().max())
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "suspect.safetensors"))
    moved = sum(int((m != torch.arange(len(m))).sum()) for m in maps.values())
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "spaces": len(maps), "moved": moved, "logit_diff": diff}


class Timed:
    """A registered restorer, timed: the restore stage calls it as it would the restorer."""

    def __init__(self, restorer: Any, spent: dict[str, float]) -> None:
        self.restorer, self.spent = restorer, spent
        self.id, self.order = restorer.id, restorer.order

    def restore(self, suspect: Any, reference: Any) -> Any:
        started = time.process_time()
        try:
            return self.restorer.restore(suspect, reference)
        finally:
            self.spent[self.id] = time.process_time() - started


def child(folder: Path, reference_form: str) -> None:
    """One timed restore in this process; prints a JSON line."""
    from auditor.audit.load import load_model
    from auditor.audit.restore import run_restorers
    from auditor.plugin_manager import registered

    spent: dict[str, float] = {}
    restorers: list[Any] = [Timed(r.component, spent) for r in registered("restorers").values()]

    suspect = load_model(folder / "suspect.safetensors")
    reference = load_model(folder / f"reference.{reference_form}")
    for layer in reference.layers:  # the weights in memory, as an audit that hashed and read them has them
        for ref in layer.params.values():
            ref.read()
    loaded = peak_mib()
    start, cpu = time.perf_counter(), time.process_time()
    restored, log = run_restorers(suspect, reference, restorers=restorers)  # every registered one, as an audit
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    plain = load_model(folder / "reference.safetensors")
    channels = next(e for e in log if e["restorer"] == "restore-channels")
    pairs = {row["name"]: row["reference"] for row in channels["log"]["layers"]}
    exact = all(
        torch.equal(restored.layer(s).params["weight"].read(), plain.layer(r).params["weight"].read())
        for s, r in pairs.items()
    )
    print(json.dumps({
        "seconds": seconds, "cpu": cpu, "spent": spent, "peak_mib": peak_mib(), "loaded_mib": loaded, "exact": exact,
        "acted": [e["log"].get("acted") for e in log], "status": [e["status"] for e in log],
        "score": channels["log"]["evidence"]["score"], "restorers": [e["restorer"] for e in log],
    }))  # fmt: skip


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def run_child(folder: Path, form: str, threads: int, tree: Path | None) -> dict[str, Any]:
    """One fresh process of :func:`child`, with ``tree``'s auditor package first on the path if given."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", str(folder), form]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(label: str, runs: list[dict[str, Any]]) -> str:
    """A table row: the restore stage's wall time, memory, guard score and exactness over ``runs``."""
    assert all(r["exact"] and set(r["status"]) == {"ok"} for r in runs), runs
    return (
        f"| {label} | {span([r['seconds'] for r in runs])} | {span([r['cpu'] for r in runs])} "
        f"| {span([r['peak_mib'] for r in runs], '{:.0f}')} "
        f"| {span([r['peak_mib'] - r['loaded_mib'] for r in runs], '{:.0f}')} | {runs[0]['score']:.4f} "
        f"| {'yes' if all(r['exact'] for r in runs) else 'no'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh-process runs per reference form (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time in the same run")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    rows, ratios = [], []
    trees: dict[str, Path | None] = {"this tree": None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        facts = prepare(folder)
        print(f"prepared: {facts}", flush=True)
        forms = {"safetensors": "bare safetensors (readers from the data)", "onnx": "ONNX (the reference's graph)"}
        results = {(tree, form): list[dict[str, Any]]() for tree in trees for form in forms}
        for i in range(args.runs):  # interleaved, so that drift on a shared machine hits every series alike
            for form in forms:
                for tree, path in trees.items():
                    results[tree, form].append(run_child(folder, form, args.threads, path))
                    print(f"{tree} {form} run {i + 1}/{args.runs}: {results[tree, form][-1]}", flush=True)
        for form, label in forms.items():
            for tree in trees:
                rows.append(row(label if tree == "this tree" else f"{label}, before (baseline)", results[tree, form]))
            if args.baseline is not None:
                pairs = zip(results["this tree", form], results["baseline", form], strict=True)
                pairs_cpu = list(zip(results["this tree", form], results["baseline", form], strict=True))
                wall = statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)
                cpu = statistics.median(a["cpu"] / b["cpu"] for a, b in pairs_cpu)
                ratios.append(f"{form}: {wall:.2f} wall, {cpu:.2f} CPU")
    restorers = ", ".join(results["this tree", "onnx"][0]["restorers"])
    per_step = "; ".join(
        f"{form}: "
        + ", ".join(
            f"{name} {statistics.median(r['spent'][name] for r in results['this tree', form]):.2f}"
            for name in results["this tree", form][0]["restorers"]
        )
        for form in forms
    )
    cpus = len(os.sched_getaffinity(0))
    cmd = "python benchmarks/bench_restore.py"
    for flag, value, default in (("--runs", args.runs, 5), ("--threads", args.threads, 2)):
        cmd += f" {flag} {value}" if value != default else ""
    cmd += " --baseline ../before" if args.baseline is not None else ""
    compared = (
        [
            "",
            f"Baseline: the same script with the commit before restore v2 (`git worktree add ../before 55e17d5^`, "
            f"restorers {', '.join(results['baseline', 'onnx'][0]['restorers'])}) first on `PYTHONPATH`, run for "
            f"run after this tree's on the same files. Median of the per-run ratios this tree / baseline: "
            f"{'; '.join(ratios)}.",
        ]
        if args.baseline is not None
        else []
    )
    section = "\n".join([
        f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores (shared with other jobs), Linux "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch "
        f"thread(s); each run in a fresh process, loading excluded; medians [min-max] of {args.runs} runs. CPU is the "
        "process's CPU time over the restore stage (all threads): on a shared machine it moves less than wall time.",
        "",
        f"Suspect: ResNet-18 (CIFAR stem), {facts['parameters'] / 1e6:.2f} M parameters, every free channel space "
        f"permuted ({int(facts['spaces'])} spaces, {int(facts['moved'])} channels moved; outputs changed by at most "
        f"{facts['logit_diff']:.1e}), saved as safetensors. Restorers: every registered one, as an audit runs "
        f"them ({restorers}); each plans against the reference and asks the guard.",
        *compared,
        "",
        f"CPU seconds per restorer in this tree (medians): {per_step}.",
        "",
        "| reference given as | restore wall (s) | restore CPU (s) | peak RSS (MiB) | growth over loaded (MiB) "
        "| guard score | weights restored exactly |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "The channel plan (similarity matrices of every layer's output channels against the reference's, "
        "Hungarian assignment, repeated until no assignment changes) is made once per suspect graph and shared "
        "by the restorers that follow; the bare form also tries every space of a fitting width as each layer's "
        "input. Peak memory is the interpreter with torch, both models' weights in memory and the restored "
        "copies of the layers that changed. The machine is shared with other jobs: under heavy load the same "
        "runs took up to ten times as long, so compare only figures from one run of this script.",
    ])  # fmt: skip
    print(section)
    if args.write_docs:
        written = write_section("bench_restore", HEADING, section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
