"""Options the embedders share: command-line ones (typer ``Annotated`` types), so each says its help
once, and the check of the options an :class:`~auditor.bases.Embedder` is given."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "Arch",
    "BatchSize",
    "DataFactory",
    "Device",
    "Epochs",
    "Json",
    "LearningRate",
    "ModelFactory",
    "NoProgress",
    "OutDir",
    "Overwrite",
    "Precision",
    "Seed",
    "refuse_unknown_options",
    "split_names",
]

OutDir = Annotated[Path, typer.Option("--out", help="Folder for the model files and the owner bundle.")]
Arch = Annotated[str, typer.Option("--arch", help="Built-in architecture: cnn, resnet or lstm.")]
ModelFactory = Annotated[
    str | None, typer.Option("--model-factory", help="Your model instead: module:function returning an nn.Module.")
]
DataFactory = Annotated[
    str | None,
    typer.Option("--data-factory", help="Your data instead of digits: module:function returning (train, test)."),
]
Epochs = Annotated[int, typer.Option("--epochs", min=0, help="Training epochs.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Learning rate (Adam).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of initialisation and shuffling.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[
    str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast forward pass; fp16 with loss scaling).")
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Do not draw the progress bar.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace files already in --out.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def split_names(text: str | None) -> list[str] | None:
    """``"a, b"`` as ``["a", "b"]``; None or blank as None."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


def refuse_unknown_options(scheme: str, embed: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Raise :class:`~auditor.errors.UsageError` for options that ``embed`` (the scheme's embedding
    function, whose ``out_dir`` is given apart) does not take."""
    from auditor.errors import UsageError

    unknown = sorted(set(options) - (set(inspect.signature(embed).parameters) - {"out_dir"}))
    if unknown:
        raise UsageError(f"unknown {scheme} option(s): {', '.join(unknown)}")
