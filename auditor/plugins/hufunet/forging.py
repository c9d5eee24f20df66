"""The paper's forging attack "first correlation then accuracy" (section 5.7), measured.

An adversary without the owner's key picks keys of their own and looks for
suspect kernels that satisfy Algorithm 1's placement correlation under them:
host kernel j (0-based) qualifies when ``position(key, message(W_j, j + 1), N) == j``,
i.e. the kernel sits exactly where the public algorithm would put it as
kernel number j + 1. Under a random key each of the N kernels qualifies with
probability 1/N, so about one kernel per key does (the paper found at most 3
of VGG11's 1,024,192 kernels over 100 keys). The adversary then builds a
HufuNet from the kernels found (the remaining kernels stay zero, as nothing
ties any other weight to the key), trains a fresh fully connected layer on
the public training split, and would claim ownership if that network reached
the owner's accuracy within tau_acc.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from auditor.plugins.hufunet.placement import KERNEL, HostView, _xor_patterns

__all__ = ["Forgery", "correlated_kernels", "forge"]


def correlated_kernels(view: HostView, key: bytes) -> list[int]:
    """The host kernels j that satisfy the placement correlation under ``key`` as kernel j + 1."""
    n = view.n
    flat = torch.cat([view.tensors[k].detach().reshape(-1)[: (view.tensors[k].numel() // KERNEL) * KERNEL]
                      for k in view.names])  # fmt: skip
    kernels = flat.to(torch.float32).numpy().reshape(-1, KERNEL)
    patterns = _xor_patterns(kernels) ^ np.arange(1, n + 1, dtype=np.uint32)
    found = []
    for j, pattern in enumerate(patterns.tolist()):
        digest = hmac.new(key, int(pattern).to_bytes(4, "little"), hashlib.sha256).digest()
        if int.from_bytes(digest, "big") % n == j:
            found.append(j)
    return found


@dataclass(frozen=True)
class Forgery:
    """One forging attempt: how many kernels a key tied, and the forged HufuNet's accuracy."""

    key_index: int
    correlated: int
    accuracy: float


def forge(
    view: HostView,
    *,
    widths: Sequence[int],
    data: Any,
    keys: int = 100,
    seed: int = 0,
    epochs: int = 10,
) -> list[Forgery]:
    """Try ``keys`` random keys on a suspect's host kernels; for the key that ties the most
    kernels, rebuild and train a HufuNet from them and measure it on ``data``'s test split.

    Returns one :class:`Forgery` per key, in key order; ``accuracy`` is measured
    for the best key only (NaN for the others: with fewer kernels they cannot do better).
    """
    from auditor.plugins.hufunet.network import HufuNet, accuracy
    from auditor.toolkit import training

    rng = np.random.default_rng(seed)
    tied = [correlated_kernels(view, rng.bytes(32)) for _ in range(keys)]
    best = max(range(keys), key=lambda i: (len(tied[i]), -i))
    torch.manual_seed(seed)
    net = HufuNet(widths, in_channels=data.input_shape[0], num_classes=data.num_classes)
    found = torch.stack([view.read(j) for j in tied[best]]) if tied[best] else torch.empty(0, 3, 3)
    with torch.no_grad():
        start = 0
        for conv in net.conv_layers():
            w = conv.weight.view(-1, 3, 3)
            w.zero_()
            take = found[start : start + w.shape[0]]
            w[: take.shape[0]] = take
            start += take.shape[0]
            conv.weight.requires_grad_(False)
    training.train(net, data.train, training.TrainConfig(epochs=epochs, lr=1e-2, seed=seed))
    acc = accuracy(net, data)
    return [Forgery(i, len(t), acc if i == best else float("nan")) for i, t in enumerate(tied)]
