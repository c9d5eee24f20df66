"""An owner's own model and data, which auditor does not ship: a Conv1d classifier of synthetic sequences.

Four classes of 4-channel sequences, 32 steps long: class c is a sine wave of
frequency c + 1 in channel c, buried in noise on every channel. The examples
of docs/owners.md train it with a watermark; ``model`` and ``data`` are also
the ``--model-factory`` and ``--data-factory`` of ``auditor embed`` and
``auditor evaluate`` (``examples/sequences.py:model``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

CHANNELS, STEPS, CLASSES = 4, 32, 4


class SequenceNet(nn.Module):
    """Two Conv1d blocks (4 -> 32 -> 64 channels, kernel 5, batch-norm, ReLU), a max-pool,
    a hidden linear layer ``fc1`` (1,024 -> 128) and a linear ``head``."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(CHANNELS, 32, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.conv2 = nn.Conv1d(32, 64, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm1d(64)
        self.pool = nn.MaxPool1d(2)
        self.fc1 = nn.Linear(64 * STEPS // 2, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, 4, 32)``."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.head(torch.relu(self.fc1(torch.flatten(x, 1))))


def model() -> SequenceNet:
    """The model factory: a freshly initialised SequenceNet (seed torch first for the same weights)."""
    return SequenceNet()


def sequences(n: int, seed: int) -> TensorDataset:
    """``n`` labelled sequences ``(N, 4, 32)`` float32 with int64 labels, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    t = torch.arange(STEPS, dtype=torch.float32)
    phase = 6.2832 * torch.rand(n, 1, generator=g)
    wave = torch.sin(2 * 3.14159 * (labels.float() + 1).reshape(-1, 1) * t / STEPS + phase)
    x = 0.8 * torch.randn(n, CHANNELS, STEPS, generator=g)
    x[torch.arange(n), labels] += wave
    return TensorDataset(x, labels)


def data() -> tuple[TensorDataset, TensorDataset]:
    """The data factory: 1,600 training and 400 test sequences (fixed seeds)."""
    return sequences(1600, seed=1), sequences(400, seed=2)
