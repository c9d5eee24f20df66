"""Fixtures of the restore tests: a quiet ONNX export (its graph has real edges) and a SmallCNN rebuilt from
edited tensors, the way a thief would publish an edited copy."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from auditor.toolkit import models as zoo
from auditor.toolkit.channels import Tensors


def _export(model: nn.Module, path: Path, *, fold: bool, dynamo: bool = False) -> Path:
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        options: dict[str, Any] = {"optimize": fold} if dynamo else {}
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=dynamo, do_constant_folding=fold, **options
        )
    return path


def _cnn_from(tensors: Tensors) -> nn.Module:
    model = zoo.SmallCNN()
    for i in (1, 2, 3):
        out_c, in_c = tensors[f"conv{i}"]["weight"].shape[:2]
        setattr(model, f"conv{i}", nn.Conv2d(in_c, out_c, 3, padding=1, bias=False))
        setattr(model, f"bn{i}", nn.BatchNorm2d(out_c))
    model.head = nn.Linear(tensors["head"]["weight"].shape[1], 10)
    model.load_state_dict({f"{m}.{r}": t for m, params in tensors.items() for r, t in params.items()})
    return model.eval()


@pytest.fixture(scope="session")
def onnx_export() -> Callable[..., Path]:
    """``onnx_export(model, path, *, fold, dynamo=False)``: ``model`` exported to ONNX at ``path`` for an
    8x8 digit, batch-norm folded into the convolutions when ``fold``; the exporter's chatter silenced."""
    return _export


@pytest.fixture(scope="session")
def cnn_from() -> Callable[[Tensors], nn.Module]:
    """``cnn_from(tensors)``: a SmallCNN whose layers take the (possibly resized) shapes of ``tensors``."""
    return _cnn_from
