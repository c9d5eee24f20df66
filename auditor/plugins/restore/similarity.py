"""Channel similarities and the one-to-one assignment of suspect channels to reference channels.

Each output channel is a row of its layer's weight (``out x in*k*k``). Rows
are compared by |cosine| (over the suspect row's non-zero weights, so that
pruning is no evidence against a match), so a channel scaled by any factor, negative
included, still matches itself: scale and sign are restored afterwards,
never before. Until a layer's input channels are aligned, its rows are
compared by features that do not depend on the input order (their sorted
values, sampled at fixed quantiles); once the inputs are aligned, by the
full rows. The assignment is the Hungarian method on the similarity matrix,
one-to-one and rectangular: where the counts differ, a reference channel
left unmatched is padded with zeros and a suspect channel left unmatched is
dropped.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["QUANTILES", "abs_cosine", "assign", "masked_abs_cosine", "order_free_similarity", "rows", "unit_inputs"]

#: Quantiles of a row's sorted values that stand for it while its input order is unknown.
QUANTILES = 64


def rows(weight: torch.Tensor) -> torch.Tensor:
    """One row per output channel (float32)."""
    return weight.reshape(weight.shape[0], -1).to(torch.float32)


def unit_inputs(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with each input channel's (axis 1) weights scaled to unit norm; zero ones stay zero."""
    if weight.ndim < 2:
        return weight
    norms = torch.linalg.vector_norm(weight, dim=[0, *range(2, weight.ndim)], keepdim=True)
    return weight / norms.clamp_min(1e-12)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cosine| between every row of ``a`` and every row of ``b`` (``len(a) x len(b)``); a zero row gives 0."""
    return (_unit(a.to(torch.float32)) @ _unit(b.to(torch.float32)).T).abs()


def masked_abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`abs_cosine` with each reference row ``b_j`` seen only where the suspect row ``a_i`` is not zero.

    A pruned weight is zero whatever the reference had there, so it is no evidence against a
    match: a channel pruned to a few weights then matches its own reference channel at exactly 1,
    where the plain cosine would see a short, noisy row. For rows without zeros it is the plain
    |cosine|. Used to choose the assignment; the guard's evidence stays the plain |cosine|."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    nonzero = a != 0
    if bool(nonzero.all()):  # nothing pruned: the plain |cosine|, without the second product
        return abs_cosine(a, b)
    support = nonzero.to(torch.float32)
    seen = (support @ (b * b).T).clamp_min(0.0).sqrt()  # |b_j| over a_i's support, every pair
    return (a @ b.T).abs() / (a.norm(dim=1, keepdim=True) * seen).clamp_min(1e-12)


def _quantiles(r: torch.Tensor, q: int) -> torch.Tensor:
    ordered = torch.sort(r, dim=1).values
    if ordered.shape[1] == q:
        return ordered
    pos = torch.linspace(0, ordered.shape[1] - 1, q)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo
    return ordered[:, lo] * (1 - frac) + ordered[:, hi] * frac


def order_free_similarity(a: torch.Tensor, b: torch.Tensor, q: int = QUANTILES) -> torch.Tensor:
    """A similarity of rows that ignores the order of their entries (so the input-channel order).

    Rows of different lengths (inputs added or cut off) are compared through
    ``q`` quantiles of their sorted values. A negated row's sorted values are
    the reversed negation, so both orientations are tried and the better kept.
    The features are centred over both sets first: sorted values of unrelated
    rows all look alike, and only the deviation from that common shape
    tells channels apart."""
    fa, fb = _quantiles(rows(a), q), _quantiles(rows(b), q)
    fa_neg = -fa.flip(1)
    centre = torch.cat([fa, fa_neg, fb]).mean(dim=0, keepdim=True)
    fa, fa_neg, fb = _unit(fa - centre), _unit(fa_neg - centre), _unit(fb - centre)
    return torch.maximum(fa @ fb.T, fa_neg @ fb.T).clamp_min(0.0)


def assign(similarity: torch.Tensor, *, min_pair: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The suspect channel for each reference channel (``-1``: none) and each pair's similarity.

    ``similarity`` is ``suspect x reference``. The assignment maximises the
    total similarity one-to-one; where the counts differ, a pair below
    ``min_pair`` is left unmatched too (a supplemented channel matched to a
    cut-off slot is noise, not the owner's channel)."""
    from scipy.optimize import linear_sum_assignment

    sim = similarity.detach().to(torch.float64).cpu().numpy()
    n_s, n_r = sim.shape
    index = torch.full((n_r,), -1, dtype=torch.long)
    pair = torch.zeros(n_r, dtype=torch.float32)
    if n_s == 0 or n_r == 0:
        return index, pair
    r, c = linear_sum_assignment(np.nan_to_num(sim, nan=0.0), maximize=True)
    for i, j in zip(r.tolist(), c.tolist(), strict=True):
        if n_s == n_r or sim[i, j] >= min_pair:
            index[j] = i
            pair[j] = float(sim[i, j])
    return index, pair
