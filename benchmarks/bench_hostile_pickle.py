"""Benchmark the PyTorch loader on hostile 20 MB pickles and a lying zip: wall time, peak memory, exit code.

A plain script, not part of the test run::

    python benchmarks/bench_hostile_pickle.py [--workdir benchmarks/out] [--runs 3] [--before REV] [--write-docs]

It writes each hostile checkpoint into ``--workdir`` (a zip with a stored ``data.pkl``, as torch.save
writes them) and runs ``python -m auditor inspect FILE`` on it in a fresh wrapper process that reports
the child's wall time and peak resident set (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), as
bench_inspect.py does. The pickles are the worst cases of each kind the budgets in
``auditor/formats/_unpickle.py`` answer (docs/formats.md, "Budgets"):

* issue 14's case: 9.9 million empty dicts appended to a list (19.8 MB, 19.8 million opcodes);
* the most opcodes for the fewest bytes and no memory (``NONE POP``, ten million times);
* the most memory per byte (an empty set is 216 bytes from one opcode byte);
* distinct integer keys of a dict, and distinct one-item tuples;
* three that the budgets let through, to show what they cost: one list holding itself nine million times
  (memo references, the cheapest opcodes to keep), four million distinct integers in a list, and as many
  empty sets as the memory budget admits (the most memory per byte of pickle: the worst case of all);
* a legitimate state dict of 100,000 tensors (its load alone, through ``load_model``: the table
  ``inspect`` prints for it is another benchmark's subject);
* issue 14's lying archive, scaled down (tests/assets/pt_lying_sizes.pt).

``--before REV`` runs the same commands once more with the ``auditor`` package of git revision
``REV`` (extracted with ``git archive``; each run capped at 180 s) and adds its figures as columns.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _docs import ROOT, write_section

WRAPPER = """
import json, resource, subprocess, sys, time
cmd, env, timeout = json.loads(sys.argv[1])
t0 = time.perf_counter()
try:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=timeout)
    rc, err = proc.returncode, proc.stderr.decode("utf-8", "replace")
except subprocess.TimeoutExpired:
    rc, err = "timeout", ""
wall = time.perf_counter() - t0
rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
json.dump({"wall": wall, "rss_kib": rss_kib, "rc": rc, "stderr": err}, sys.stdout)
"""
LOAD_ONLY = "import sys; from auditor.audit.load import load_model; load_model(sys.argv[1])"
_spec = importlib.util.spec_from_file_location("make_pt_assets", ROOT / "tests" / "assets" / "make_pt_assets.py")
assert _spec is not None and _spec.loader is not None
assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(assets)
N = 10_000_000


def checkpoint(path: Path, pickle: bytes) -> Path:
    """``pickle`` as the data.pkl of a zip checkpoint (stored, as torch.save writes it)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("hostile/data.pkl", (2020, 1, 1, 0, 0, 0)), pickle)
        zf.writestr(zipfile.ZipInfo("hostile/byteorder", (2020, 1, 1, 0, 0, 0)), b"little")
    return path


def state_dict(path: Path, tensors: int) -> Path:
    import torch

    sd = collections.OrderedDict((f"model.layers.{i}.mlp.weight", torch.zeros(1)) for i in range(tensors))
    torch.save(sd, path)
    return path


