"""The Greedy Residuals math: signature bits, residual extraction, embedding penalty, matching.

Everything here works on plain tensors so that the owner's training loop (on
``nn.Module`` parameters, differentiably) and the detector (on weights read
from a suspect file) share one implementation.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: the detector registers with SCHEME and GRParams alone
    import torch

__all__ = ["SCHEME", "GRParams", "alpha_from_signature", "match_bits", "penalty_term", "residuals"]

SCHEME = "greedy-residuals"


@dataclass(frozen=True)
class GRParams:
    """Scheme parameters; defaults are the authors' experiments (spec table)."""

    bits: int = 256  # b
    cells_per_bit: int = 253  # b', so d = b * b' = 64,768
    eta: float = 0.5  # fraction of each row kept, by largest |value|
    mu: float = 0.1  # hinge margin
    lam: float = 0.01  # weight of the embedding term

    def __post_init__(self) -> None:
        if self.bits < 1 or self.cells_per_bit < 1:
            raise ValueError("bits and cells_per_bit must be positive")
        if not 0.0 < self.eta <= 1.0:
            raise ValueError("eta must be in (0, 1]")

    @property
    def cells(self) -> int:
        """d = b * b', the length every selected layer is pooled to."""
        return self.bits * self.cells_per_bit

    @property
    def kept_per_row(self) -> int:
        """round(b' * eta) with halves rounded up: 127 for the defaults (the authors' code keeps 126)."""
        return max(1, int(self.cells_per_bit * self.eta + 0.5))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived row length recorded too."""
        return {**asdict(self), "kept_per_row": self.kept_per_row}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GRParams:
        """Inverse of :meth:`to_dict` (derived fields are ignored)."""
        return cls(**{k: data[k] for k in ("bits", "cells_per_bit", "eta", "mu", "lam") if k in data})


def alpha_from_signature(signature: bytes, bits: int = 256) -> torch.Tensor:
    """The signature bits: SHA-256 of the signature, most significant bit of the first byte
    first, bit 1 -> +1 and bit 0 -> -1 (float32, shape ``(bits,)``).

    More than 256 bits extend the stream with SHA-256(digest || counter) blocks.
    """
    import torch

    stream = b""
    block = hashlib.sha256(signature).digest()
    counter = 0
    while len(stream) * 8 < bits:
        stream += block
        counter += 1
        block = hashlib.sha256(hashlib.sha256(signature).digest() + counter.to_bytes(4, "big")).digest()
    values = [1.0 if (stream[i // 8] >> (7 - i % 8)) & 1 else -1.0 for i in range(bits)]
    return torch.tensor(values, dtype=torch.float32)


def residuals(weight: torch.Tensor, params: GRParams) -> torch.Tensor:
    """The b residuals psi of one layer's weight tensor (differentiable).

    Flatten in row-major order of the canonical layout, average-pool the m
    weights to d cells (adaptive pooling: the paper's kernel; it repeats
    weights when m < d), reshape to b x b', keep the ``kept_per_row`` entries
    of largest |value| in each row, and divide each row's sum by b'.
    """
    import torch
    import torch.nn.functional as F

    flat = weight.reshape(1, 1, -1).to(torch.float32)
    if flat.shape[-1] == 0:
        raise ValueError("cannot extract residuals from an empty tensor")
    pooled = F.adaptive_avg_pool1d(flat, params.cells).reshape(params.bits, params.cells_per_bit)
    top = torch.topk(pooled.abs(), params.kept_per_row, dim=1).indices
    kept = torch.gather(pooled, 1, top)  # a copy: the weights themselves are untouched
    return kept.sum(dim=1) / params.cells_per_bit


def penalty_term(weight: torch.Tensor, alpha: torch.Tensor, params: GRParams) -> torch.Tensor:
    """lambda * sum_i ReLU(mu - alpha_i * psi_i) for one layer (add it to the task loss)."""
    import torch.nn.functional as F

    psi = residuals(weight, params)
    return params.lam * F.relu(params.mu - alpha.to(psi.device) * psi).sum()


def match_bits(psi: torch.Tensor, alpha: torch.Tensor) -> int:
    """k: the number of bits whose residual sign equals alpha (psi == 0 counts as a mismatch)."""
    import torch

    return int((torch.sign(psi) == alpha.to(psi.device)).sum())
