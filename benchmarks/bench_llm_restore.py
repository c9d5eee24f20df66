"""Benchmark ``restore-transformer`` on a Llama-2-7B-shaped suspect whose attention heads and MLP units are
permuted in every block: wall time and peak memory of the restore stage.

A plain script, not part of the test run::

    python benchmarks/bench_llm_restore.py [--layers 32] [--hidden 4096] [--workdir DIR] [--keep] [--write-docs]

It writes into ``--workdir``, one tensor at a time (the script never holds more than one tensor):

* ``reference/``: Llama-2-7B's 291 tensors (at ``--hidden 4096 --layers 32``; narrower or shallower with the
  options) filled with seeded normal values (std 0.02; norm weights 1 + 0.1 N(0, 1)) in bfloat16, as three
  safetensors shards with ``model.safetensors.index.json`` and ``config.json``, as ``save_pretrained`` writes
  them: 13.5 GB of real values, not sparse;
* ``suspect/``: the same weights with the heads (Q, K, V rows per head, O columns) and the MLP units (gate
  and up rows, down columns) in a seeded random order in every block.

What is timed is the restore stage alone: a fresh process loads both folders (``auditor.audit.load``) and runs
``run_restorers`` with ``restore-transformer`` only, guard included, as ``auditor audit SUSPECT --reference REF``
does before its detectors. The full ``audit`` also runs the channel restorers (orders 10-40), whose plan reads
every weight of both models as float32 (54 GB at this shape): that is not what this benchmark measures. The
process is started by bench_inspect.py's wrapper, which reports the child's own peak RSS; one run (no warm-up:
the files were just written, and they do not fit the page cache together). Afterwards the same process reads
every restored tensor and compares it with the reference's (outside the timed part, inside the RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from _docs import ROOT, write_section
from bench_inspect import measure
from bench_llm_scale import llama_shapes, write_sharded

sys.path.insert(0, str(ROOT))

SEED = 1234
SHARDS = 3

#: The timed child: load both folders, run restore-transformer alone, then check every restored tensor.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.plugins.restore.heads import TransformerRestorer
timings = {}
class Timed(TransformerRestorer):  # the same restorer, its two stages timed
    def rewrite(self, s, r):
        t = time.perf_counter()
        out = super().rewrite(s, r)
        timings["matching and rewrite"] = time.perf_counter() - t
        return out
    def judge(self, rewritten, r):
        t = time.perf_counter()
        out = super().judge(rewritten, r)
        timings["guard"] = time.perf_counter() - t
        return out
suspect, reference = load_model(sys.argv[1]), load_model(sys.argv[2])
t1 = time.perf_counter()
graph, log = run_restorers(suspect, reference, restorers=[Timed()])
t2 = time.perf_counter()
refs = {(l.name, r): t for l in reference.layers for r, t in l.params.items()}
worst, checked = 0.0, 0
for layer in graph.layers:
    for role, t in layer.params.items():
        a, b = t.read(float32=True), refs[layer.name, role].read(float32=True)
        worst = max(worst, float((a - b).abs().max()))
        checked += 1
entry = log[0]
out = {"load_s": t1 - t0, "restore_s": t2 - t1, "check_s": time.perf_counter() - t2, "status": entry["status"],
       "checked": checked, "max_abs_difference": worst}
if entry["status"] == "ok":
    steps = entry["log"].get("steps", [])
    out.update(acted=entry["log"]["acted"], reason=entry["log"]["reason"],
               score=entry["log"].get("evidence", {}).get("score"),
               blocks=sum(1 for s in steps if s["step"] == "block"),
               heads_moved=sum(s.get("heads_moved", 0) for s in steps),
               units_moved=sum(s.get("units_moved", 0) for s in steps),
               clear_units=sum(s.get("units_clear", 0) for s in steps),
               timings={k: round(v, 1) for k, v in timings.items()})
else:
    out["error"] = entry.get("error")
print(json.dumps(out))
"""


