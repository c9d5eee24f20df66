"""The statistic, the exact permutation p-value and Holm's correction, on hand-made weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from auditor.plugins.lineage import stats
from auditor.plugins.lineage.stats import draw_permutations, holm, permutation_test, unit_similarity


def test_similarity_ignores_each_units_scale_and_sign() -> None:
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(12, 5, 3, 3, generator=g)
    factors = torch.rand(12, 1, 1, 1, generator=g) * 8 + 0.1
    signs = torch.where(torch.rand(12, 1, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    c = unit_similarity(reference * factors * signs, reference)
    assert torch.allclose(c.diagonal(), torch.ones(12), atol=1e-5)
    assert torch.allclose(c, unit_similarity(reference, reference), atol=1e-5)


def test_a_zero_unit_is_similar_to_nothing() -> None:
    reference = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    suspect = reference.clone()
    suspect[2] = 0
    c = unit_similarity(suspect, reference)
    assert torch.isfinite(c).all()
    assert c[2].abs().max() == 0


def test_the_same_units_reach_the_smallest_p_value() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    test = permutation_test(unit_similarity(w, w), 999, seed=0)
    assert test.statistic > 0.999
    assert test.reached == 0
    assert test.p == 1 / 1000
    assert test.null_max < 0.5


def test_a_tie_counts_as_reaching() -> None:
    # every unit alike: every re-ordering gives the same statistic, so nothing is evidence
    w = torch.ones(8, 4)
    test = permutation_test(unit_similarity(w, w), 99, seed=0)
    assert test.reached == 99
    assert test.p == 1.0


def test_p_values_are_valid_under_the_null() -> None:
    # Independent models with exchangeable units: the p-value must be (super-)uniform. 400 independent pairs of
    # Gaussian layers; the share with p <= alpha must not exceed alpha beyond binomial noise (one-sided 0.001).
    g, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    ps = []
    for _ in range(400):
        a, b = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
        ps.append(permutation_test(unit_similarity(a, b), 99, seed=int(rng.integers(1 << 30))).p)
    for alpha in (0.05, 0.1, 0.2):
        hits = sum(p <= alpha for p in ps)
        assert scipy_stats.binom.sf(hits - 1, 400, alpha) > 1e-3, (alpha, hits)
    assert 0.4 < sum(ps) / len(ps) < 0.6  # and not piled up at 1 (a test that never rejects is no test)


def test_a_noisy_copy_is_found() -> None:
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(32, 72, generator=g)
    suspect = reference + 1.5 * torch.randn(32, 72, generator=g)  # cosine about 0.55 per unit
    test = permutation_test(unit_similarity(suspect, reference), 999, seed=4)
    assert test.reached == 0
    assert test.statistic > test.null_max + 0.2


def test_the_permutations_are_uniform_and_start_with_the_identity() -> None:
    orders = draw_permutations(3, 6000, np.random.default_rng(5))
    assert orders[0].tolist() == [0, 1, 2]
    assert all(sorted(row) == [0, 1, 2] for row in orders.tolist())
    counts = {}
    for row in orders[1:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 6
    assert scipy_stats.chisquare(list(counts.values())).pvalue > 1e-3


def test_holm_adjusted_values_by_hand() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert [round(x, 10) for x in adjusted] == [0.03, 0.06, 0.06, 0.02]
    assert min(adjusted) == 4 * 0.005  # Bonferroni's model-level value
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
    assert all(math.isclose(a, b) for a, b in zip(holm([0.2]), [0.2], strict=True))


def test_chunks_change_nothing_but_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(6)
    c = unit_similarity(torch.randn(24, 40, generator=g), torch.randn(24, 40, generator=g))  # independent
    whole = permutation_test(c, 500, seed=7)
    monkeypatch.setattr(stats, "CHUNK", 24 * 8)  # seven permutations (and the identity) at a time
    chunked = permutation_test(c, 500, seed=7)
    assert chunked.reached == whole.reached  # the same permutations, compared with the same true statistic
    for a, b in ((chunked.statistic, whole.statistic), (chunked.null_max, whole.null_max),
                 (chunked.null_mean, whole.null_mean)):  # fmt: skip
        assert math.isclose(a, b, rel_tol=1e-6)
    assert 0 < whole.reached < 500  # an informative case: some re-orderings reach it, some do not
