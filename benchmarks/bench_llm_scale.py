"""Benchmark ``auditor inspect`` and ``auditor audit`` on a Llama-2-7B-shaped checkpoint: wall time and peak memory
against hashing the same files in parallel on every core (every byte must be hashed once: the physical limit).

A plain script, not part of the test run::

    python benchmarks/bench_llm_scale.py [--workdir benchmarks/out/llm] [--runs 3] [--write-docs]

It writes, sparse (the data regions are holes: no disk is used, and they read as zeros, which are valid weights
in every type), in ``--workdir``, one after the other (each checkpoint is measured, then deleted before the next
is written, so that each has the page cache to itself):

* ``llama7b-bf16/``: Llama-2-7B's 291 tensors in bfloat16 (13.5 GB) as three safetensors shards with
  ``model.safetensors.index.json``, as ``save_pretrained`` writes them;
* ``llama7b-q8_0.gguf``: the same model as llama.cpp writes it in Q8_0 (7.2 GB);
* ``owner_bundle.json``: a Greedy Residuals bundle marking three layers of those shapes (the first block's MLP),
  made with the owner API on a stand-in module of the three layers.

The commands run in rounds, interleaved (hash, hash all at once, inspect, audit; then again), so that a load
that comes and goes on a shared machine falls on all of them alike; one untimed round first warms the page
cache. Each run is a fresh wrapper (as in bench_inspect.py) that reports the wall time, the CPU seconds of the
command's processes together, and the peak RSS of the largest of them (the auditor itself; its hashing
processes hold about 10 MB each); the tables show medians. The yardstick is the same files hashed in parallel
with Python's hashlib (OpenSSL), one thread per file and at most one per core, as issue 17 states it; beside
it, every file hashed at once (one thread each, the cores shared by the operating system: no core idles while
the last shard is hashed alone), the stricter floor when there are more files than cores. For one file both
are one pass.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _docs import ROOT, write_section

sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 32000, 4096, 11008, 32, 32
MARKED = [f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


def llama_shapes(
    hidden: int = HIDDEN, layers: int = LAYERS, inter: int = INTER, vocab: int = VOCAB
) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama's tensors in the order ``save_pretrained`` writes them; by default Llama-2-7B's (291 tensors,
    6.74 billion weights)."""
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        specs += [(f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden))]
        specs += [(f"{p}.mlp.down_proj.weight", (hidden, inter))]
        specs += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def write_sharded(
    folder: Path,
    shards: int = 3,
    specs: list[tuple[str, tuple[int, ...]]] | None = None,
    data: Callable[[int, str, tuple[int, ...]], Any] | None = None,
) -> list[Path]:
    """bf16 safetensors shards of ``specs`` (Llama-2-7B's by default) and their index; returns the shard paths.
    ``data(i, name, shape)`` gives tensor ``i``'s bytes (anything ``write`` takes); without it the data
    regions are holes (sparse: no disk used, read as zeros)."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = llama_shapes() if specs is None else specs
    total = sum(math.prod(s) for _, s in specs) * 2
    groups: list[list[tuple[int, str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    used = 0
    for i, (name, shape) in enumerate(specs):
        groups[min(shards - 1, used * shards // total)].append((i, name, shape))
        used += math.prod(shape) * 2
    weight_map, paths = {}, []
    for n, group in enumerate(groups):
        path = folder / f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, name, shape in group:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = path.name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with path.open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            if data is None:
                fh.truncate(8 + len(raw) + offset)
            else:
                for i, name, shape in group:
                    fh.write(data(i, name, shape))
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return paths


def write_gguf_file(path: Path) -> Path:
    """The same model as a sparse Q8_0 GGUF file (norms in F32, as llama.cpp keeps them)."""
    from auditor.toolkit.gguf import GGUFTensor, write_gguf

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    tensors = []
    for name, shape in llama_shapes():
        if name not in names:
            _, _, i, *rest = name.split(".")
            names[name] = f"blk.{i}.{short['.'.join(rest[:-1])]}.weight"
        tensors.append(GGUFTensor(names[name], shape, "F32" if len(shape) == 1 else "Q8_0"))
    meta = {"general.architecture": "llama", "llama.block_count": LAYERS, "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": HEADS, "llama.embedding_length": HIDDEN}  # fmt: skip
    return write_gguf(path, tensors, meta, sparse=True)


def write_bundle(folder: Path) -> Path:
    """A Greedy Residuals owner bundle for the three MLP matrices of the first block, at their 7B shapes."""
    import torch
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from torch import nn

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
    mlp.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
    mlp.down_proj = nn.Linear(INTER, HIDDEN, bias=False)
    block = nn.Module()
    block.mlp = mlp
    inner = nn.Module()
    inner.layers = nn.ModuleList([block])
    model = nn.Module()
    model.model = inner
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) bench", layers=MARKED)
    stand_in = folder / "stand_in.bin"
    stand_in.write_bytes(b"stand-in for the released model")
    bundle = folder / "owner_bundle.json"
    wm.save_bundle(bundle, model, model_file=stand_in)
    return bundle


#: The yardstick: Python's hashlib (OpenSSL's SHA-256, the fastest on this machine: coreutils' sha256sum took
#: twice as long) over every file, one thread per file and at most WORKERS at once (0: every file at once),
#: 1 MiB reads.
PARALLEL_HASH = """
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
def one(name):
    digest = hashlib.sha256()
    with open(name, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
workers = int(sys.argv[1]) or len(sys.argv) - 2
with ThreadPoolExecutor(workers) as pool:
    for name, sha in zip(sys.argv[2:], pool.map(one, sys.argv[2:])):
        print(sha, name)
"""


def hash_cmd(files: list[Path], *, at_once: bool = False) -> list[str]:
    """Every file hashed once, in parallel: one thread per file, at most one per core (or all at once)."""
    workers = 0 if at_once else len(os.sched_getaffinity(0))
    return [sys.executable, "-c", PARALLEL_HASH, str(workers), *map(str, files)]


#: bench_inspect.py's wrapper, with the CPU seconds (user and system) of the command and every process it waited
#: for (the auditor's hashing processes included) beside the wall time and the largest peak RSS among them.
WRAPPER = """
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_kib": usage.ru_maxrss, "rc": proc.returncode,
           "stderr": proc.stderr.decode("utf-8", "replace")}, sys.stdout)
