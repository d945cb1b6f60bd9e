"""Paired statistics: bootstrap vs a slow loop, McNemar against hand values, broadcasting, errors, mean_std."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rapidun import stats
from rapidun.stats import bootstrap_indices, compare_hits, mcnemar_exact, mean_std, paired_bootstrap


def _slow_bootstrap(a, b, n_boot, seed, level):
    """Obvious loop: one resample per row of the shared index matrix, mean over all S×P' cells."""
    s = max(a.shape[0], b.shape[0])
    a = np.repeat(a, s, axis=0) if a.shape[0] == 1 else a
    b = np.repeat(b, s, axis=0) if b.shape[0] == 1 else b
    idx = bootstrap_indices(a.shape[1], n_boot, seed)
    boot = []
    for row in idx:
        ra = [[a[i, j] for j in row] for i in range(s)]
        rb = [[b[i, j] for j in row] for i in range(s)]
        boot.append(np.mean(rb) - np.mean(ra))
    alpha = (1 - level) / 2
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return float(np.mean(b) - np.mean(a)), float(lo), float(hi)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("sa", "sb"), [(3, 3), (1, 3), (3, 1), (1, 1)])
def test_bootstrap_matches_slow_loop(seed, sa, sb):
    rng = np.random.default_rng(100 + seed)
    p = int(rng.integers(1, 12))
    a = (rng.random((sa, p)) < 0.5).astype(float)
    b = (rng.random((sb, p)) < 0.3).astype(float)
    res = paired_bootstrap(a, b, n_boot=300, seed=seed, level=0.9)
    diff, lo, hi = _slow_bootstrap(a, b, 300, seed, 0.9)
    assert res["diff"] == pytest.approx(diff, abs=1e-12)
    assert res["ci_low"] == pytest.approx(lo, abs=1e-12)
    assert res["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert res["n_prompts"] == p and res["n_seeds"] == max(sa, sb)
    assert res["n_boot"] == 300 and res["level"] == 0.9


def test_bootstrap_indices_helper():
    idx = bootstrap_indices(7, 5, 3)
    assert idx.shape == (5, 7)
    assert idx.min() >= 0 and idx.max() < 7
    np.testing.assert_array_equal(idx, np.random.default_rng(3).integers(0, 7, size=(5, 7)))


def test_bootstrap_ci_contains_diff():
    rng = np.random.default_rng(0)
    a = rng.random((3, 200)) < 0.6
    b = rng.random((3, 200)) < 0.2
    res = paired_bootstrap(a, b)
    assert res["ci_low"] <= res["diff"] <= res["ci_high"]
    assert res["ci_high"] < 0  # a clearly better hit rate
    assert set(res) == {"diff", "ci_low", "ci_high", "n_boot", "level", "n_prompts", "n_seeds", "test"}


def test_identical_inputs():
    a = np.random.default_rng(1).random((2, 30)) < 0.5
    res = compare_hits(a, a.copy(), n_boot=100)
    assert res["bootstrap"]["diff"] == 0.0
    assert res["bootstrap"]["ci_low"] == 0.0 and res["bootstrap"]["ci_high"] == 0.0
    assert res["mcnemar"]["p"] == 1.0
    assert res["mcnemar"]["only_a"] == 0 and res["mcnemar"]["only_b"] == 0
    assert res["mcnemar"]["n_pairs"] == 60


def _mc(n10, n01, concordant=3):
    a = np.array([True] * n10 + [False] * n01 + [True] * concordant)
    b = np.array([False] * n10 + [True] * n01 + [True] * concordant)
    return mcnemar_exact(a, b)


def test_mcnemar_hand_values():
    r = _mc(5, 0)
    assert (r["only_a"], r["only_b"], r["n_pairs"]) == (5, 0, 8)
    assert r["p"] == pytest.approx(2 / 32)
    r = _mc(9, 1)
    assert r["p"] == pytest.approx(2 * (1 + 10) / 1024)
    r = _mc(1, 9)
    assert (r["only_a"], r["only_b"]) == (1, 9)
    assert r["p"] == pytest.approx(2 * (1 + 10) / 1024)
    assert _mc(1, 1)["p"] == 1.0  # 2·(1+2)/4 > 1 → clipped
    assert _mc(0, 0)["p"] == 1.0
    assert mcnemar_exact(np.zeros(0, bool), np.zeros(0, bool))["p"] == 1.0


def test_mcnemar_large_n_no_overflow():
    r = _mc(1500, 1500)
    assert r["only_a"] + r["only_b"] == 3000
    assert r["p"] == pytest.approx(1.0, abs=0.02)
    r = _mc(1000, 2000)
    assert 0.0 <= r["p"] < 1e-50
    assert math.isfinite(r["p"])


def test_mcnemar_2d_and_broadcast():
    a = np.array([[True, False, True, True]])  # one run
    b = np.array([[False, False, True, True], [False, True, True, False], [True, False, True, True]])
    r = mcnemar_exact(a, b)
    # seed 0: only_a 1; seed 1: only_a 2, only_b 1; seed 2: none
    assert (r["only_a"], r["only_b"], r["n_pairs"]) == (3, 1, 12)
    assert r["p"] == pytest.approx(min(1.0, 2 * (1 + 4) / 16))
    assert mcnemar_exact(b, a)["only_b"] == 3


def test_bootstrap_broadcast_equals_repeat():
    rng = np.random.default_rng(4)
    a = rng.random((1, 15)) < 0.5
    b = rng.random((3, 15)) < 0.5
    r1 = paired_bootstrap(a, b, n_boot=200)
    r2 = paired_bootstrap(np.repeat(a, 3, axis=0), b, n_boot=200)
    assert r1 == r2
    assert r1["n_seeds"] == 3


@pytest.mark.parametrize(
    ("a", "b", "msg"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), "same shape"),
        (np.zeros((2, 3)), np.zeros((3, 3)), "same shape"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.zeros((2, 3)), np.zeros((2, 3, 1)), "2-D"),
        (np.zeros((2, 0)), np.zeros((2, 0)), "at least one"),
    ],
)
def test_bootstrap_bad_shapes(a, b, msg):
    with pytest.raises(ValueError, match=msg):
        paired_bootstrap(a, b)


