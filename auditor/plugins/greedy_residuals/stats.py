"""The statistics behind a Greedy Residuals finding, exact and in log space.

Under the null hypothesis "the suspect's residual signs are fair coins
independent of the owner's signature", the number k of the b signature bits
that match is Binomial(b, 1/2). Tails are summed exactly with Python integers
(``sum C(b, j) / 2**b``), so nothing underflows and log10 values stay exact. The
float value is kept only where a float holds it to full precision: below the
smallest normal float it is ``None`` (stored as ``null``), never a denormal or 0
pretending to be exact; the log10 beside it is the number.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Probability",
    "binomial_tail",
    "bonferroni",
    "fisher",
    "forging_bound",
    "two_sided_p",
]

_LOG10_2 = math.log10(2.0)


def representable(value: float) -> float | None:
    """``value`` (a positive probability) where a float holds it to full precision, else ``None``: a denormal,
    or an underflow to 0, would pretend to an exactness it does not have."""
    return value if value >= sys.float_info.min else None


@dataclass(frozen=True)
class Probability:
    """A probability as a float (``None`` where it is below the smallest normal float) and its exact log10."""

    value: float | None
    log10: float

    @classmethod
    def from_log10(cls, log10: float) -> Probability:
        """A probability given by its log10 (capped at 1)."""
        log10 = min(0.0, log10)
        return cls(value=representable(10.0**log10) if log10 > -330 else None, log10=log10)

    def words(self) -> str:
        """The probability for sentences and reports: a plain number down to 0.001, below that a power of ten
        (2.4 times 10^-77) however small, never 0 unless it is exactly 0."""
        from auditor.report.text import power_of_ten

        return power_of_ten(self.log10)


def _tail_count(k: int, b: int) -> int:
    """sum_{j >= k} C(b, j), exactly."""
    if k <= 0:
        return 2**b
    return sum(math.comb(b, j) for j in range(k, b + 1))


def binomial_tail(k: int, b: int) -> Probability:
    """P(Binomial(b, 1/2) >= k), exact."""
    if b < 1:
        raise ValueError("b must be positive")
    count = _tail_count(k, b)
    if count == 0:
        return Probability(0.0, -math.inf)
    return Probability(value=representable(float(Fraction(count, 2**b))), log10=math.log10(count) - b * _LOG10_2)


def two_sided_p(k: int, b: int) -> Probability:
    """Two-sided binomial test of k matches out of b against p = 1/2, exact.

    For p = 1/2 the distribution is symmetric, so the p-value (the probability
    of an outcome no more likely than k) is ``min(1, 2 * P(X >= max(k, b - k)))``,
    and exactly 1 when k = b / 2. It equals scipy's
    ``binomtest(k, b, 0.5, alternative="two-sided").pvalue`` (tested), without
    scipy.stats' second of import time.
    """
    if not 0 <= k <= b:
        raise ValueError(f"k={k} is not between 0 and b={b}")
    extreme = max(k, b - k)
    if 2 * extreme == b:
        return Probability(1.0, 0.0)
    count = 2 * _tail_count(extreme, b)
    if count >= 2**b:
        return Probability(1.0, 0.0)
    return Probability(value=representable(float(Fraction(count, 2**b))), log10=math.log10(count) - b * _LOG10_2)


def forging_bound(k: int, b: int, *, layers: int, cells: int) -> Probability:
    """Proposition 1 of the paper generalised to k of b matches.

    An adversary free to pick any of ``layers`` (M) layers and any of
    floor(d / b) residual constructions has at most M * floor(d / b) tries, each
    matching at least max(k, b - k) bits (either sign) with probability
    P(Binomial(b, 1/2) >= max(k, b - k)); the union bound caps the chance of a
    forged match this strong at M * floor(d / b) * that tail, capped at 1.
    For k = b this is the paper's M * floor(d / b) / 2**b.
    """
    tries = max(1, layers) * max(1, cells // b)
    tail = binomial_tail(max(k, b - k), b)
    return Probability.from_log10(math.log10(tries) + tail.log10)


def bonferroni(log10_ps: Sequence[float]) -> Probability:
    """The smallest of n p-values times n, capped at 1 (Bonferroni's correction
    for having looked at n layers and kept the best)."""
    if not log10_ps:
        raise ValueError("no p-values to combine")
    return Probability.from_log10(min(log10_ps) + math.log10(len(log10_ps)))


def fisher(log10_ps: Sequence[float]) -> Probability:
    """Fisher's combined p-value: -2 * sum ln p against chi-square with 2n degrees
    of freedom. It assumes the layers are independent, which watermarked layers
    of one model are not, so it is reported for information only."""
    if not log10_ps:
        raise ValueError("no p-values to combine")
    # With 2n degrees of freedom the tail has a closed form,
    # exp(-x/2) * sum_{i<n} (x/2)^i / i!, summed here in log space so that it never underflows.
    half = -math.log(10.0) * sum(log10_ps)
    terms = [
        i * math.log(half) - math.lgamma(i + 1) if half > 0 else (0.0 if i == 0 else -math.inf)
        for i in range(len(log10_ps))
    ]
    top = max(terms)
    log_sf = -half + top + math.log(sum(math.exp(t - top) for t in terms))
    return Probability.from_log10(log_sf / math.log(10.0))