"""


def measure(cmd: list[str]) -> dict[str, object]:
    """One run of ``cmd`` in a fresh wrapper: wall and CPU seconds, peak RSS (KiB), exit code, stderr."""
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(cmd)], check=True, capture_output=True, text=True, cwd=ROOT
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def rounds(commands: dict[str, list[str]], runs: int) -> dict[str, dict[str, float]]:
    """Each command once per round, one untimed round first, ``runs`` timed rounds; median wall (s) and peak
    RSS (MiB) per command, with the fastest and slowest wall."""
    timed: dict[str, list[dict[str, object]]] = {name: [] for name in commands}
    for n in range(runs + 1):
        for name, cmd in commands.items():
            result = measure(cmd)
            if result["rc"] not in (0, 1):  # audit: 1 is "not found", the expected answer for zero weights
                raise SystemExit(f"{name} failed ({result['rc']}): {result['stderr']}")
            if n:
                timed[name].append(result)
    summary = {}
    for name, results in timed.items():
        walls = [float(r["wall"]) for r in results]  # type: ignore[arg-type]
        rss = statistics.median(int(r["rss_kib"]) for r in results) / 1024  # type: ignore[call-overload]
        cpu = statistics.median(float(r["cpu"]) for r in results)  # type: ignore[arg-type]
        summary[name] = {"wall": statistics.median(walls), "min": min(walls), "max": max(walls), "rss_mib": rss,
                         "cpu": cpu}  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "llm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (both on disk at once)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="also time another version's inspect and audit in the same rounds: DIR holds its auditor package "
        "(git archive REV auditor | tar -x -C DIR), run with this environment's Python and packages",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=("sharded", "gguf"), help="measure one checkpoint only (not with --write-docs: the section"
        " shows both)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.only and args.write_docs:
        parser.error("--only does not go with --write-docs")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    bundle = write_bundle(work)
    auditor = str(Path(sys.executable).with_name("auditor"))
    checkpoints = (
        ("sharded bf16 safetensors, 3 shards", lambda: write_sharded(work / "llama7b-bf16")),
        ("GGUF Q8_0, one file", lambda: [write_gguf_file(work / "llama7b-q8_0.gguf")]),
    )
    if args.only:
        checkpoints = checkpoints[:1] if args.only == "sharded" else checkpoints[1:]
    rows, loads = [], [os.getloadavg()[0]]
    for label, write in checkpoints:
        files = write()
        target = files[0].parent if len(files) > 1 else files[0]
        commands = {
            "hash": hash_cmd(files),
            "hash all at once": hash_cmd(files, at_once=True),
            "inspect": [auditor, "inspect", str(target), "--json"],
            "audit": [auditor, "audit", str(target), "--bundle", str(bundle), "--json"],
        }
        if args.baseline is not None:
            path = f"PYTHONPATH={args.baseline.resolve()}"
            before = ["env", path, "PYTHONSAFEPATH=1", sys.executable, "-m", "auditor"]
            commands["inspect before"] = [*before, "inspect", str(target), "--json"]
            commands["audit before"] = [*before, "audit", str(target), "--bundle", str(bundle), "--json"]
        result = rounds(commands, args.runs)
        loads.append(os.getloadavg()[0])
        size = sum(f.stat().st_size for f in files)
        rows.append((label, size, result))
        shown = {k: f"{v['wall']:.1f} s {v['rss_mib']:.0f} MiB" for k, v in result.items()}
        print(label, f"{size / 1e9:.1f} GB", shown)
        if not args.keep and target.is_dir():
            shutil.rmtree(target)
        elif not args.keep:
            target.unlink()
    if not args.keep:
        shutil.rmtree(work)
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"Llama-2-7B shapes (291 tensors), files written sparse; {cores} cores, {platform.machine()}, "
        f"Python {platform.python_version()}; medians of {args.runs} interleaved rounds after a warm-up round; "
        f"load average (1 min) {', '.join(f'{x:.1f}' for x in loads)} before and after each checkpoint. "
        f"Command: `python benchmarks/bench_llm_scale.py {' '.join(sys.argv[1:])}`.",
        "",
        "| checkpoint | size | hash, one thread per core | hash, all files at once | inspect | inspect / hash "
        "| peak RSS | audit (GR, 3 layers) | audit / hash | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, size, r in rows:
        base, inspect, audit = r["hash"]["wall"], r["inspect"], r["audit"]
        lines.append(
            f"| {label} | {size / 1e9:.1f} GB | {base:.1f} s | {r['hash all at once']['wall']:.1f} s | "
            f"{inspect['wall']:.1f} s | {inspect['wall'] / base:.2f}x | {inspect['rss_mib']:.0f} MiB | "
            f"{audit['wall']:.1f} s | {audit['wall'] / base:.2f}x | {audit['rss_mib']:.0f} MiB |"
        )
    if args.baseline is not None:
        lines += [
            "",
            f"The version before, in the same rounds (`--baseline`, {args.baseline.name}): the same commands of an"
            " older auditor package with this environment's packages.",
            "",
            "| checkpoint | inspect before | / hash | peak RSS | audit before | / hash | peak RSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, _, r in rows:
            base, inspect, audit = r["hash"]["wall"], r["inspect before"], r["audit before"]
            lines.append(
                f"| {label} | {inspect['wall']:.1f} s | {inspect['wall'] / base:.2f}x | {inspect['rss_mib']:.0f} MiB"
                f" | {audit['wall']:.1f} s | {audit['wall'] / base:.2f}x | {audit['rss_mib']:.0f} MiB |"
            )
    lines += ["", "Fastest and slowest of the timed runs, and CPU seconds (user and system, the command's processes"
              " together; medians):", ""]  # fmt: skip
    for label, _, r in rows:
        spread = "; ".join(f"{name} {v['min']:.1f}-{v['max']:.1f} s, CPU {v['cpu']:.1f} s" for name, v in r.items())
        lines.append(f"* {label}: {spread}")
    print("\n".join(lines))
    if args.write_docs:
        write_section("bench_llm_scale", "## A 7-billion-parameter checkpoint: inspect and audit", "\n".join(lines))


if __name__ == "__main__":
    main()
