"""rank statistics and Holm's adjustment (rapidun.stats): rankdata, spearman, pearson, holm, each vs a slow version."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rapidun.stats import holm, pearson, rankdata, spearman


def slow_ranks(x: list[float]) -> list[float]:
    """Average rank by definition: 1 + #smaller + (#equal − 1) / 2."""
    return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]


def slow_pearson(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def slow_holm(p: list[float | None]) -> list[float | None]:
    """Holm by its definition: adjusted p_(k) = max over i ≤ k of min(1, (m − i + 1) p_(i)), 1-based, ties in
    input order."""
    live = sorted((v, i) for i, v in enumerate(p) if v is not None)
    m = len(live)
    out: list[float | None] = [None] * len(p)
    for k in range(m):
        out[live[k][1]] = max(min(1.0, (m - i) * live[i][0]) for i in range(k + 1))
    return out


# ---------------------------------------------------------------- rankdata


@pytest.mark.parametrize(
    ("x", "want"),
    [
        ([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]),
        ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]),
        ([10.0, 20.0, 10.0, 30.0, 20.0], [1.5, 3.5, 1.5, 5.0, 3.5]),
        ([5.0], [1.0]),
        ([], []),
    ],
)
def test_rankdata_hand_values(x, want):
    assert rankdata(np.array(x)).tolist() == want


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_matches_the_definition_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=40).astype(float)  # 40 draws of 6 values: ties everywhere
    r = rankdata(x)
    assert r.tolist() == slow_ranks(x.tolist())
    assert r.sum() == pytest.approx(40 * 41 / 2)  # average ranks keep the total


def test_rankdata_flattens_and_does_not_touch_its_input():
    x = np.array([[2.0, 1.0], [1.0, 3.0]])
    before = x.copy()
    assert rankdata(x).tolist() == [3.0, 1.5, 1.5, 4.0]
    assert (x == before).all()


# ---------------------------------------------------------------- spearman / pearson


def test_spearman_perfect_and_reversed_monotone():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(a, [10.0, 20.0, 40.0, 80.0, 1000.0]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(a, [5.0, 3.0, 2.0, 1.0, -7.0]) == pytest.approx(-1.0)


def test_spearman_with_a_tie_by_hand():
    # ranks a = [1, 2, 3, 4], b = [1, 2.5, 2.5, 4]; centred: [-1.5, -.5, .5, 1.5] and [-1.5, 0, 0, 1.5]
    # cov = 2.25 + 2.25 = 4.5; |a| = sqrt(5); |b| = sqrt(4.5)  →  ρ = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 3, 4], [1, 5, 5, 9]) == pytest.approx(3 / math.sqrt(10))


def test_spearman_without_ties_is_the_textbook_formula():
    rng = np.random.default_rng(3)
    a, b = rng.permutation(30).astype(float), rng.permutation(30).astype(float)
    d2 = float(((rankdata(a) - rankdata(b)) ** 2).sum())
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (30 * (30**2 - 1)), abs=1e-12)


def test_spearman_is_pearson_of_slow_ranks_with_ties():
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 4, 25).astype(float), rng.integers(0, 5, 25).astype(float)
    want = slow_pearson(slow_ranks(a.tolist()), slow_ranks(b.tolist()))
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b"), [([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]), ([1.0], [2.0]), ([], [])]
)
def test_spearman_and_pearson_are_none_when_undefined(a, b):
    assert spearman(a, b) is None
    assert pearson(a, b) is None


def test_spearman_refuses_different_lengths():
    with pytest.raises(ValueError, match="lengths differ"):
        spearman([1, 2, 3], [1, 2])


def test_pearson_vs_slow_and_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # cov 4, var 5 and 5
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(slow_pearson(a.tolist(), b.tolist()), abs=1e-12)
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert pearson(a, b) == pytest.approx(pearson(2 * a - 5, b), abs=1e-12)  # affine invariant


# ---------------------------------------------------------------- holm


def test_holm_hand_example_with_none():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3·0.01 = .03, 2·0.03 = .06, max(.06, 1·0.04) = .06
    got = holm([0.01, 0.04, 0.03, None])
    assert got[3] is None
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06])


@pytest.mark.parametrize(
    ("p", "want"),
    [
        ([], []),
        ([None, None], [None, None]),
        ([0.2], [0.2]),
        ([0.5, 0.6], [1.0, 1.0]),  # capped at 1
        ([0.02, 0.02], [0.04, 0.04]),  # ties
        ([0.001, 0.9, None, 0.01], [0.003, 0.9, None, 0.02]),
    ],
)
def test_holm_small_cases(p, want):
    got = holm(p)
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])


@pytest.mark.parametrize("seed", range(6))
def test_holm_matches_definition_is_monotone_and_bounded(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    p = [None if rng.random() < 0.2 else float(rng.choice([rng.random(), rng.random() / 50])) for _ in range(n)]
    got = holm(p)
    want = slow_holm(p)
    assert [g is None for g in got] == [v is None for v in p]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])
    pairs = [(v, g) for v, g in zip(p, got, strict=True) if v is not None]
    for (v1, g1), (v2, g2) in itertools.product(pairs, pairs):
        assert g1 >= v1 and g1 <= 1.0  # never below the raw p, never above 1
        if v1 < v2:
            assert g1 <= g2  # order preserved
    m = len(pairs)
    for v, g in pairs:
        assert g <= min(1.0, m * v) + 1e-15  # never worse than Bonferroni
