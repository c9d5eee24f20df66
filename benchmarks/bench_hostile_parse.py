"""Benchmark `auditor inspect` on hostile ONNX files and safetensors headers: wall time, peak memory, exit code.

A plain script, not part of the test run::

    python benchmarks/bench_hostile_parse.py [--workdir benchmarks/out] [--runs 3] [--before REV] [--write-docs]

It writes each file into ``--workdir`` and measures ``python -m auditor inspect FILE`` in a fresh process
with bench_hostile_pickle.py's wrapper (wall time, peak RSS of the child). The files are the worst cases
the parse budgets answer (docs/formats.md, "Budgets: ONNX and safetensors"), and the largest each budget
lets through, to show what those cost:

* ONNX: issue 14's 10 MB file of five million empty nodes; a node with a million attributes; ten million
  scalar fields; If subgraphs nested past protobuf's limit; 999,990 empty nodes (just under the budget);
* safetensors: a 100 MB header (the format's limit) of 1.7 million minimal tensor entries; 8.4 million
  metadata strings; 499,999 entries and 2 million metadata strings (just under the budgets); a 100 MB
  metadata string; metadata nested 50 million deep.

``--before REV`` runs each file once more with the ``auditor`` package of git revision ``REV`` (each run
capped at 180 s) and adds its figures as columns.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import struct
import tempfile
from pathlib import Path

from _docs import ROOT, write_section
from bench_hostile_pickle import bench, old_package, outcome

HEADER_LIMIT = 100_000_000
ENTRY = '"{:x}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _model(graph: bytes) -> bytes:
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 17))


def _nested_ifs(levels: int) -> bytes:
    graph = _field(1, _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity"))
    for _ in range(levels):
        attribute = _field(1, b"then_branch") + _field(6, graph) + _field(20, 5)
        graph = _field(1, _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute))
    return _model(graph)


def _safetensors(header: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _filled(items: list[str], opening: str, closing: str) -> bytes:
    """As many of ``items`` as fit in a header at the format's limit."""
    size, kept = len(opening) + len(closing), 0
    for item in items:
        if size + len(item) + 1 > HEADER_LIMIT - 8:
            break
        size += len(item) + 1
        kept += 1
    return (opening + ",".join(items[:kept]) + closing).encode()


def files() -> dict[str, tuple[str, bytes]]:
    """label -> (file name, bytes)."""
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Relu") + b"\x2a\x00" * 1_000_000
    deep = HEADER_LIMIT // 2 - 40
    return {
        "ONNX, issue 14: 5,000,000 empty nodes": ("nodes.onnx", _model(b"\x0a\x00" * 5_000_000)),
        "ONNX: one node with 1,000,000 attributes": ("attributes.onnx", _model(_field(1, node))),
        "ONNX: 10,000,001 scalar fields": ("fields.onnx", b"\x08\x08" * 10_000_001),
        "ONNX: If subgraphs nested 33 deep (101 message levels)": ("deep.onnx", _nested_ifs(33)),
        "ONNX: 999,990 empty nodes (under the budget)": ("under.onnx", _model(b"\x0a\x00" * 999_990)),
        "safetensors: 100 MB header of minimal tensor entries": (
            "entries.safetensors",
            _safetensors(_filled([ENTRY.format(i) for i in range(1_800_000)], "{", "}")),
        ),
        "safetensors: 100 MB header of metadata strings": (
            "metadata.safetensors",
            _safetensors(_filled([f'"{i:x}":""' for i in range(8_500_000)], '{"__metadata__":{', "}}")),
        ),
        "safetensors: 499,999 tensor entries (under the budget)": (
            "under_entries.safetensors",
            _safetensors(("{" + ",".join(ENTRY.format(i) for i in range(499_999)) + "}").encode()),
        ),
        "safetensors: 1,999,990 metadata strings (under the budget)": (
            "under_metadata.safetensors",
            _safetensors(('{"__metadata__":{' + ",".join(f'"{i:x}":""' for i in range(1_999_990)) + "}}").encode()),
        ),
        "safetensors: one 100 MB metadata string": (
            "string.safetensors",
            _safetensors(b'{"__metadata__":{"a":"' + b"x" * (HEADER_LIMIT - 40) + b'"}}'),
        ),
        "safetensors: metadata nested 50 million deep": (
            "nested.safetensors",
            _safetensors(b'{"__metadata__":{"a":' + b"[" * deep + b"]" * deep + b"}}"),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per file (median reported)")
    parser.add_argument("--before", metavar="REV", help="also run the auditor package of this git revision, once")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    work: Path = args.workdir / "hostile_parse"
    work.mkdir(parents=True, exist_ok=True)
    old_dir = Path(tempfile.mkdtemp(prefix="auditor-before-")) if args.before else None
    rows = []
    try:
        if old_dir is not None:
            old_package(args.before, old_dir)
        for label, (name, data) in files().items():
            print(f"{label} ...", flush=True)
            path = work / name
            path.write_bytes(data)
            row: dict[str, object] = {"label": label, "size": len(data), "path": str(path)}
            row["now"] = bench(path, False, args.runs, 600)
            if old_dir is not None:
                row["before"] = bench(path, False, 1, 180, package=old_dir)
            path.unlink()
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
            f"[{now['range'][0]:.1f}-{now['range'][1]:.1f}] | {now['rss_mib']:.0f} | {outcome(now, path)[:110]} |"
        )
        if "before" in row:
            old = row["before"]
            assert isinstance(old, dict)
            line += f" {old['wall']:.1f} | {old['rss_mib']:.0f} | {outcome(old, path)[:110]} |"
        lines.append(line)
    cmd = "python benchmarks/bench_hostile_parse.py" + (f" --runs {args.runs}" if args.runs != 3 else "")
    cmd += f" --before {args.before}" if args.before else ""
    cpus = len(os.sched_getaffinity(0))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores (shared with other jobs), "
            f"{ram_gib:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}; each file "
            f"read by `python -m auditor inspect FILE` in a fresh process, medians of {args.runs} runs"
            + (", the revision before once, capped at 180 s" if args.before else "")
            + ". Outcomes are cut at 110 characters.",
            "",
            *lines,
            "",
            "Files over a budget are refused before the protobuf runtime or `json.loads` builds anything, so a "
            "refusal costs start-up plus one walk of the bytes; the files just under a budget show the most a "
            'parse can cost (docs/formats.md, "Budgets: ONNX and safetensors").',
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section(
            "bench_hostile_parse", "## Hostile ONNX files and safetensors headers: bounded parses", section
        )
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
