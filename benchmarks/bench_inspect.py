"""Benchmark ``auditor inspect --json`` on ~2 GB models: wall time and peak memory.

A plain script, not part of the test run::

    python benchmarks/bench_inspect.py [--workdir benchmarks/out] [--size-gb 2] [--runs 3] [--write-docs]

It writes two models of about ``--size-gb`` each into ``--workdir``, with a
streaming writer so the script itself never holds more than one chunk:

* ``bench.safetensors``: about 60 float32 conv and linear tensors, header and data written chunk by chunk;
* ``bench_onnx/model.onnx``: a chain of Conv and Gemm nodes whose initializers live in one external
  ``weights.bin`` (the protobuf itself is a few kilobytes).

Each measurement runs in its own fresh ``python -c`` wrapper that starts the
command, waits for it and reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the
wrapper has exactly one child, so that is the child's own peak resident set
(the wrapper's memory is not counted). Wall time is taken in the wrapper around
the child, so the wrapper's start-up is not counted either. Every command runs
``--runs`` times; the table shows medians. ``sha256sum`` of the same files runs
alongside, because inspect hashes every file it reads and cannot be faster
than one pass over the bytes. All runs see a warm page cache (the files were
just written, and one untimed run of each command precedes the timed ones).
The big files are deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _docs import ROOT, write_section

CHUNK = 1 << 22  # elements per generated chunk: 16 MiB of float32
SEED = 1234
ALIGN = 4096  # external-data offsets, so a loader may map each initializer

# What inspect's hashing costs on its own: auditor.safeio.sha256_file's loop (1 MiB reads into hashlib), no torch.
HASHLIB = """
import hashlib, sys
for name in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(name, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    print(digest.hexdigest(), name)
"""

WRAPPER = """
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
json.dump({"wall": wall, "rss_kib": rss_kib, "rc": proc.returncode,
           "stdout": proc.stdout.decode("utf-8", "replace"), "stderr": proc.stderr.decode("utf-8", "replace")},
          sys.stdout)
"""


def layer_specs(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Weight and bias shapes of a conv stem and a linear chain that total about ``size_bytes`` in float32."""
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(6):
        specs += [(f"features.{i}.weight", (512, 512, 3, 3)), (f"features.{i}.bias", (512,))]
    specs += [("classifier.0.weight", (4096, 512 * 4 * 4)), ("classifier.0.bias", (4096,))]
    used = sum(math.prod(s) for _, s in specs) * 4
    per_linear = (4096 * 4096 + 4096) * 4
    for i in range(1, 1 + max(1, round((size_bytes - used) / per_linear))):
        specs += [(f"classifier.{i}.weight", (4096, 4096)), (f"classifier.{i}.bias", (4096,))]
    return specs


def chunks(rng: np.random.Generator, numel: int) -> Iterator[bytes]:
    """``numel`` seeded float32 values (scaled normals) as little-endian bytes, a chunk at a time."""
    done = 0
    while done < numel:
        n = min(CHUNK, numel - done)
        yield (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype("<f4").tobytes()
        done += n


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file written as a stream: header first, then each tensor chunk by chunk."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "written_by": "bench_inspect"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the library pads the header to 8 bytes as well
    rng = np.random.default_rng(SEED)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in specs:
            for chunk in chunks(rng, math.prod(shape)):
                fh.write(chunk)


def write_onnx(folder: Path, specs: list[tuple[str, tuple[int, ...]]]) -> Path:
    """``model.onnx`` (Conv stem, Flatten, Gemm chain) with every initializer in ``weights.bin``."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED + 1)
    initializers = []
    offset = 0
    with (folder / "weights.bin").open("wb") as fh:
        for name, shape in specs:
            pad = -offset % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            nbytes = math.prod(shape) * 4
            for chunk in chunks(rng, math.prod(shape)):
                fh.write(chunk)
            init = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(init)
            offset += nbytes
    nodes = []
    x = "input"
    convs = [n[: -len(".weight")] for n, s in specs if n.endswith(".weight") and len(s) == 4]
    gemms = [n[: -len(".weight")] for n, s in specs if n.endswith(".weight") and len(s) == 2]
    for i, layer in enumerate(convs):
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{layer}.weight", f"{layer}.bias"],
                [f"conv{i}"],
                name=layer,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu_c{i}"]))
        x = f"relu_c{i}"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    x = "flat"
    for i, layer in enumerate(gemms):
        nodes.append(
            helper.make_node("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], [f"gemm{i}"], name=layer, transB=1)
        )
        if i < len(gemms) - 1:
            nodes.append(helper.make_node("Relu", [f"gemm{i}"], [f"relu_g{i}"]))
            x = f"relu_g{i}"
        else:
            x = f"gemm{i}"
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 512, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4096])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_inspect")
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def measure(cmd: list[str]) -> dict[str, object]:
    """One run of ``cmd`` in a fresh wrapper: wall seconds, child peak RSS (KiB), exit code, output."""
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(cmd)], check=True, capture_output=True, text=True, cwd=ROOT
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def bench(cmd: list[str], runs: int) -> dict[str, object]:
    """Median wall time and peak RSS of ``runs`` runs of ``cmd`` after one untimed warm-up."""
    measure(cmd)
    results = [measure(cmd) for _ in range(runs)]
    failed = next((r for r in results if r["rc"] != 0), None)
    walls = [float(r["wall"]) for r in results]  # type: ignore[arg-type]
    return {
        "wall": statistics.median(walls),
        "range": (min(walls), max(walls)),
        "rss_mib": statistics.median(int(r["rss_kib"]) for r in results) / 1024,  # type: ignore[call-overload]
        "rc": 0 if failed is None else failed["rc"],
        "stdout": results[-1]["stdout"],
        "stderr": (failed or results[-1])["stderr"],
    }


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_model(label: str, model: Path, hashed: list[Path], runs: int) -> dict[str, object]:
    inspect = bench([sys.executable, "-m", "auditor", "inspect", str(model), "--json"], runs)
    sha = bench(["sha256sum", *map(str, hashed)], runs)
    hashlib_sha = bench([sys.executable, "-c", HASHLIB, *map(str, hashed)], runs)
    row: dict[str, object] = {
        "label": label,
        "size": sum(p.stat().st_size for p in hashed),
        "inspect": inspect,
        "sha": sha,
        "hashlib": hashlib_sha,
    }
    if inspect["rc"] != 0:
        line = str(inspect["stderr"]).strip().splitlines()
        row["failure"] = f"exit {inspect['rc']}: {line[-1] if line else '(no message)'}"
        return row
    info = json.loads(str(inspect["stdout"]))
    row["layers"] = info["totals"]["layers"]
    row["parameters"] = info["totals"]["parameters"]
    return row


def baseline(runs: int) -> dict[str, object]:
    """Start-up alone: the imports ``inspect`` needs (torch among them), no model."""
    code = "import auditor.cli.root, auditor.audit.load, auditor.formats.safetensors"
    return bench([sys.executable, "-c", code], runs)


def table(rows: list[dict[str, object]], base: dict[str, object]) -> str:
    lines = [
        "| model | bytes on disk | layers | `inspect --json` wall (s) [min-max] | peak RSS (MiB) "
        "| `sha256sum` wall (s) | hashlib sha256 wall (s) | inspect / sha256sum |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ins, sha, hl = row["inspect"], row["sha"], row["hashlib"]
        assert isinstance(ins, dict) and isinstance(sha, dict) and isinstance(hl, dict)
        size = f"{int(row['size']) / 1e9:.2f} GB"  # type: ignore[call-overload]
        if "failure" in row:
            lines.append(
                f"| {row['label']} | {size} | - | failed: {row['failure']} | - | {sha['wall']:.2f} "
                f"| {hl['wall']:.2f} | - |"
            )
            continue
        lines.append(
            f"| {row['label']} | {size} | {row['layers']} "
            f"| {ins['wall']:.2f} [{ins['range'][0]:.2f}-{ins['range'][1]:.2f}] "
            f"| {ins['rss_mib']:.0f} "
            f"| {sha['wall']:.2f} | {hl['wall']:.2f} | {ins['wall'] / sha['wall']:.2f} |"
        )
    lines.append(
        f"| start-up only (import auditor, torch; no model) | - | - | {base['wall']:.2f} | {base['rss_mib']:.0f} "
        "| - | - | - |"
    )
    return "\n".join(lines)


def reading(rows: list[dict[str, object]], base: dict[str, object]) -> list[str]:
    """How to read the table, with this run's numbers."""
    ok = [r for r in rows if "failure" not in r]
    if not ok:
        return []
    extra = max(float(r["inspect"]["rss_mib"]) for r in ok) - float(base["rss_mib"])  # type: ignore[index]
    return [
        f"Peak memory is the interpreter with torch imported ({base['rss_mib']:.0f} MiB) plus at most {extra:.0f} MiB: "
        "`inspect` parses the header (or protobuf) and hashes every file with 1 MiB buffered reads, which do not "
        "count in RSS; the weights themselves are never read (touched pages of a memory map would count). "
        "Wall time is start-up plus one hashing pass. coreutils `sha256sum` is slower here than Python's "
        "hashlib (OpenSSL uses the CPU's SHA extensions), hence ratios below 1; the machine is shared with other "
        "jobs, so single runs vary (min-max shown).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--size-gb", type=float, default=2.0, help="approximate size of each model")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per command (median reported)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    args = parser.parse_args()

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    specs = layer_specs(int(args.size_gb * 1e9))
    st_path, onnx_dir = work / "bench.safetensors", work / "bench_onnx"
    try:
        print(f"writing {st_path} ({len(specs)} tensors) ...", flush=True)
        write_safetensors(st_path, specs)
        print(f"writing {onnx_dir}/model.onnx + weights.bin ...", flush=True)
        onnx_path = write_onnx(onnx_dir, specs)
        rows = []
        print("timing safetensors ...", flush=True)
        rows.append(run_model("safetensors, one file", st_path, [st_path], args.runs))
        print("timing onnx ...", flush=True)
        onnx_files = [onnx_path, onnx_dir / "weights.bin"]
        rows.append(run_model("ONNX, external `weights.bin`", onnx_path, onnx_files, args.runs))
        base = baseline(args.runs)
    finally:
        if not args.keep:
            st_path.unlink(missing_ok=True)
            shutil.rmtree(onnx_dir, ignore_errors=True)
    for row in rows:
        if "failure" in row:
            print(f"{row['label']}: auditor inspect failed: {row['failure']}", file=sys.stderr)
    cmd = "python benchmarks/bench_inspect.py" + (f" --size-gb {args.size_gb:g}" if args.size_gb != 2.0 else "")
    cmd += f" --runs {args.runs}" if args.runs != 3 else ""
    cpus = len(os.sched_getaffinity(0))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores, {ram_gib:.0f} GiB RAM, Linux "
            f"{platform.release()}, Python {platform.python_version()}; medians of {args.runs} runs after one "
            "warm-up, warm page cache.",
            "",
            table(rows, base),
            "",
            *reading(rows, base),
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section("bench_inspect", "## `auditor inspect` on 2 GB models", section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
