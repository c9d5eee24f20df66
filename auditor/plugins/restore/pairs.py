"""One-to-one matching of units by |cosine|, clear pairs first: the Hungarian assignment runs only where the
pairing is ambiguous.

Each unit is described by one or more *parts* (an MLP unit: its gate row, up row and down column), each a row
of unit norm; the similarity of a reference unit ``a`` and a suspect unit ``b`` is the mean over the parts of
``|cos|``. The answer is the assignment that maximises the total similarity, as the Hungarian method on the
full ``n x n`` matrix gives it, without that matrix where the pairing is clear:

1. **estimate** every similarity from a sketch: each part's rows projected onto ``k`` seeded Gaussian
   directions (:data:`SKETCH`) and normalised again, the same directions for both models; a part of at most
   ``k`` numbers is used as it is (the estimate is then exact). Only the :data:`TOP` best estimates of each
   row and each column are kept, chunk by chunk;
2. **verify exactly**: those candidates' similarities are computed on the full rows;
3. **clear pairs**: ``(a, b)`` is in every optimal assignment when ``s(a, b)`` exceeds the best other
   similarity in row ``a`` plus the best other one in column ``b`` (swap ``(a, b')``, ``(a', b)`` for
   ``(a, b)``, ``(a', b')``: with similarities >= 0 the total grows). The best other ones are the exact
   candidates' and, for everything outside them, the next estimate plus :data:`ERROR_SIGMAS` standard
   errors of the sketch (``1/sqrt(k)``; nothing where the estimate is exact);
4. **ambiguous remainder**: the units left (ties, duplicates, an unrelated model's everything) are matched by
   the Hungarian method on their exact similarities.

A derived model's units are all clear pairs (similarity about 1, the rest at the noise of ``k`` directions),
so the cost is the sketch, ``n * k`` per part instead of ``n * n * d``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CHUNK", "ERROR_SIGMAS", "SKETCH", "TOP", "Matching", "match", "similarity"]

#: Directions of the sketch (a part of at most this many numbers is compared exactly).
SKETCH = 512
#: Best estimates verified exactly per row and per column (beyond the first, an exact value rarely tightens
#: the bound: the next estimate plus its error dominates it).
TOP = 1
#: What an estimate outside the verified candidates may miss by, in standard errors of the sketch.
ERROR_SIGMAS = 5.0
#: What bfloat16 sketches may add to an estimate's error (rounding of k products of numbers below 1).
BF16_ERROR = 0.02
#: Rows per block of the chunked products (bounds the memory of the ``n x n`` estimates).
CHUNK = 1024


@dataclass
class Matching:
    """The suspect unit for each reference slot, each pair's exact similarity, and how it was found."""

    index: torch.Tensor
    pair: torch.Tensor
    clear: int
    ambiguous: int

    @property
    def score(self) -> float:
        """The mean matched similarity."""
        return float(self.pair.mean()) if len(self.pair) else 0.0


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return torch.nan_to_num(x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30))


def _sketches(units: Sequence[torch.Tensor], k: int, seed: int) -> list[torch.Tensor]:
    """Each part's rows projected onto ``k`` seeded directions and normalised, in bfloat16 (its rounding,
    about 0.4% of each number, is far inside the sketch's own error); short parts as they are (exact)."""
    out = []
    for i, p in enumerate(units):
        if p.shape[1] <= k:
            out.append(p)
            continue
        gen = torch.Generator().manual_seed(seed + i)
        directions = torch.randn(p.shape[1], k, generator=gen).to(torch.bfloat16)
        sketch = torch.cat([p[j : j + CHUNK].to(torch.bfloat16) @ directions for j in range(0, len(p), CHUNK)])
        out.append(_unit(sketch).to(torch.bfloat16))
    return out


def _mean_abs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rows: slice) -> torch.Tensor:
    total = (a[0][rows] @ b[0].T).abs_().to(torch.float32)
    for x, y in zip(a[1:], b[1:], strict=True):
        total += (x[rows] @ y.T).abs_()
    return torch.nan_to_num(total.div_(len(a)), nan=0.0, posinf=0.0, neginf=0.0)


def _similarity(units_r: Sequence[torch.Tensor], units_s: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_mean_abs(units_r, units_s, slice(j, j + CHUNK)) for j in range(0, len(units_r[0]), CHUNK)])


def similarity(parts_r: Sequence[torch.Tensor], parts_s: Sequence[torch.Tensor]) -> torch.Tensor:
    """The exact ``len(r) x len(s)`` similarity (mean ``|cos|`` over the parts); NaN counts as 0."""
    return _similarity([_unit(a) for a in parts_r], [_unit(b) for b in parts_s])


