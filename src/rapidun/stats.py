"""Paired statistics for comparing an unlearning method against ``rapidun`` on the same prompts and seeds.

Results are hit matrices of shape ``(S, P)`` (seeds × prompts), the same prompts in the same column order for both
methods. A method run once (e.g. ``retrain``, ``S = 1``) may be paired with one run several times (``S > 1``): the
single row is broadcast to every seed, i.e. each seed of the other method is paired with that one run.

- :func:`paired_bootstrap`: percentile CI of ``d = mean(b) − mean(a)`` by resampling prompt columns (seeds and
  methods stay paired).
- :func:`prompt_sign_flip`: the headline test. The prompt is the unit: the per-prompt mean differences over seeds
  are tested with an exact sign-flip (permutation) test, so a prompt that recurs in every seed counts once.
- :func:`mcnemar_exact`: exact two-sided McNemar test on the pooled discordant pairs (kept for reference: with
  several seeds it treats the ``S × P`` pairs as independent although the same prompt recurs in every seed, so its
  p-value is too small whenever outcomes correlate across seeds; with one seed it equals :func:`prompt_sign_flip`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (``ddof = 1``).

    Args:
        values: the numbers (e.g. one metric over seeds).

    Returns:
        ``{"mean": float | None, "std": float | None, "n": int}``. ``mean`` is ``None`` for no values; it may be
        ``inf``/``nan`` when a value is non-finite (e.g. an infinite perplexity). ``std`` is ``None`` when ``n < 2``
        or when it is not finite (any non-finite value makes it ``nan``).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(np.mean(x))
        std = float(np.std(x, ddof=1)) if n >= 2 else None
    if std is not None and not math.isfinite(std):
        std = None
    return {"mean": mean, "std": std, "n": n}


def _pair(a: np.ndarray, b: np.ndarray, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and broadcast a single run (axis 0 of size 1) against several.

    Args:
        a, b: arrays to pair.
        ndim: required number of dimensions (``None``: any ≥ 1).

    Returns:
        ``(a, b)`` with equal shapes.

    Raises:
        ValueError: wrong dimensionality, or shapes that differ other than by a size-1 axis 0.
    """
    a, b = np.asarray(a), np.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D (seeds × prompts), got shape {x.shape}")
        if x.ndim == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if a.shape == b.shape:
        return a, b
    if a.ndim == b.ndim and a.shape[1:] == b.shape[1:] and 1 in (a.shape[0], b.shape[0]):
        s = max(a.shape[0], b.shape[0])
        return np.broadcast_to(a, (s, *a.shape[1:])), np.broadcast_to(b, (s, *b.shape[1:]))
    raise ValueError(
        f"a and b must have the same shape (or differ only by a size-1 axis 0, a single run), "
        f"got {a.shape} and {b.shape}"
    )


