"""Benchmark batch audits: throughput of ``auditor audit FOLDER`` on the local engine (1 and 2 processes)
and on Ray, for many small suspects and for a few large ones; and the cost of a header-only look.

A plain script, not part of the test run::

    python benchmarks/bench_batch.py [--workdir DIR] [--small 200] [--large 20] [--large-mb 400] [--write-docs]

It writes, from seeded generators:

* an owner: a SmallCNN (digits architecture) with a Greedy Residuals bundle (untrained: the detector's
  work is the same whether the watermark is there or not);
* ``--small`` suspects: SmallCNNs of other seeds, one safetensors file each (about 0.1 MB);
* ``--large`` suspects of ``--large-mb`` MB: a SmallCNN's tensors and one large float32 tensor of zeros,
  written as a hole (a sparse file: no disk blocks), each with metadata of its own so that no two
  files are alike.

Each workload is audited as one batch (reports written as HTML and JSON, no result cache) in this
process through :func:`auditor.report.batch.audit_batch` on: the local engine with one process (the
suspects one after the other here), the local engine with two worker processes (their start-up
included), and Ray on a local instance of 2 CPUs (started once before, its start-up reported apart).
Throughput is suspects per second and GB hashed per second (every byte of every suspect is hashed).
The large files are sparse and read once before any timing, so every engine reads them from the page
cache: the figures are what hashing and auditing cost, an upper bound on what a disk or a network gives.

The header-only look reads each file's safetensors header (:func:`auditor.formats.safetensors.read_header`)
and compares its tensors' shapes with the owner's: what a sweep would do before hashing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from _docs import write_section
from cryptography.hazmat.primitives.asymmetric import ed25519
from safetensors.torch import save_file

HEADING = "## Batch audits: the local engine and Ray"


def make_owner(folder: Path) -> tuple[Path, dict[str, list[int]]]:
    """The owner's bundle and its model's tensor shapes."""
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.toolkit import models as zoo

    model = zoo.build("cnn", seed=0)
    model_file = folder / "owner.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_file))
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) benchmark owner")
    wm.save_bundle(folder / "bundle.json", model, model_file=model_file, architecture="cnn")
    floats = {k: list(v.shape) for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    return folder / "bundle.json", floats


def make_small(folder: Path, n: int) -> list[Path]:
    from auditor.toolkit import models as zoo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"small{i:04d}.safetensors"
        model = zoo.build("cnn", seed=1000 + i)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(path)
    return paths


def write_sparse(path: Path, tensors: dict[str, torch.Tensor], zeros: tuple[str, list[int]], copy: int) -> None:
    """A safetensors file of ``tensors`` followed by one float32 tensor of zeros left as a hole."""
    header: dict[str, Any] = {"__metadata__": {"copy": str(copy)}}
    offset, blobs = 0, []
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    count = 1
    for d in zeros[1]:
        count *= d
    header[zeros[0]] = {"dtype": "F32", "shape": zeros[1], "data_offsets": [offset, offset + 4 * count]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            fh.write(blob)
        fh.truncate(8 + len(raw) + offset + 4 * count)  # the zeros: a hole, no blocks written


def make_large(folder: Path, n: int, mb: int) -> list[Path]:
    from auditor.toolkit import models as zoo

    folder.mkdir(parents=True, exist_ok=True)
    rows = max(1, mb * (1 << 20) // (4 * 4096))
    paths = []
    for i in range(n):
        path = folder / f"large{i:02d}.safetensors"
        model = zoo.build("cnn", seed=2000 + i)
        tensors = {k: v.float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        write_sparse(path, tensors, ("embedding.weight", [rows, 4096]), i)
        paths.append(path)
    return paths


def run_batch(paths: list[Path], bundle: Path, out: Path, engine: Any) -> dict[str, Any]:
    from auditor.audit.pipeline import load_inputs
    from auditor.report.batch import audit_batch, report_names
    from auditor.report.document import run_block

    inputs = load_inputs(bundles=[bundle], reference=None)
    start = time.perf_counter()
    summary = audit_batch(paths, report_names(paths), inputs=inputs, run=run_block(), command="bench",
                          out_dir=out, engine=engine)  # fmt: skip
    wall = time.perf_counter() - start
    size = sum(r.get("size") or 0 for r in summary["suspects"])
    errors = [r["error"] for r in summary["suspects"] if r["error"]]
    if errors:
        raise SystemExit(f"the batch had errors: {errors[:3]}")
    return {"wall": wall, "bytes": size, "n": len(paths), "counts": summary["counts"]}


def components(small: list[Path], large: Path, bundle: Path, out: Path) -> dict[str, float]:
    """Seconds per suspect of each part, in this process: the audit task without its page, the page, the
    driver's seal and two written files; and SHA-256 alone over one large file."""
    from auditor.audit.pipeline import load_inputs
    from auditor.report.batch import _render, _write_rendered, audit_document
    from auditor.report.document import run_block
    from auditor.safeio import sha256_file

    inputs = load_inputs(bundles=[bundle], reference=None)
    times = {"audit": 0.0, "page": 0.0, "driver": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(small):
        t0 = time.perf_counter()
        _, document = audit_document(path, inputs, run=run_block())
        assert document is not None
        document = json.loads(json.dumps(document))
        t1 = time.perf_counter()
        page = _render(document, None)
        t2 = time.perf_counter()
        _write_rendered(document, page, out / f"{i}.html", out / f"{i}.json", None)
        t3 = time.perf_counter()
        for part, dt in (("audit", t1 - t0), ("page", t2 - t1), ("driver", t3 - t2)):
            times[part] += dt / len(small)
    start = time.perf_counter()
    sha256_file(large)
    times["sha256_gb_s"] = large.stat().st_size / 1e9 / (time.perf_counter() - start)
    return times


def header_look(paths: list[Path], shapes: dict[str, list[int]]) -> tuple[float, int]:
    """Seconds per file to read the header and match the owner's tensor shapes; files that match."""
    from auditor.formats.safetensors import read_header

    wanted = sorted(map(tuple, shapes.values()))
    start, matching = time.perf_counter(), 0
    for p in paths:
        header = read_header(p)[0]
        have = sorted(tuple(v["shape"]) for k, v in header.items() if k != "__metadata__")
        matching += all(w in have for w in wanted)
    return (time.perf_counter() - start) / len(paths), matching


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=20)
    parser.add_argument("--large-mb", type=int, default=400)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    from auditor.audit.engine import Engine

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    work.mkdir(parents=True, exist_ok=True)
    bundle, shapes = make_owner(work)
    workloads = {
        f"{args.small} small suspects": make_small(work / "small", args.small),
        f"{args.large} suspects of {args.large_mb} MB": make_large(work / "large", args.large, args.large_mb),
    }
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    warm = run_batch(workloads[next(iter(workloads))][:2], bundle, work / "out" / "warm", Engine("ray"))
    ray_start = time.perf_counter() - started  # the instance and its first two workers (torch imported)
    del warm
    engines = {"local, 1 process": Engine("local", jobs=1), "local, 2 processes": Engine("local", jobs=2),
               "ray, 2 CPUs (local instance)": Engine("ray")}  # fmt: skip
    from auditor.safeio import sha256_file

    for path in workloads[next(reversed(workloads))]:
        sha256_file(path)  # untimed: every engine then reads the same warm page cache
    rows = []
    parts = components(workloads[next(iter(workloads))][:40], list(workloads.values())[1][0], bundle, work / "parts")
    print(f"per small suspect: audit {parts['audit'] * 1e3:.1f} ms, page {parts['page'] * 1e3:.1f} ms, driver"
          f" {parts['driver'] * 1e3:.1f} ms; SHA-256 alone {parts['sha256_gb_s']:.2f} GB/s", flush=True)  # fmt: skip
    for label, paths in workloads.items():
        per_file, matching = header_look(paths, shapes)
        for name, engine in engines.items():
            out = work / "out" / f"{label}-{name}".replace(" ", "_").replace(",", "")
            result = run_batch(paths, bundle, out, engine)
            rows.append({"workload": label, "engine": name, **result})
            print(f"{label:28} {name:30} {result['wall']:7.1f} s  {result['n'] / result['wall']:6.2f} suspects/s"
                  f"  {result['bytes'] / 1e9 / result['wall']:6.3f} GB/s", flush=True)  # fmt: skip
        rows.append({"workload": label, "header": per_file, "matching": matching, "n": len(paths)})
        print(f"{label:28} header-only look: {per_file * 1e3:.2f} ms per file ({matching} match)", flush=True)
    ray.shutdown()
    write_docs(rows, ray_start, args, parts, write=args.write_docs)


