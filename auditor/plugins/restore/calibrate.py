"""Calibrate the guard: how similar do independently trained models look to a reference, and derived ones?

A command, not part of an audit::

    python -m auditor.plugins.restore.calibrate [--arch cnn resnet] [--models 12] [--epochs 8]

For each architecture it trains a reference on the bundled digits, then
``--models`` independent models (other initialisation, other shuffling, other
train/test split) and a few derived ones (fine-tuned gently and hard, on
another split; permuted and rescaled), saves each as a suspect would be
(safetensors) and prints the guard's score of each against the reference
(loaded from its PyTorch file), as a Markdown table for docs/restore.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from auditor.audit.load import load_model
from auditor.plugins.restore import guard
from auditor.plugins.restore.plan import make_plan
from auditor.toolkit import data as datasets
from auditor.toolkit import edits as attacks
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.channels import Tensors

__all__ = ["calibrate", "main", "score"]


def score(model: nn.Module, reference_file: Path, folder: Path, stem: str) -> float:
    """The guard's score of ``model`` (saved as ``folder/stem.safetensors``) against the reference file."""
    files = training.save_model(model, folder, stem, overwrite=True)
    plan = make_plan(load_model(files["safetensors"]), load_model(reference_file))
    evidence = guard.assess(plan.matches.values())
    return float("nan") if evidence.score is None else evidence.score


def _load(model: nn.Module, tensors: Tensors) -> nn.Module:
    edited = copy.deepcopy(model)
    edited.load_state_dict({f"{m}.{r}": v for m, params in tensors.items() for r, v in params.items()})
    return edited


def _train(arch: str, seed: int, epochs: int, split_seed: int) -> nn.Module:
    model = zoo.build(arch, seed=seed)
    data = datasets.digits(split_seed=split_seed)
    training.train(model, data.train, training.TrainConfig(epochs=epochs, lr=1e-2, seed=seed))
    return model.eval()


def calibrate(arch: str, models: int, epochs: int, folder: Path, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Scores of ``models`` independent and a few derived models against one reference."""
    reference = _train(arch, 1000, epochs, 0)
    ref_file = training.save_model(reference, folder, f"{arch}_reference", overwrite=True)["pt"]
    scores: dict[str, list[float]] = {"independent": [], "derived": []}
    for i in range(models):
        s = score(_train(arch, i, epochs, split_seed=i + 1), ref_file, folder, f"{arch}_independent{i}")
        scores["independent"].append(s)
        log(f"{arch} independent {i}: {s:.4f}")
    other, _ = datasets.split(datasets.digits(split_seed=1), 0.5, seed=7)
    for lr in (1e-3, 1e-2):
        tuned = copy.deepcopy(reference).train()
        training.train(tuned, other, training.TrainConfig(epochs=10, lr=lr, seed=3))
        s = score(tuned.eval(), ref_file, folder, f"{arch}_tuned")
        scores["derived"].append(s)
        log(f"{arch} fine-tuned 10 epochs at lr {lr:g}: {s:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "graph.onnx"
        _export(reference, onnx)
        graph = load_model(onnx)
        permuted, _ = attacks.permute(graph, attacks.module_tensors(reference), seed=5)
        edited = attacks.negate(graph, attacks.scale(graph, permuted, seed=6), seed=7)
    s = score(_load(reference, edited), ref_file, folder, f"{arch}_edited")
    scores["derived"].append(s)
    log(f"{arch} permuted, rescaled and negated: {s:.4f}")
    return scores


def _export(model: nn.Module, path: Path) -> None:
    import contextlib
    import io
    import warnings

    quiet = io.StringIO()  # the exporter prints its progress
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, do_constant_folding=False)


def main() -> None:
    """Run the calibration and print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["cnn", "resnet"], choices=sorted(zoo.ARCHITECTURES))
    parser.add_argument("--models", type=int, default=12, help="independent models per architecture")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            s = calibrate(arch, args.models, args.epochs, Path(tmp), print)
            ind = s["independent"]
            rows.append(
                f"| {arch} | {len(ind)} | {min(ind):.4f} | {statistics.mean(ind):.4f} | {max(ind):.4f} "
                f"| {statistics.pstdev(ind):.4f} | {min(s['derived']):.4f} |"
            )
    print(f"\nThreshold in use: {guard.THRESHOLD}\n")
    print("| architecture | independent models | min | mean | max | std | derived (lowest of 3) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
