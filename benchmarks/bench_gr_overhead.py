"""Benchmark the Greedy Residuals embedding term: training-step time with and without it.

A plain script, not part of the test run::

    python benchmarks/bench_gr_overhead.py [--steps 25] [--warmup 3] [--batch 16] [--threads 1] [--write-docs]

The network is a ResNet-18 written here (the CIFAR variant: 3x3 stem, no
max-pool, four stages of two basic blocks, 11.2 M parameters; no torchvision),
trained on CPU with SGD (momentum 0.9) on a fixed random batch of 3x32x32
images. The penalty goes on the default layers (``default_layers``: the three
largest weight matrices below the head, 2.36 M weights each). After
``--warmup`` untimed steps of each kind, ``--steps`` timed steps of each are
interleaved, alternating which kind goes first, so drift on a shared machine
hits both alike; the table shows medians (and min-max) and the overhead ratio
of the medians. The penalty's own forward and backward are timed alone too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _docs import ROOT, write_section
from _models import ResNet18
from cryptography.hazmat.primitives.asymmetric import ed25519

from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

HEADING = "## Greedy Residuals: training-step overhead of the embedding term"
TARGET = 0.05


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f} [{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps of each kind (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18()
    wm = GreedyResidualsWatermark.create(
        model, private_key=ed25519.Ed25519PrivateKey.generate(), message="(c) benchmark"
    )
    params = sum(p.numel() for p in model.parameters())
    marked = ", ".join(f"`{n}`" for n in wm.layer_names)
    marked_weights = sum(model.get_parameter(n).numel() for n in wm.layer_names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    def step(with_penalty: bool) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if with_penalty:
                loss = loss + wm.penalty(model)
            loss.backward()
            optimizer.step()

        return run

    def penalty_alone() -> None:
        model.zero_grad(set_to_none=True)
        wm.penalty(model).backward()

    clean, marked_steps, alone = step(False), step(True), []
    for _ in range(args.warmup):
        clean()
        marked_steps()
        penalty_alone()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps):
        order = (False, True) if i % 2 == 0 else (True, False)
        for kind in order:
            times[kind].append(timed(marked_steps if kind else clean))
        alone.append(timed(penalty_alone))
        print(f"step {i + 1}/{args.steps}: {times[False][-1] * 1e3:.0f} ms, {times[True][-1] * 1e3:.0f} ms", flush=True)

    # Paired: each step with the penalty against the step without it taken next to it, so the
    # machine's drift (other jobs come and go) cancels; the ratio of the two medians is shown as well.
    paired = statistics.median(w - c for w, c in zip(times[True], times[False], strict=True))
    ratio = paired / statistics.median(times[False])
    ratio_of_medians = statistics.median(times[True]) / statistics.median(times[False]) - 1
    share = statistics.median(alone) / statistics.median(times[False])
    cpus = len(os.sched_getaffinity(0))
    cmd = "python benchmarks/bench_gr_overhead.py"
    for flag, value, default in (("--steps", args.steps, 25), ("--warmup", args.warmup, 3),
                                 ("--batch", args.batch, 16), ("--threads", args.threads, 1)):  # fmt: skip
        cmd += f" {flag} {value}" if value != default else ""
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores (shared with other jobs), Linux "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{args.threads} torch thread(s); {args.warmup} warm-up steps of each kind, then {args.steps} timed "
            "steps of each, interleaved; medians [min-max].",
            "",
            "| network | parameters | marked layers | batch | step without penalty (ms) | step with penalty (ms) "
            "| penalty forward+backward alone (ms) | overhead, paired | overhead, ratio of medians |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
            f"| ResNet-18 (CIFAR stem), SGD | {params / 1e6:.2f} M | {marked} ({marked_weights / 1e6:.2f} M weights) "
            f"| {args.batch} x 3x32x32 | {ms(times[False])} | {ms(times[True])} | {ms(alone)} "
            f"| {ratio:+.1%} | {ratio_of_medians:+.1%} |",
            "",
            f'Target: at most {TARGET:.0%}; {"met" if ratio <= TARGET else "NOT met"}. "Paired" is the median of the '
            "differences between each step with the penalty and the step without it timed next to it, over the "
            "median step without it. The penalty timed alone is "
            f"{share:.1%} of the median step without it, a steadier estimate of the same cost than the "
            "difference of two medians on a shared machine. The embedding term costs "
            "one average-pooling pass over each marked layer's weights (to 64,768 cells), a top-k of 127 in each "
            "of 256 rows of 253, and their backward: linear in the marked weights and independent of the batch, "
            "so its share falls as the batch or the input grows.",
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section("bench_gr_overhead", HEADING, section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