def _pairs(units_r: Sequence[torch.Tensor], units_s: Sequence[torch.Tensor], ra: torch.Tensor,
           sb: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Exact similarities of the pairs ``(ra[i], sb[i])`` (rows already of unit norm)."""
    total = torch.zeros(len(ra))
    for a, b in zip(units_r, units_s, strict=True):
        for j in range(0, len(ra), CHUNK):
            total[j : j + CHUNK] += (a[ra[j : j + CHUNK]] * b[sb[j : j + CHUNK]]).sum(dim=1).abs()
    return torch.nan_to_num(total / len(units_r), nan=0.0, posinf=0.0, neginf=0.0)


def _tops(est_r: list[torch.Tensor], est_s: list[torch.Tensor], t: int) -> tuple[torch.Tensor, ...]:
    """The ``t`` best estimates of every row and every column, with their indices."""
    n_r, n_s = len(est_r[0]), len(est_s[0])
    row_v, row_i = torch.empty(n_r, t), torch.empty(n_r, t, dtype=torch.long)
    col_v, col_i = torch.full((t, n_s), -1.0), torch.zeros(t, n_s, dtype=torch.long)
    for j in range(0, n_r, CHUNK):
        s = _mean_abs(est_r, est_s, slice(j, j + CHUNK))
        v, i = s.topk(t, dim=1)
        row_v[j : j + CHUNK], row_i[j : j + CHUNK] = v, i
        cv, ci = s.topk(min(t, len(s)), dim=0)
        both_v, both_i = torch.cat([col_v, cv]), torch.cat([col_i, ci + j])
        keep = both_v.topk(t, dim=0).indices
        col_v, col_i = both_v.gather(0, keep), both_i.gather(0, keep)
    return row_v, row_i, col_v, col_i


def _hungarian(sim: torch.Tensor) -> torch.Tensor:
    """Suspect column per reference row maximising the total (Hungarian method)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim.to(torch.float64).numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _unit_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_unit` in place (float32 rows)."""
    x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-30))
    return x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def match(parts_r: list[torch.Tensor], parts_s: list[torch.Tensor], *, sketch: int = SKETCH, top: int = TOP,
          seed: int = 0, consume: bool = False) -> Matching:  # fmt: skip
    """The assignment of suspect units to reference slots (see the module docstring); both sides must have
    the same number of units. With ``consume`` the float32 rows are normalised in place and the lists emptied
    once they are no longer needed (a 7B block's parts are 1 GB; the caller gives up its copies)."""
    n = len(parts_r[0])
    if n != len(parts_s[0]):
        raise ValueError(f"{n} reference units against {len(parts_s[0])} suspect units")
    if n == 0:
        return Matching(torch.zeros(0, dtype=torch.long), torch.zeros(0), 0, 0)
    exact = all(p.shape[1] <= sketch for p in parts_r)
    if consume:
        units_r, units_s = [_unit_(p) for p in parts_r], [_unit_(p) for p in parts_s]
        parts_r.clear()
        parts_s.clear()
    else:
        units_r, units_s = [_unit(p) for p in parts_r], [_unit(p) for p in parts_s]
    parts_r, parts_s = units_r, units_s
    est_r, est_s = _sketches(parts_r, sketch, seed), _sketches(parts_s, sketch, seed)
    error = 0.0 if exact else ERROR_SIGMAS / sketch**0.5 + BF16_ERROR
    t = min(top + 1, n)  # the last one kept bounds everything not verified
    row_v, row_i, col_v, col_i = _tops(est_r, est_s, t)
    c = t - 1 if t < n else t  # candidates verified per row and column
    slots = torch.arange(n)
    row_exact = _pairs(parts_r, parts_s, slots.repeat_interleave(c), row_i[:, :c].reshape(-1)).reshape(n, c)
    col_exact = _pairs(parts_r, parts_s, col_i[:c].reshape(-1), slots.repeat(c)).reshape(c, n)
    row_tail = row_v[:, c] + error if c < t else torch.zeros(n)
    col_tail = col_v[c] + error if c < t else torch.zeros(n)
    best = row_exact.argmax(dim=1)
    b = row_i[slots, best]
    s_ab = row_exact[slots, best]
    others_r = row_exact.scatter(1, best[:, None], -1.0).max(dim=1).values if c > 1 else torch.zeros(n)
    in_col = col_i[:c, b] == slots[None, :]  # is a among b's verified candidates
    others_c = torch.where(in_col, torch.full_like(col_exact[:, b], -1.0), col_exact[:, b]).max(dim=0).values
    bound = torch.maximum(others_r, row_tail) + torch.maximum(others_c, col_tail[b])
    clear = s_ab > bound
    claimed = torch.zeros(n, dtype=torch.long).index_add_(0, b[clear], torch.ones(int(clear.sum()), dtype=torch.long))
    clear &= claimed[b] == 1  # a suspect unit two slots claim is no clear pair (only if the bound failed)
    index = torch.full((n,), -1, dtype=torch.long)
    pair = torch.zeros(n)
    index[clear], pair[clear] = b[clear], s_ab[clear]
    rest_r = slots[~clear]
    used = torch.zeros(n, dtype=torch.bool)
    used[b[clear]] = True
    rest_s = slots[~used]
    del est_r, est_s
    if len(rest_r) == n:  # nothing clear (an unrelated model): no copies of the rows
        sub = _similarity(parts_r, parts_s)
    elif len(rest_r):
        sub = _similarity([p[rest_r] for p in parts_r], [p[rest_s] for p in parts_s])
    if len(rest_r):
        parts_r.clear()
        parts_s.clear()
        chosen = _hungarian(sub)
        index[rest_r] = rest_s[chosen]
        pair[rest_r] = sub[torch.arange(len(rest_r)), chosen]
    return Matching(index, pair, int(clear.sum()), len(rest_r))
