"""Shared fixtures: seeded randomness and a clean plugin manager per test."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from auditor.plugin_manager import reset_plugin_manager


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A plugin manager built anew for the test and forgotten after it."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()
