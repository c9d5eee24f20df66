"""HufuNet placement and retrieval at the paper's scale: ~35,000 EPH kernels in a ~1,000,000-kernel host.

EPH is a HufuNet of the paper's widths (32, 64, 128, 128, 64 on 3 input
channels: 34,912 kernels, seeded random weights: placement depends only on the
values, not on training). The host is four 512x512 3x3 convolutions (1,048,576
kernels, 9.4 M weights) written to a safetensors file. Timed, each as the
median of ``--repeats`` runs: ``place`` (34,912 HMAC-SHA256 + probing),
writing EPH into the host, and the detector's side, which loads the suspect
file, reads the host tensors and retrieves EPH at the recomputed positions.

    python benchmarks/bench_hufunet_placement.py [--repeats 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _docs import ROOT, write_section
from safetensors.torch import save_file

from auditor.audit.load import load_model
from auditor.plugins.hufunet.network import HufuNet
from auditor.plugins.hufunet.placement import HostView, embed, eph_kernels, place, retrieve

HEADING = "## HufuNet: placing and retrieving 35k EPH kernels in a 1M-kernel host"
PAPER_WIDTHS = (32, 64, 128, 128, 64)
KEY = bytes(range(32))


def _timed(fn: object, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times, result


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:,.0f} [{min(values) * 1e3:,.0f}-{max(values) * 1e3:,.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each step (median reported)")
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    net = HufuNet(PAPER_WIDTHS, in_channels=3, num_classes=10)
    eph = eph_kernels([c.weight for c in net.conv_layers()])
    host = {f"features.{i}.weight": torch.randn(512, 512, 3, 3) * 0.02 for i in range(4)}
    view = HostView.from_tensors(list(host.items()))

    place_times, positions = _timed(lambda: place(eph, KEY, view.n), args.repeats)
    assert isinstance(positions, list)
    embed_times, _ = _timed(lambda: embed(view, eph, positions), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "host.safetensors"
        save_file(host, path)
        size = path.stat().st_size

        def detect_side() -> torch.Tensor:
            graph = load_model(path)
            suspect = HostView.from_graph(graph)
            return retrieve(suspect, place(eph, KEY, suspect.n))

        detect_times, got = _timed(detect_side, args.repeats)
    assert isinstance(got, torch.Tensor) and torch.equal(got, eph), "retrieval must give EPH back bit for bit"
    retrieve_times, _ = _timed(lambda: retrieve(view, positions), args.repeats)

    cpus = len(os.sched_getaffinity(0))
    cmd = "python benchmarks/bench_hufunet_placement.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
    section = "\n".join(
        [
            f"Command: `{cmd} --write-docs`. Machine: {cpus} CPU cores (shared with other jobs), Linux "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s); medians [min-max] of {args.repeats} runs.",
            "",
            "| step | EPH kernels | host kernels | time (ms) |",
            "|---|---:|---:|---:|",
            f"| `place`: HMAC-SHA256 positions with linear probing | {eph.shape[0]:,} | {view.n:,} "
            f"| {ms(place_times)} |",
            f"| `embed`: write EPH into the host tensors | {eph.shape[0]:,} | {view.n:,} | {ms(embed_times)} |",
            f"| `retrieve` from tensors in memory | {eph.shape[0]:,} | {view.n:,} | {ms(retrieve_times)} |",
            f"| detector side: load the {size / 2**20:.0f} MiB safetensors file, read the host, recompute "
            f"positions, retrieve | {eph.shape[0]:,} | {view.n:,} | {ms(detect_times)} |",
            "",
            "EPH is a HufuNet of the paper's widths (32, 64, 128, 128, 64) on 3 input channels with seeded random "
            "weights; the host is four 512x512 3x3 convolutions. Retrieval gave EPH back bit for bit. Placement "
            "costs one HMAC per EPH kernel plus probing, so it grows with K, not with the host: the 1M-kernel "
            "host costs only its 1 MiB occupancy table.",
        ]
    )
    print(section)
    if args.write_docs:
        written = write_section("bench_hufunet_placement", HEADING, section)
        print(f"wrote {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
