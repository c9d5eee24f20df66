"""Benchmark the lineage test on a ResNet-18-sized model against the restore stage on the same files.

A plain script, not part of the test run::

    python benchmarks/bench_lineage.py [--runs 5] [--threads 2] [--write-docs]

The files are bench_restore.py's: a ResNet-18 (CIFAR stem, 11.2 M parameters) with seeded random weights as the
reference, and the suspect it permutes in every free channel space (outputs unchanged), saved as safetensors.
Each run, in a fresh process with the weights already read: the restore stage (every registered restorer,
as an audit runs them) on the suspect, then the lineage test (its default re-orderings per layer) on the
restored suspect; and the lineage test on an independently initialised ResNet-18 (seed 1), which the restore
guard leaves alone. Medians and [min-max] of ``--runs`` runs; peak memory is the process's peak resident size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _docs import write_section
from _models import ResNet18
from bench_restore import peak_mib, prepare
from safetensors.torch import save_file

from auditor.plugins.lineage.detector import DEFAULT_ALPHA, DEFAULT_PERMUTATIONS

HEADING = "## Lineage: the lineage test on a ResNet-18, beside restore"


def child(folder: Path) -> None:
    """One timed restore and two timed lineage tests in this process; prints a JSON line."""
    from auditor.audit.load import load_model
    from auditor.audit.restore import run_restorers
    from auditor.plugins.lineage.detector import LineageDetector

    suspect, reference = load_model(folder / "suspect.safetensors"), load_model(folder / "reference.safetensors")
    independent = load_model(folder / "independent.safetensors")
    for graph in (suspect, reference, independent):  # the weights in memory, as an audit that hashed them has them
        for layer in graph.layers:
            for ref in layer.params.values():
                ref.read()
    start = time.perf_counter()
    restored, log = run_restorers(suspect, reference)
    restore_s = time.perf_counter() - start
    detector, found = LineageDetector(), {}
    for name, graph in (("derived", restored), ("independent", independent)):
        start = time.perf_counter()
        finding = detector.detect(graph, bundle=None, context={"reference": reference, "restore": log, "options": {}})
        found[name] = {"seconds": time.perf_counter() - start, "verdict": finding[0].verdict.value,
                       "p": finding[0].metrics["p"], "layers": finding[0].metrics["layers_tested"]}  # fmt: skip
    print(json.dumps({"restore_s": restore_s, "peak_mib": peak_mib(), **found}))


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh-process runs (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child)
        return
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        facts = prepare(folder)
        torch.manual_seed(1)
        save_file(
            {k: v.contiguous() for k, v in ResNet18().state_dict().items()}, str(folder / "independent.safetensors")
        )
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", str(folder)]
        for i in range(args.runs):
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"run {i + 1}/{args.runs}: {runs[-1]}", flush=True)
    assert all(r["derived"]["verdict"] == "detected" and r["independent"]["verdict"] == "not-detected" for r in runs)
    first = runs[0]
    command = "python benchmarks/bench_lineage.py" + (f" --runs {args.runs}" if args.runs != 5 else "")
    command += f" --threads {args.threads}" if args.threads != 2 else ""
    section = "\n".join([
        f"Command: `{command} --write-docs`. Machine: {len(os.sched_getaffinity(0))} CPU cores (shared with other"
        f" jobs), Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__},"
        f" {args.threads} torch thread(s); each run in a fresh process, loading excluded; medians [min-max] of"
        f" {args.runs} runs.",
        "",
        f"Files: bench_restore.py's ResNet-18 ({facts['parameters'] / 1e6:.2f} M parameters) as the reference and its"
        f" permuted copy as the suspect (safetensors); an independently initialised ResNet-18 (seed 1). The lineage"
        f" test runs its default {DEFAULT_PERMUTATIONS:,} re-orderings on each of {first['derived']['layers']} layers"
        " (the output layer"
        " is not tested) and calls a model derived at p <= "
        f"{DEFAULT_ALPHA:g}.",
        "",
        "| step | wall (s) | answer |",
        "|---|---:|---|",
        f"| restore stage (every registered restorer), permuted suspect | {span([r['restore_s'] for r in runs])} |"
        " aligned |",
        f"| lineage test, restored suspect | {span([r['derived']['seconds'] for r in runs])} | derived, p ="
        f" {first['derived']['p']:.2g} |",
        f"| lineage test, independent model | {span([r['independent']['seconds'] for r in runs])} | not derived, p ="
        f" {first['independent']['p']:.2g} |",
        "",
        "Per run, the lineage test on the restored suspect took"
        f" {statistics.median(r['derived']['seconds'] / r['restore_s'] for r in runs):.1%} of the restore stage's time"
        " (median of the per-run ratios; the machine is shared, so the ratio is the steadier figure).",
        "",
        f"Peak resident memory of a run (three ResNet-18s loaded, restore and both tests):"
        f" {span([r['peak_mib'] for r in runs], '{:.0f}')} MiB.",
    ])  # fmt: skip
    print(section)
    if args.write_docs:
        print(f"wrote {write_section('bench_lineage', HEADING, section)}")


if __name__ == "__main__":
    main()
