"""toolkit.models.random_input: the inputs attacks compare outputs on take the model's own dtype."""

from __future__ import annotations

import torch
from torch import nn

from auditor.toolkit.models import random_input


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Embedding(7, 4)
        self.large = nn.Embedding(50, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.small(ids).sum(1) + self.large(ids).sum(1)


def test_token_ids_stay_below_the_smallest_vocabulary_and_run() -> None:
    model = _TokenModel()
    x = random_input(model, (12,), torch.int64, count=200, seed=3)
    assert x.dtype == torch.int64 and x.shape == (200, 12)
    assert int(x.min()) >= 0 and int(x.max()) == 6  # every id of the smaller table is drawn, none past it
    assert model(x).shape == (200, 4)
    assert torch.equal(x, random_input(model, (12,), torch.int64, count=200, seed=3))
    assert not torch.equal(x, random_input(model, (12,), torch.int64, count=200, seed=4))


def test_float_inputs_are_seeded_normals() -> None:
    x = random_input(nn.Linear(3, 2), (3,), torch.float32, count=4000, seed=0)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    assert torch.equal(x, random_input(nn.Linear(3, 2), (3,), count=4000, seed=0))