#: The worst case for the matching: one block's MLP units of two unrelated models (nothing is a clear pair).
UNRELATED_BLOCK = """
import json, sys, time, torch
from auditor.plugins.restore import pairs
units, hidden = int(sys.argv[1]), int(sys.argv[2])
def parts(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(units, hidden, generator=g) for _ in range(3)]
t = time.perf_counter()
m = pairs.match(parts(0), parts(1), consume=True)
print(json.dumps({"seconds": time.perf_counter() - t, "clear": m.clear, "ambiguous": m.ambiguous}))
"""


def shapes(hidden: int, layers: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama's tensors in the order ``save_pretrained`` writes them (bench_llm_scale's, at these sizes)."""
    return llama_shapes(hidden, layers, inter, vocab)


def _values(index: int, name: str, shape: tuple[int, ...]) -> object:
    """The reference's tensor ``index`` (seeded per tensor, so the suspect regenerates it), in bfloat16."""
    import torch

    gen = torch.Generator().manual_seed(SEED + index)
    if len(shape) == 1:
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def _orders(layers: int, heads: int, inter: int, head_dim: int) -> dict[int, tuple[object, object]]:
    """Per block: the row order of Q/K/V (heads moved whole) and the MLP unit order."""
    import torch

    gen = torch.Generator().manual_seed(SEED - 1)
    out = {}
    for i in range(layers):
        head_order = torch.randperm(heads, generator=gen)
        rows = (head_order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        out[i] = (rows, torch.randperm(inter, generator=gen))
    return out


def _permuted(name: str, t: object, orders: dict[int, tuple[object, object]]) -> object:
    import torch

    assert isinstance(t, torch.Tensor)
    if ".layers." not in name or t.ndim != 2:
        return t
    rows, units = orders[int(name.split(".")[2])]
    if any(x in name for x in ("q_proj", "k_proj", "v_proj")):
        return t[rows]
    if "o_proj" in name:
        return t[:, rows]
    if "gate_proj" in name or "up_proj" in name:
        return t[units]
    return t[:, units]  # down_proj


def write_model(folder: Path, specs: list[tuple[str, tuple[int, ...]]], config: dict[str, object],
                orders: dict[int, tuple[object, object]] | None) -> list[Path]:  # fmt: skip
    """Shards, index and config.json (bench_llm_scale's writer, with values); ``orders`` permutes the
    suspect's blocks. Returns the shard paths."""
    import torch

    def data(i: int, name: str, shape: tuple[int, ...]) -> object:
        t = _values(i, name, shape)
        if orders is not None:
            t = _permuted(name, t, orders)
        return t.contiguous().view(torch.int16).numpy()  # type: ignore[attr-defined]

    paths = write_sharded(folder, SHARDS, specs, data)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def llama_config(hidden: int, layers: int, inter: int, vocab: int, heads: int) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False, "max_position_embeddings": 4096}  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _lines(args: argparse.Namespace, size: int, result: dict[str, object], write_s: float) -> Iterator[str]:
    cores = len(os.sched_getaffinity(0))
    child = json.loads(str(result["stdout"]).strip().splitlines()[-1]) if result["rc"] == 0 else {}
    command = " ".join(["python", "benchmarks/bench_llm_restore.py", *sys.argv[1:]])
    yield (f"Llama-2-7B shapes scaled to hidden {args.hidden}, {args.layers} blocks, {args.heads} heads, MLP "
           f"{args.inter}, vocab {args.vocab}; bfloat16, seeded random values, 3 shards each; heads and MLP units "
           f"permuted in every block. {cores} cores, {platform.machine()}, Python {platform.python_version()}; "
           f"one run, the restore stage alone (`restore-transformer`, guard included; see the script's "
           f"docstring). Command: `{command}`.")  # fmt: skip
    yield ""
    yield (
        "| suspect + reference on disk | load | restore (guard included) | process wall | peak RSS | blocks "
        "| heads moved | units moved | units matched as clear pairs | acted | guard score "
        "| restored vs reference, max abs |"
    )
    yield "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if not child:
        yield f"| {size / 1e9:.1f} GB | failed (exit {result['rc']}): {str(result['stderr'])[-300:]} |"
        return
    yield (
        f"| {size / 1e9:.1f} GB | {child['load_s']:.1f} s | {child['restore_s']:.1f} s | "
        f"{float(result['wall']):.1f} s | {int(result['rss_kib']) / 1024:.0f} MiB | {child.get('blocks')} | "
        f"{child.get('heads_moved')} | {child.get('units_moved')} | {child.get('clear_units')} | "
        f"{child.get('acted')} | {child.get('score')} | {child['max_abs_difference']:.3g} |"
    )
    yield ""
    steps = ", ".join(f"{k} {v} s" for k, v in child.get("timings", {}).items())
    yield (f"Inside the restore: {steps}. After it, reading every restored tensor and comparing it with the "
           f"reference's took {child['check_s']:.0f} s (in the process wall time and its RSS, not in the restore). "
           + ("The folders were written by an earlier `--write-only` run of the script (same seeds)."
              if args.reuse else f"Writing both folders took {write_s:.0f} s (not timed)."))  # fmt: skip
    met = float(child["restore_s"]) < 1800 and int(result["rss_kib"]) < 4 * 1024 * 1024
    yield ""
    yield (f"Issue 17's goal for this restore (under 30 minutes and 4 GB on 2 cores): "
           f"{'met' if met else 'not met'} ({float(child['restore_s']) / 60:.1f} min, peak RSS "
           f"{int(result['rss_kib']) / 1024 / 1024:.2f} GiB for the whole process).")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "llm_restore")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 128")
    parser.add_argument("--inter", type=int, default=None, help="default: 11008 * hidden / 4096")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", action="store_true", help="keep the written folders")
    parser.add_argument("--reuse", action="store_true", help="use the folders a --keep run left")
    parser.add_argument("--write-only", action="store_true", help="write the folders and stop (implies --keep)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--unrelated-block",
        action="store_true",
        help="only match one MLP block of two unrelated models (every unit ambiguous) and stop",
    )
    args = parser.parse_args()
    args.heads = args.heads or max(1, args.hidden // 128)
    args.inter = args.inter or 11008 * args.hidden // 4096
    if args.unrelated_block:
        r = measure([sys.executable, "-c", UNRELATED_BLOCK, str(args.inter), str(args.hidden)])
        rss = int(r["rss_kib"]) / 1024
        print(
            f"{r['stdout'].strip()}  process wall {float(r['wall']):.1f} s, peak RSS {rss:.0f} MiB{r['stderr'][-500:]}"
        )
        return
    specs = shapes(args.hidden, args.layers, args.inter, args.vocab)
    config = llama_config(args.hidden, args.layers, args.inter, args.vocab, args.heads)
    ref, sus = args.workdir / "reference", args.workdir / "suspect"
    t0 = time.perf_counter()
    if not (args.reuse and (sus / "config.json").exists()):
        write_model(ref, specs, config, None)
        write_model(sus, specs, config, _orders(args.layers, args.heads, args.inter, args.hidden // args.heads))
    write_s = time.perf_counter() - t0
    size = _folder_bytes(ref) + _folder_bytes(sus)
    print(f"wrote {size / 1e9:.1f} GB in {write_s:.0f} s", flush=True)
    if args.write_only:
        return
    result = measure([sys.executable, "-c", CHILD, str(sus), str(ref)])
    print(result["stdout"], result["stderr"][-2000:], sep="\n")
    lines = "\n".join(_lines(args, size, result, write_s))
    print(lines)
    if not args.keep:
        shutil.rmtree(args.workdir)
    if args.write_docs:
        write_section("bench_llm_restore", "## Restore of a permuted 7-billion-parameter transformer", lines)


if __name__ == "__main__":
    main()