def bootstrap_indices(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """Prompt indices of every bootstrap resample, drawn with replacement.

    Args:
        n_prompts: ``P``, the number of prompt columns.
        n_boot: ``B``, the number of resamples.
        seed: seed of ``np.random.default_rng``.

    Returns:
        int array of shape ``(B, P)``: row ``k`` lists the columns of resample ``k``
        (``default_rng(seed).integers(0, P, size=(B, P))``).
    """
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Paired bootstrap CI of the difference in mean between two methods.

    Statistic: ``d = mean(b) − mean(a)`` over all ``S × P`` cells. Each resample draws ``P`` prompt columns with
    replacement (:func:`bootstrap_indices`) and uses the same columns for every seed and for both methods. Because
    every column holds ``S`` cells, the resampled statistic is the mean of the per-prompt differences
    ``c_j = mean_s b[s, j] − mean_s a[s, j]`` over the drawn columns: ``d*_k = mean_j c[idx[k, j]]``.
    CI: the ``(1 − level)/2`` and ``1 − (1 − level)/2`` percentiles of ``d*`` (``np.percentile``, linear).

    Args:
        a: reference method (e.g. ``rapidun``), shape ``(S, P)``, 0/1 or float.
        b: compared method, shape ``(S, P)``; either may have ``S = 1`` (a single run), broadcast to the other's
            seeds.
        n_boot: ``B``, the number of resamples (≥ 1).
        seed: RNG seed of the resampling.
        level: confidence level in (0, 1).

    Returns:
        ``{"diff", "ci_low", "ci_high", "n_boot", "level", "n_prompts", "n_seeds", "test"}``; ``n_seeds`` is ``S``
        after broadcasting.

    Raises:
        ValueError: arrays not 2-D, unequal shapes, no prompts or seeds, ``n_boot < 1``, or ``level`` outside (0, 1).
    """
    a, b = _pair(a, b, ndim=2)
    s, p = a.shape
    if p == 0 or s == 0:
        raise ValueError(f"need at least one seed and one prompt, got shape {a.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = float(b.mean() - a.mean())
    col = b.mean(axis=0) - a.mean(axis=0)  # (P,)
    boot = col[bootstrap_indices(p, n_boot, seed)].mean(axis=1)  # (B,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(boot, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return {
        "diff": diff,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_boot": int(n_boot),
        "level": float(level),
        "n_prompts": int(p),
        "n_seeds": int(s),
        "test": "paired bootstrap over prompts (seeds and methods kept paired), percentile CI",
    }


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Exact two-sided McNemar test on pooled paired outcomes.

    Pairs are the cells of ``a`` and ``b`` (flattened after broadcasting a size-1 axis 0, as in
    :func:`paired_bootstrap`). Discordant counts: ``n01 = #(¬a ∧ b)``, ``n10 = #(a ∧ ¬b)``, ``n = n01 + n10``.
    Under H0 ``n01 ~ Binomial(n, 1/2)``, so ``p = min(1, 2 · Σ_{k=0}^{min(n01, n10)} C(n, k) / 2^n)``
    (``p = 1`` when ``n = 0``). The sum is exact integer arithmetic (no overflow for any ``n``), divided once.

    Args:
        a: reference method's outcomes (bool or 0/1), any shape with ≥ 1 dimension.
        b: compared method's outcomes, the same shape (or differing by a size-1 axis 0).

    Returns:
        ``{"only_a": n10, "only_b": n01, "n_pairs", "p", "test"}``.

    Raises:
        ValueError: incompatible shapes.
    """
    a, b = _pair(a, b)
    a, b = a.astype(bool).reshape(-1), b.astype(bool).reshape(-1)
    n01 = int(np.count_nonzero(~a & b))
    n10 = int(np.count_nonzero(a & ~b))
    n = n01 + n10
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1))
        p = min(1.0, (2 * tail) / (1 << n))  # int / int: correctly rounded, no overflow
    return {
        "only_a": n10,
        "only_b": n01,
        "n_pairs": int(a.size),
        "p": float(p),
        "test": "exact McNemar (two-sided binomial on discordant pairs)",
    }


def _sign_flip_tail(d: np.ndarray, t_obs: int) -> float:
    """``P(|Σ_j ε_j d_j| ≥ |t_obs|)`` for iid fair signs ``ε_j``, integer ``d_j ≥ 0`` (exact, by convolution).

    The distribution of the signed sum lives on the integers ``−D..D`` (``D = Σ d_j``): start from a point mass at 0
    and, for each ``d_j > 0``, replace ``q`` by ``(q shifted by +d_j + q shifted by −d_j) / 2``.
    """
    d = d[d > 0]
    total = int(d.sum())
    q = np.zeros(2 * total + 1)  # index k ↔ sum k − total
    q[total] = 1.0
    for dj in d.tolist():
        nq = np.zeros_like(q)
        nq[dj:] += 0.5 * q[: q.size - dj]
        nq[: q.size - dj] += 0.5 * q[dj:]
        q = nq
    sums = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, q[sums >= abs(t_obs)].sum()))


