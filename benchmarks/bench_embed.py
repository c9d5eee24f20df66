"""Benchmark embedding: training steps per second with each watermark, per device and precision, and the
share of a step the watermark's own work takes (Greedy Residuals' penalty, HufuNet's write-back).

A plain script, not part of the test run::

    python benchmarks/bench_embed.py [--steps 20] [--warmup 3] [--threads 1] [--devices cpu,cuda] [--write-docs]

Each step is the embedders' own (``auditor.toolkit.training``): the forward pass under autocast for
bf16/fp16, the cross-entropy, the penalty on the float32 weights outside autocast, backward (through a
``GradScaler`` for fp16), the optimizer step, the after-step write-back of HufuNet's frozen kernels.
Two hosts: the width-2 SmallCNN on a batch of 64 digits (the embedders' default host) and a ResNet-18
(CIFAR stem, 11.2 M parameters) on a batch of 32 3x32x32 images, both with Adam. Per host and device
and precision: the step of the plain model, with Greedy Residuals (its default layers), with HufuNet
(EPH frozen in every 3x3 convolution) and with both; the penalty's forward+backward and the write-back
are timed alone as well, and shown as a share of the median step with the watermark. CUDA is measured
when it is available (``torch.cuda.synchronize`` around every timing); devices that are not there are
listed as not run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _docs import ROOT, write_section
from _models import ResNet18
from cryptography.hazmat.primitives.asymmetric import ed25519
from torch import nn

from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.network import DIGITS_WIDTHS, HufuNet
from auditor.plugins.hufunet.owner import plant
from auditor.toolkit import models as zoo
from auditor.toolkit.training import autocast_dtype, grad_scaler

HEADING = "## Embedding steps per second"
SCHEMES = ("none", "greedy-residuals", "hufunet", "both")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _host(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "cnn":
        return zoo.build("cnn", width=2, seed=0), torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    return ResNet18(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def measure(host: str, scheme: str, device: torch.device, precision: str, steps: int, warmup: int) -> dict[str, Any]:
    """Median step time and the watermark's own shares for one configuration."""
    model, x, y = _host(host)
    hufunet = HufuNet(DIGITS_WIDTHS)  # its kernels' values do not change the cost
    embedded = plant(model, hufunet, bytes(32)) if scheme in ("hufunet", "both") else None
    wm = (GreedyResidualsWatermark.create(model, private_key=ed25519.Ed25519PrivateKey.generate(),
                                          message="(c) benchmark") if scheme in ("greedy-residuals", "both")
          else None)  # fmt: skip
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = autocast_dtype(precision, device)
    scaler = grad_scaler(precision, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if wm is not None:
            loss = loss + wm.penalty(model)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if embedded is not None:
            embedded.frozen.after_step(model)

    def penalty_alone() -> None:
        if wm is not None:
            model.zero_grad(set_to_none=True)
            wm.penalty(model).backward()

    def restore_alone() -> None:
        if embedded is not None:
            embedded.frozen.restore()

    for _ in range(warmup):
        step()
        penalty_alone()
        restore_alone()
    times, penalty, restore = [], [], []
    for _ in range(steps):
        times.append(timed(step, device))
        penalty.append(timed(penalty_alone, device))
        restore.append(timed(restore_alone, device))
    if embedded is not None:
        embedded.frozen.detach()
        assert embedded.frozen.intact(), "EPH moved during the benchmark"
    median = statistics.median(times)
    return {
        "step_ms": median * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "steps_per_s": 1 / median,
        "penalty_share": statistics.median(penalty) / median if wm is not None else None,
        "restore_share": statistics.median(restore) / median if embedded is not None else None,
        "marked": ", ".join(wm.layer_names) if wm is not None else "",
        "eph_fraction": embedded.eph_fraction if embedded is not None else None,
    }  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--devices", default="cpu,cuda", help="devices to measure where present")
    parser.add_argument("--hosts", default="cnn,resnet18", help="hosts: cnn (width 2, digits) and/or resnet18")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, missing = [], []
    for dev in args.devices.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            missing.append("cuda (no GPU on this machine)")
            continue
        device = torch.device(dev)
        for host in args.hosts.split(","):
            # fp16 on the CPU runs through slow emulation (20 times fp32 on the small host): measured there only.
            precisions = ("fp32", "bf16", "fp16") if dev != "cpu" or host == "cnn" else ("fp32", "bf16")
            for precision in precisions:
                for scheme in SCHEMES:
                    r = measure(host, scheme, device, precision, args.steps, args.warmup)
                    rows.append((host, dev, precision, scheme, r))
                    print(f"{host} {dev} {precision} {scheme}: {r['step_ms']:.1f} ms, {r['steps_per_s']:.1f} steps/s, "
                          f"penalty {_pct(r['penalty_share'])}, write-back {_pct(r['restore_share'])}",
                          flush=True)  # fmt: skip

    names = {"cnn": "SmallCNN width 2, 64 x 1x8x8", "resnet18": "ResNet-18, 32 x 3x32x32"}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cmd = "python benchmarks/bench_embed.py"
    for flag, value, default in (("--steps", args.steps, 20), ("--warmup", args.warmup, 3),
                                 ("--threads", args.threads, 1), ("--hosts", args.hosts, "cnn,resnet18")):  # fmt: skip
        cmd += f" {flag} {value}" if value != default else ""
    lines = [
        f"Command: `{cmd} --write-docs`. Machine: {len(os.sched_getaffinity(0))} CPU cores (shared with other "
        f"jobs), GPU: {gpu}; Linux {platform.release()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, {args.threads} torch thread(s); Adam; {args.warmup} warm-up steps, then "
        f"{args.steps} timed steps per row; median step [min-max].",
        "",
        "| host, batch | device | precision | watermark | step (ms) | steps/s | penalty share | write-back share |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for host, dev, precision, scheme, r in rows:
        lines.append(f"| {names[host]} | {dev} | {precision} | {scheme} | {r['step_ms']:.1f} "
                     f"[{r['min_ms']:.1f}-{r['max_ms']:.1f}] | {r['steps_per_s']:.1f} | {_pct(r['penalty_share'])} "
                     f"| {_pct(r['restore_share'])} |")  # fmt: skip
    if missing:
        lines += ["", f"Not run here: {', '.join(missing)}. The GPU rows are still to be measured on a machine "
                  "with one (same command)."]  # fmt: skip
    lines += [
        "",
        "The penalty share is Greedy Residuals' embedding term (forward and backward, on the float32 weights, "
        "timed alone) over the median step with the watermark; the write-back share is HufuNet's "
        "`FrozenKernels.restore` (timed alone) over the same. Both are independent of the batch. On the CPU, "
        "fp16 autocast runs through slow kernels (6 to 20 times fp32 on the small host, so the ResNet-18 is not "
        "run in fp16 there), and what bf16 gains depends on the CPU's bfloat16 support. The machine was shared "
        "with other jobs, so rows measured minutes apart can differ by up to two times: compare the watermarks "
        "within one host and precision. Mixed precision is for GPUs, where these rows are still to be measured.",
    ]
    section = "\n".join(lines)
    print(section)
    if args.write_docs:
        written = write_section("bench_embed", HEADING, section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
