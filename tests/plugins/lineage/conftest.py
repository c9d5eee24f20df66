"""Fixtures of the lineage tests: seeded models written as safetensors, and an audit through the real pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


def _save(model: nn.Module | dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, nn.Module) else model
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def save_model() -> Callable[[nn.Module | dict[str, torch.Tensor], Path], Path]:
    """``save_model(model_or_state, path)``: the state dict written as safetensors at ``path``."""
    return _save


def _audit(suspect: Path, reference: Path | None, bundles: Sequence[Path] = (), options: Sequence[str] = ()) -> Any:
    from auditor.audit.pipeline import audit_suspect, load_inputs

    return audit_suspect(suspect, load_inputs(bundles=list(bundles), reference=reference, options=list(options)))


@pytest.fixture(scope="session")
def audit() -> Callable[..., Any]:
    """``audit(suspect, reference, bundles=(), options=())``: the suspect's AuditRecord from the real pipeline
    (restore against the reference, then every detector)."""
    return _audit


@pytest.fixture(scope="session")
def lineage_of() -> Callable[[Any], Any]:
    """``lineage_of(record)``: the record's lineage finding (exactly one is required)."""

    def pick(record: Any) -> Any:
        found = [f for f in record.findings if f.detector == "lineage"]
        assert len(found) == 1, [f.detector for f in record.findings]
        return found[0]

    return pick