def pickles() -> dict[str, tuple[str, bytes]]:
    """label -> (file name, data.pkl) of each hostile pickle."""
    ints = b"".join(b"J" + i.to_bytes(4, "little") + b"N" for i in range(N // 3))
    big_ints = b"".join(b"J" + (i + 1000).to_bytes(4, "little") for i in range(4 * N // 10))
    return {
        "issue 14: 9.9 million empty dicts appended to a list": ("dicts.pt", assets.opcode_heavy_pickle()),
        "`NONE POP` ten million times": ("nonepop.pt", b"\x80\x02" + b"N0" * N + b"N."),
        "twenty million empty sets in a list": ("sets.pt", b"\x80\x02(" + b"\x8f" * 2 * N + b"l."),
        "a list holding itself nine million times": ("self.pt", b"\x80\x02]q\x00(" + b"h\x00" * (9 * N // 10) + b"e."),
        "four million distinct integers in a list": ("ints.pt", b"\x80\x02(" + big_ints + b"l."),
        "1.67 million empty sets in a list (just under the memory budget)": (
            "most.pt",
            b"\x80\x02(" + b"\x8f" * 1_675_000 + b"l.",
        ),
        "3.3 million distinct integer keys of a dict": ("keys.pt", b"\x80\x02}(" + ints + b"u."),
        "6.7 million one-item tuples": ("tuples.pt", b"\x80\x02(" + b"K\x01\x85" * (2 * N // 3) + b"l."),
    }


def cases(work: Path) -> list[tuple[str, Path, bool]]:
    """(label, file, load only) for each row of the table."""
    rows = [(label, checkpoint(work / name, body), False) for label, (name, body) in pickles().items()]
    rows.append(("state dict of 100,000 tensors (legitimate; load only)", state_dict(work / "legit.pt", 100_000), True))
    lying = ROOT / "tests" / "assets" / "pt_lying_sizes.pt"
    rows.append(("issue 14's lying zip, scaled down (`pt_lying_sizes.pt`)", lying, False))
    return rows


def measure(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path) -> dict[str, object]:
    # The command runs in ``cwd``: ``python -m`` and ``-c`` import the auditor package found there first.
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps([cmd, env, timeout])],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def bench(path: Path, load_only: bool, runs: int, timeout: float, package: Path = ROOT) -> dict[str, object]:
    """``runs`` runs on ``path`` with the auditor package in ``package`` (the working tree's by default)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = (
        [sys.executable, "-c", LOAD_ONLY, str(path)]
        if load_only
        else [sys.executable, "-m", "auditor", "inspect", str(path)]
    )
    results = [measure(cmd, env, timeout, package) for _ in range(runs)]
    walls = [float(r["wall"]) for r in results]  # type: ignore[arg-type]
    last = results[-1]
    lines = str(last["stderr"]).strip().splitlines()
    return {
        "wall": statistics.median(walls),
        "range": (min(walls), max(walls)),
        "rss_mib": statistics.median(int(r["rss_kib"]) for r in results) / 1024,  # type: ignore[call-overload]
        "rc": last["rc"],
        "line": lines[-1] if lines else "",
        "lines": len(lines),
    }


def old_package(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev, "auditor"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def outcome(result: dict[str, object], path: Path) -> str:
    rc = result["rc"]
    if rc == "timeout":
        return "still running at the cap"
    if rc == 0:
        return "exit 0"
    if isinstance(rc, int) and rc < 0:
        return f"killed by signal {-rc} (crash)"
    line = str(result["line"]).replace(str(path), "FILE").replace("|", "\\|")
    return f"exit {rc}: `{line[:150]}`"


def reading(rows: list[dict[str, object]]) -> list[str]:
    """How to read the table, with this run's numbers."""
    hostile = [r["now"] for r in rows if "legitimate" not in str(r["label"])]
    walls = [float(r["wall"]) for r in hostile]  # type: ignore[index]
    peaks = [float(r["rss_mib"]) for r in hostile]  # type: ignore[index]
    text = (
        f"Every hostile file ends in one line and exit 4, in {min(walls):.1f} to {max(walls):.1f} s with at most "
        f"{max(peaks):.0f} MiB: the scan refuses a pickle past 10 million opcodes or 384 MiB of estimated memory "
        "before anything is unpickled, so a refusal costs start-up (about 0.3 s and 45 MiB, no torch) plus at most "
        "one scan. The three pickles the budgets let through cost what they hold (nine million references, four "
        "million integers, 1.67 million sets: the most memory the budget admits) and are then refused for "
        "holding no state dict."
    )
    issue = rows[0]
    if "before" in issue:
        now, old = issue["now"], issue["before"]
        assert isinstance(now, dict) and isinstance(old, dict)
        text += (
            f" Issue 14's pickle took {old['wall']:.0f} s and {old['rss_mib']:,.0f} MiB before ({now['wall']:.1f} s "
            f"and {now['rss_mib']:.0f} MiB now); the lying zip loaded (exit 0)."
        )
    return [text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per file (median reported)")
    parser.add_argument("--before", metavar="REV", help="also run the auditor package of this git revision, once")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    work: Path = args.workdir / "hostile_pickle"
    work.mkdir(parents=True, exist_ok=True)
    old_dir = Path(tempfile.mkdtemp(prefix="auditor-before-")) if args.before else None
    rows = []
    try:
        if old_dir is not None:
            old_package(args.before, old_dir)
        for label, path, load_only in cases(work):
            print(f"{label} ...", flush=True)
            row: dict[str, object] = {"label": label, "size": path.stat().st_size, "path": str(path)}
            row["now"] = bench(path, load_only, args.runs, 600)
            if old_dir is not None:
                row["before"] = bench(path, load_only, 1, 180, package=old_dir)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)

    head = "| file | MB | wall (s) [min-max] | peak RSS (MiB) | outcome |"
    rule = "|---|---:|---:|---:|---|"
    if args.before:
        head += f" before (`{args.before}`): wall (s) | peak RSS (MiB) | outcome |"
        rule += "---:|---:|---|"
    lines = [head, rule]
    for row in rows:
        now, path = row["now"], Path(str(row["path"]))
        assert isinstance(now, dict)
        line = (
            f"| {row['label']} | {int(row['size']) / 1e6:.1f} | {now['wall']:.1f} "  # type: ignore[call-overload]
            f"[{now['range'][0]:.1f}-{now['range'][1]:.1f}] | {now['rss_mib']:.0f} | {outcome(now, path)} |"
        )
        if "before" in row:
            old = row["before"]
            assert isinstance(old, dict)
            line += f" {old['wall']:.1f} | {old['rss_mib']:.0f} | {outcome(old, path)} |"
        lines.append(line)
    cmd = "python benchmarks/bench_hostile_pickle.py" + (f" --runs {args.runs}" if args.runs != 3 else "")
    cmd += f" --before {args.before}" if args.before else ""
    cpus = len(os.sched_getaffinity(0))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        load = f"; 1-minute load average {os.getloadavg()[0]:.1f} at the end"
    except OSError:
        load = ""
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores (shared with other jobs{load}), "
            f"{ram_gib:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}; each file "
            f"read by `python -m auditor inspect FILE` in a fresh process, medians of {args.runs} runs"
            + (", the revision before once, capped at 180 s" if args.before else "")
            + ".",
            "",
            *lines,
            "",
            *reading(rows),
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section("bench_hostile_pickle", "## Hostile pickles and a lying zip: bounded work", section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
