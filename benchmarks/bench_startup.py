"""Benchmark the start-up of the commands that do no model work, against ``python -c "import typer"``.

A plain script, not part of the test run::

    python benchmarks/bench_startup.py [--runs 15] [--write-docs]

Each command runs as a whole process (``python -m auditor ...``, the interpreter's start-up included),
in the environment the script was started in, its output thrown away. Compiled bytecode is kept in a
temporary folder (``PYTHONPYCACHEPREFIX``), as an installed package has its ``.pyc`` files: without it,
every run would compile auditor's sources again. The baseline
``python -c "import typer"`` is the least any typer command line can cost. Every command is paired with
a baseline run, in turn (baseline, command, baseline, command...), so a machine that speeds up or slows
down during the benchmark moves both; the table shows medians over ``--runs`` pairs, after one untimed
warm-up pair, and the median of the per-pair differences. The goal is a difference under 0.3 s.
``report verify`` checks a small report sealed by auditor's own report code.
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

from _docs import ROOT, write_section

GOAL = 0.3  # seconds over the baseline
BASELINE = [sys.executable, "-c", "import typer"]
COMMANDS = {
    "auditor --help": ["--help"],
    "auditor --version": ["--version"],
    "auditor plugins": ["plugins"],
    "auditor plugins --json": ["plugins", "--json"],
    "auditor report verify REPORT.json": ["report", "verify", "REPORT"],
}


def sealed_report(folder: Path) -> Path:
    """A small report sealed by auditor's report code (content hash, no signature)."""
    sys.path.insert(0, str(ROOT))
    from auditor.report.seal import seal

    document = {"report_format": "auditor-report/1", "suspect": {"sha256": "0" * 64}, "findings": []}
    path = folder / "report.json"
    path.write_text(json.dumps({**document, "integrity": seal(document)}))
    return path


def wall(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of ``cmd``, its output discarded; it must exit 0."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def paired(cmd: list[str], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Medians of ``runs`` interleaved runs of the baseline and ``cmd``, and of their differences."""
    wall(BASELINE, env)
    wall(cmd, env)
    base, own = [], []
    for _ in range(runs):
        base.append(wall(BASELINE, env))
        own.append(wall(cmd, env))
    return {
        "baseline": statistics.median(base),
        "command": statistics.median(own),
        "min": min(own),
        "max": max(own),
        "difference": statistics.median(o - b for o, b in zip(own, base, strict=True)),
    }


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        '| command | wall (s) [min-max] | `python -c "import typer"` (s) | difference (s) | within 0.3 s |',
        "|---|---:|---:|---:|:---:|",
    ]
    for label, r in results.items():
        ok = "yes" if r["difference"] <= GOAL else "no"
        lines.append(
            f"| `{label}` | {r['command']:.2f} [{r['min']:.2f}-{r['max']:.2f}] | {r['baseline']:.2f} "
            f"| {r['difference']:+.2f} | {ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed pairs per command (medians reported)")
    parser.add_argument("--report", type=Path, help="a sealed report to verify (default: one written here)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        report = args.report or sealed_report(Path(tmp))
        for label, argv in COMMANDS.items():
            print(f"timing {label} ...", flush=True)
            cmd = [sys.executable, "-m", "auditor", *(str(report) if a == "REPORT" else a for a in argv)]
            results[label] = paired(cmd, args.runs, env)
    cmd = "python benchmarks/bench_startup.py" + (f" --runs {args.runs}" if args.runs != 15 else "")
    cpus = len(os.sched_getaffinity(0))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores, {ram_gib:.0f} GiB RAM, Linux "
            f"{platform.release()}, Python {platform.python_version()}; each command as a whole process "
            f"(`python -m auditor ...`, bytecode cached), interleaved with the baseline, medians of "
            f"{args.runs} pairs after one warm-up pair; the difference is the median of the per-pair differences.",
            "",
            table(results),
            "",
            "None of these commands imports torch, numpy, ONNX or safetensors (tests/test_startup.py checks): "
            "the graph, the format modules and the plugins load them on first use, not when they register. "
            "What remains over the baseline is the command line itself: rich's console and tables, typer's "
            "option handling (it imports pydantic for a command that takes options), pluggy and "
            "importlib.metadata for the plugin manager, cryptography (auditor.keys), and auditor's own "
            "modules with every built-in plugin's registration.",
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section("bench_startup", "## Start-up of the commands that load no model", section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
