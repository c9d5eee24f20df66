"""``auditor evaluate`` over the full grid on one model: wall time against the 15-minute target.

The model is the demo's owner (scripts/robustness.py ``make_owner``: SmallCNN
width 2 with both watermarks), trained once and not timed. Each run is a
fresh ``python -m auditor evaluate`` process (interpreter and torch start-up
included) with both bundles, the released model as the restore reference and
a new output folder, so nothing is resumed. The table gives the wall time
(median of ``--runs``) and, from the last run's state, the seconds spent per
group of cells.

    python benchmarks/bench_evaluate.py [--runs 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _docs import ROOT, write_section

sys.path.insert(0, str(ROOT / "scripts"))
from robustness import machine, make_owner  # the script folder is not a package

HEADING = "## `auditor evaluate`: the full attack grid on one model"
TARGET_S = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="timed runs (median reported)")
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # training the owner (not timed); the evaluation sets its own threads
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        owner = make_owner(Path(tmp) / "owner")
        walls: list[float] = []
        loads: list[float] = []
        results: dict = {}
        for run in range(args.runs):
            out = Path(tmp) / f"eval{run}"
            cmd = [sys.executable, "-m", "auditor", "evaluate", "--bundle", str(owner["gr"]), "--bundle",
                   str(owner["hufunet"]), "--model", str(owner["model"]), "--reference", str(owner["model"]),
                   "--out", str(out), "--no-progress", "--json"]  # fmt: skip
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            walls.append(time.perf_counter() - started)
            loads.append(os.getloadavg()[0])
            results = json.loads((out / "robustness.json").read_text())
            json.loads(done.stdout)  # the command's own JSON must parse
    cells = results["cells"]
    groups: dict[str, list[float]] = {}
    for cell in cells:
        groups.setdefault(cell["group"], []).append(cell["seconds"])
    wall = statistics.median(walls)
    failed = [c["label"] for c in cells if c["status"] != "ok"]
    rows = "\n".join(f"| {g} | {len(s)} | {sum(s):.1f} | {max(s):.1f} |" for g, s in groups.items())
    runs = f"median of {args.runs} runs" if args.runs > 1 else "one run"
    verdict = "met" if wall <= TARGET_S else "NOT met"
    cmd_line = "python benchmarks/bench_evaluate.py" + (f" --runs {args.runs}" if args.runs != 1 else "")
    section = f"""Command: `{cmd_line} --write-docs`. Machine: {machine()}; {runs}, each a fresh process; 1-minute load
average {min(loads):.1f}-{max(loads):.1f} around the runs (the machine is shared with other jobs).

Full grid ({len(cells)} cells, both bundles, restore against the released model): **{wall:.0f} s** wall
({", ".join(f"{w:.0f}" for w in walls)} s per run); target 15 min ({TARGET_S} s): {verdict}.
{f"Cells that failed: {', '.join(failed)}." if failed else "Every cell ran."}

| group | cells | seconds (sum) | slowest cell (s) |
|---|---:|---:|---:|
{rows}

Cells run on one torch thread: on a shared two-core machine small models train several times faster so.
Training dominates: fine-tuning (up to 100 epochs of 12 steps) and overwriting (the adversary trains a
HufuNet of their own); every other cell (attack, save, load, restore, both detectors, accuracy) takes
well under a second.
"""
    print(section)
    if args.write_docs:
        print(f"wrote {write_section('bench_evaluate', HEADING, section)}")


if __name__ == "__main__":
    main()
