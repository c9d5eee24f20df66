"""The lineage statistic and its exact permutation p-values, layer by layer, and their combination.

For one layer, the units are its output rows (a convolution's filters, a linear layer's neurons), each
flattened. ``C[i, j]`` is the |cosine| between the suspect's unit ``i`` and the reference's unit ``j``; the
statistic is the mean of ``C[i, i]``, the similarity of the units as they stand (after restore). Under the
null the reference's units are exchangeable, so the statistic at ``n`` uniformly random permutations of the
reference's units is distributed like the true one, and ``p = (k + 1) / (n + 1)``, with ``k`` the number of
permutations whose statistic reaches the true one, is exact (docs/lineage.md proves it and states the
assumptions). Per-layer p-values are combined with Holm's step-down correction: the layers it rejects are the
derived ones, and the model-level p-value is Bonferroni's, the number of layers times the smallest p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CHUNK", "LayerTest", "draw_permutations", "holm", "permutation_test", "unit_similarity"]


@dataclass(frozen=True)
class LayerTest:
    """One layer's test: the statistic, the permutations that reached it, the exact p-value and the null's spread."""

    statistic: float
    reached: int
    permutations: int
    null_mean: float
    null_max: float

    @property
    def p(self) -> float:
        """``(k + 1) / (n + 1)``: the share of the n + 1 statistics (the true one included) at least as large."""
        return (self.reached + 1) / (self.permutations + 1)


def unit_similarity(suspect: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``C[i, j]``: |cosine| between suspect unit ``i`` and reference unit ``j`` (rows flattened; a zero row,
    such as a pruned filter, is similar to nothing). Both weights must have the same shape."""
    if suspect.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(suspect.shape)} and {tuple(reference.shape)}")
    a = suspect.reshape(suspect.shape[0], -1).float()
    b = reference.reshape(reference.shape[0], -1).float()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (a @ b.T).abs()


#: Permuted statistics computed at once: bounds the memory of a layer's test to about this many indices (32 MiB).
CHUNK = 1 << 22


def draw_permutations(units: int, permutations: int, generator: np.random.Generator) -> torch.Tensor:
    """``permutations + 1`` orders of ``units`` units, one per row: the identity first, then uniformly random
    permutations drawn from ``generator`` (each row shuffled on its own, Fisher-Yates)."""
    identity = np.arange(units, dtype=np.int64)
    drawn = generator.permuted(np.broadcast_to(identity, (permutations, units)), axis=1)
    return torch.from_numpy(np.concatenate([identity[None, :], drawn]))


def permutation_test(similarity: torch.Tensor, permutations: int, seed: int) -> LayerTest:
    """The exact permutation test of one layer on its similarity matrix ``C`` (square): the mean diagonal
    against its value under ``permutations`` uniformly random permutations of the reference's units.

    The permutations come from a generator seeded with ``(seed, units)``, independently of the weights: layers
    of the same width share them (each layer's p-value stays exact, and the corrections over layers hold under
    any dependence), and the same inputs give the same draw. They are drawn and scored in chunks of about
    :data:`CHUNK` indices, so memory does not grow with ``permutations``. Each chunk scores the identity too,
    through the same arithmetic, so a permutation that happens to be the identity ties exactly (and counts as
    reaching the true statistic)."""
    units = similarity.shape[0]
    generator = np.random.default_rng([seed, units])
    rows = torch.arange(units).unsqueeze(0)
    per_chunk = max(1, CHUNK // max(units, 1) - 1)
    true, reached, total, top, done = math.nan, 0, 0.0, -math.inf, 0
    while done < permutations:
        count = min(per_chunk, permutations - done)
        values = similarity[rows, draw_permutations(units, count, generator)].mean(dim=1)
        true = float(values[0])
        null = values[1:]
        reached += int((null >= values[0]).sum())
        total += float(null.double().sum())
        top = max(top, float(null.max()))
        done += count
    if not permutations:
        true = float(similarity.diagonal().mean())
    return LayerTest(
        statistic=true,
        reached=reached,
        permutations=permutations,
        null_mean=total / permutations if permutations else math.nan,
        null_max=top if permutations else math.nan,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: a layer is rejected at level alpha when its
    adjusted value is at most alpha, with the family-wise error rate at most alpha under any dependence
    between layers. The smallest adjusted value is Bonferroni's: the number of layers times the smallest p."""
    count = len(p_values)
    order = sorted(range(count), key=lambda i: (p_values[i], i))
    adjusted = [1.0] * count
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (count - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