def write_docs(
    rows: list[dict[str, Any]], ray_start: float, args: argparse.Namespace, parts: dict[str, float], *, write: bool
) -> None:
    """The docs section: written into docs/benchmarks.md with ``write``, else printed."""
    load = os.getloadavg()[0]
    lines = [
        f"Command: `python benchmarks/bench_batch.py --small {args.small} --large {args.large} --large-mb"
        f" {args.large_mb} --write-docs`. Machine: {os.cpu_count()} CPU cores (shared with other jobs; 1-minute"
        f" load average {load:.1f} at the end), {platform.system()} {platform.release()}, Python"
        f" {platform.python_version()}; one run each (each batch writes every report as HTML and JSON, no result"
        " cache). The large suspects are sparse files read once before the timed runs (every engine reads the"
        " page cache), so GB/s is the cost of hashing and auditing, not of a disk.",
        "",
        "| workload | engine | wall (s) | suspects/s | GB hashed/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "engine" in r:
            lines.append(f"| {r['workload']} | {r['engine']} | {r['wall']:.1f} | {r['n'] / r['wall']:.2f} |"
                         f" {r['bytes'] / 1e9 / r['wall']:.3f} |")  # fmt: skip
    lines += ["", "Header-only look (read the safetensors header, compare tensor shapes with the owner's):"]
    for r in rows:
        if "header" in r:
            lines.append(f"- {r['workload']}: {r['header'] * 1e3:.2f} ms per file ({r['matching']} of {r['n']} match)")
    lines += ["", f"Per small suspect, in one process (means over {min(40, args.small)}): the audit task"
              f" without its page {parts['audit'] * 1e3:.1f} ms, rendering the HTML page (in the worker)"
              f" {parts['page'] * 1e3:.1f} ms, the driver's seal and two written files {parts['driver'] * 1e3:.1f}"
              f" ms. SHA-256 alone over one large file: {parts['sha256_gb_s']:.2f} GB/s."]
    lines += ["", f"Starting the local Ray instance (2 CPUs, no dashboard) and its two workers (a first batch of"
              f" two suspects) took {ray_start:.1f} s, not counted above; the local pool's start-up (two fresh"
              " interpreters importing torch) is counted in its rows."]
    print(write_section("bench_batch", HEADING, "\n".join(lines)) if write else "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