def prompt_sign_flip(a: np.ndarray, b: np.ndarray, n_perm: int = 100_000, seed: int = 0) -> dict[str, Any]:
    """Paired test with the prompt as the unit (seeds nested in prompts): a two-sided sign-flip test.

    Per prompt ``j`` the difference of the means over seeds ``c_j = mean_s b[s, j] − mean_s a[s, j]``; statistic
    ``T = Σ_j c_j``. Under H0 (the two methods are exchangeable on every prompt) the sign of each ``c_j`` is a fair
    coin, independently across prompts; ``p = P(|T*| ≥ |T|)`` over the ``2^P`` sign patterns. For 0/1 (or integer)
    outcomes ``S · c_j`` is an integer and the null distribution is computed exactly by convolution; otherwise by
    ``n_perm`` random sign patterns (``p = (1 + #{|T*| ≥ |T|}) / (1 + n_perm)``). With one seed and 0/1 outcomes
    this equals the exact McNemar test.

    Args:
        a: reference method's outcomes, shape ``(S, P)`` (``S = 1`` broadcasts, as in :func:`paired_bootstrap`).
        b: compared method's outcomes, same shape.
        n_perm: random sign patterns when the outcomes are not integers.
        seed: RNG seed of those patterns.

    Returns:
        ``{"diff": T / P, "n_prompts", "n_seeds", "n_nonzero" (prompts with c_j ≠ 0), "p", "exact", "test"}``.

    Raises:
        ValueError: arrays not 2-D, unequal shapes, or no prompts or seeds.
    """
    a, b = _pair(a, b, ndim=2)
    s, p = a.shape
    if p == 0 or s == 0:
        raise ValueError(f"need at least one seed and one prompt, got shape {a.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    sums = (b - a).sum(axis=0)  # (P,) = S · c_j
    exact = bool(np.all(sums == np.round(sums)))
    if exact:
        d = np.abs(np.round(sums)).astype(np.int64)
        pval = _sign_flip_tail(d, int(np.round(sums).sum()))
    else:
        c = sums / s
        flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, p))  # (n_perm, P)
        t_star = np.abs(flips @ np.abs(c))
        t_obs = abs(float(c.sum()))
        pval = float((1 + np.count_nonzero(t_star >= t_obs - 1e-12 * max(1.0, t_obs))) / (1 + n_perm))
    return {
        "diff": float(sums.sum() / (s * p)),
        "n_prompts": int(p),
        "n_seeds": int(s),
        "n_nonzero": int(np.count_nonzero(sums)),
        "p": float(pval),
        "exact": exact,
        "test": "two-sided sign-flip test on per-prompt mean differences (prompt = unit, seeds nested)"
        + ("" if exact else f", {n_perm} random sign patterns"),
    }


def compare_hits(ref: np.ndarray, other: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The paired tests of ``other`` against ``ref`` (hit matrices ``(S, P)``).

    Returns:
        ``{"bootstrap": paired_bootstrap(ref, other, n_boot, seed), "prompt_test": prompt_sign_flip(ref, other),
        "mcnemar": mcnemar_exact(ref, other)}``; ``prompt_test`` is the headline p-value (``mcnemar`` pools the
        ``S × P`` pairs as independent and is kept for reference).
    """
    return {
        "bootstrap": paired_bootstrap(ref, other, n_boot=n_boot, seed=seed),
        "prompt_test": prompt_sign_flip(ref, other),
        "mcnemar": mcnemar_exact(ref, other),
    }


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(a: Any, b: Any) -> float | None:
    """Spearman rank correlation (Pearson correlation of the average ranks); None when undefined (n < 2 or a
    constant vector)."""
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    return pearson(rankdata(x), rankdata(y))


def pearson(a: Any, b: Any) -> float | None:
    """Pearson correlation; None when undefined (n < 2 or a constant vector)."""
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else None


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (step-down; controls the family-wise error rate).

    With the m non-None p-values sorted ascending, ``p_(k)`` adjusted is ``max_{i ≤ k} min(1, (m − i + 1)·p_(i))``
    (1-based). None entries are not part of the family and stay None. Output is in the input order.
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        out[i] = running
    return out
