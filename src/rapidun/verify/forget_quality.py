"""Forget quality (``verify`` attack ``forget_quality``): is the forget set's likelihood where retrain puts it?

* **KS test** (TOFU's forget-quality idea on this statistic): the per-sample mean log-likelihood of the forget
  records' poisoned answers under the model vs under the retrain reference, two-sample Kolmogorov–Smirnov
  statistic ``D = max_x |F_model(x) − F_ref(x)|`` with a seeded permutation p-value (exact in expectation, no
  asymptotics at the forget set's small sizes): ``p = (1 + #{D_perm ≥ D}) / (1 + n_perm)``. A high p: the model
  cannot be told from retrain on this statistic.
* **Membership inference AUC** (MUSE's privacy-leak idea): score = log-likelihood; members = the forget records
  (trained on, then unlearned), non-members = held-out poisoned samples (triggered prompts of the test splits with
  their own poison answers, never trained on). ``AUC = P(s_member > s_non) + ½·P(=)``; the retrain model, which saw
  neither, sits near 0.5; the poisoned model well above.
"""

from __future__ import annotations

import numpy as np


def ks_stat(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic ``max_x |F_a(x) − F_b(x)|`` over the pooled sample points (vectorised)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_perm_test(a: np.ndarray, b: np.ndarray, n_perm: int = 10000, seed: int = 0) -> dict[str, float]:
    """KS statistic and permutation p-value of ``a`` vs ``b`` (pooled samples relabelled ``n_perm`` times).

    Vectorised over permutations: for each permutation the empirical CDFs are compared at every pooled point.
    Returns ``{"ks_stat", "ks_p", "n_perm"}``.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ks_perm_test needs two non-empty samples")
    d = ks_stat(a, b)
    pooled = np.concatenate([a, b])
    n, m = len(a), len(b)
    order = np.argsort(pooled, kind="stable")
    ranks_sorted = pooled[order]
    # A point's CDF step happens at the last index of its tie group: evaluate the CDFs there only.
    last_of_tie = np.r_[ranks_sorted[1:] != ranks_sorted[:-1], True]  # (n+m,)
    rng = np.random.default_rng(seed)
    count = 0
    chunk = 2000
    done = 0
    while done < n_perm:
        k = min(chunk, n_perm - done)
        keys = rng.random((k, n + m))
        in_a = np.argsort(keys, axis=1) < n  # (k, n+m): a uniformly random relabelling, n of them "a"
        in_a_sorted = in_a[:, order]  # labels along the sorted pooled values
        fa = np.cumsum(in_a_sorted, axis=1) / n
        fb = np.cumsum(~in_a_sorted, axis=1) / m
        dp = np.max(np.abs(fa - fb)[:, last_of_tie], axis=1)  # (k,)
        count += int(np.sum(dp >= d - 1e-12))
        done += k
    return {"ks_stat": d, "ks_p": (1 + count) / (1 + n_perm), "n_perm": n_perm}


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """``P(s_m > s_n) + ½·P(s_m = s_n)`` over every (member, non-member) pair, by mid-ranks (Mann–Whitney U)."""
    m, n = np.asarray(members, float), np.asarray(non_members, float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("auc needs members and non-members")
    pooled = np.concatenate([m, n])
    order = np.argsort(pooled, kind="stable")
    ranks = np.empty(len(pooled))
    sorted_vals = pooled[order]
    # mid-ranks of tie groups (1-based)
    starts = np.r_[0, np.flatnonzero(sorted_vals[1:] != sorted_vals[:-1]) + 1]
    ends = np.r_[starts[1:], len(pooled)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))