def test_bootstrap_bad_params():
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(np.zeros((1, 2)), np.zeros((1, 2)), level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(np.zeros((1, 2)), np.zeros((1, 2)), n_boot=0)


def test_mcnemar_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(np.zeros((2, 3), bool), np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="scalar"):
        mcnemar_exact(np.bool_(True), np.bool_(True))


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    r = mean_std([1.0, float("inf")])
    assert r["mean"] == float("inf") and r["std"] is None and r["n"] == 2


# ---------------------------------------------------------------- prompt-level sign-flip test


def slow_sign_flip_p(a: np.ndarray, b: np.ndarray) -> float:
    """Every one of the 2^P sign patterns of the per-prompt mean differences, enumerated."""
    import itertools

    c = b.astype(float).mean(axis=0) - a.astype(float).mean(axis=0)
    t = abs(c.sum())
    hits = 0
    for signs in itertools.product((-1.0, 1.0), repeat=c.size):
        hits += abs(np.dot(signs, np.abs(c))) >= t - 1e-12
    return hits / 2**c.size


@pytest.mark.parametrize(("seed", "s"), [(0, 1), (1, 3), (2, 5), (3, 2)])
def test_prompt_sign_flip_matches_enumeration(seed, s):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, size=(s, 12))
    b = rng.integers(0, 2, size=(s, 12))
    r = stats.prompt_sign_flip(a, b)
    assert r["exact"] and r["p"] == pytest.approx(slow_sign_flip_p(a, b), rel=1e-12, abs=1e-15)
    assert r["diff"] == pytest.approx(b.mean() - a.mean())
    assert r["n_nonzero"] == int(np.count_nonzero(b.sum(0) - a.sum(0)))


def test_prompt_sign_flip_hand_case():
    # two prompts, one seed each: b hits on both, a on neither → T = 2; |T*| ≥ 2 for (+,+) and (−,−): p = 2/4
    assert stats.prompt_sign_flip(np.array([[0, 0]]), np.array([[1, 1]]))["p"] == pytest.approx(0.5)
    # identical methods: p = 1
    x = np.array([[1, 0, 1], [0, 0, 1]])
    assert stats.prompt_sign_flip(x, x)["p"] == 1.0


def test_prompt_sign_flip_one_seed_equals_mcnemar():
    rng = np.random.default_rng(7)
    for _ in range(20):
        a, b = rng.integers(0, 2, size=(1, 40)), rng.integers(0, 2, size=(1, 40))
        assert stats.prompt_sign_flip(a, b)["p"] == pytest.approx(stats.mcnemar_exact(a, b)["p"], rel=1e-9)


def test_prompt_sign_flip_counts_a_recurring_prompt_once():
    """The same 6 discordant prompts in each of 5 seeds: McNemar sees 30 independent pairs (p ≈ 2e-9), the prompt
    test sees 6 prompts (p = 2/64)."""
    a = np.zeros((5, 40), dtype=int)
    b = a.copy()
    b[:, :6] = 1
    assert stats.mcnemar_exact(a, b)["p"] < 1e-8
    assert stats.prompt_sign_flip(a, b)["p"] == pytest.approx(2 / 64)


def test_prompt_sign_flip_float_outcomes_monte_carlo():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 10)), rng.normal(size=(3, 10)) + 0.3
    r = stats.prompt_sign_flip(a, b, n_perm=50_000, seed=1)
    assert not r["exact"] and abs(r["p"] - slow_sign_flip_p(a, b)) < 0.01


def test_prompt_sign_flip_broadcast_and_in_compare_hits():
    a = np.array([[1, 0, 1, 1, 0, 1]])
    b = np.array([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    r = stats.prompt_sign_flip(a, b)
    assert r["n_seeds"] == 2 and r["p"] == pytest.approx(slow_sign_flip_p(np.repeat(a, 2, axis=0), b))
    assert stats.compare_hits(a, b)["prompt_test"]["p"] == r["p"]
