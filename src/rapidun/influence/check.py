"""Fidelity of the RapidGrad sketch: sketched vs exact gradient inner products on real samples.

For n samples with exact per-sample gradients G (n, D), compare the exact inner products ⟨g_i, g_j⟩ (i ≠ j) with
the sketched ones ⟨P g_i, P g_j⟩ for several sketch lengths K: Pearson and Spearman correlation over all pairs,
and the mean top-k overlap (for each sample, the share of its k most influential other samples found by both).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rapidun.influence.sketch import RapidGrad


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor (ties broken by position)."""
    r = torch.empty_like(x)
    r[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=x.dtype)
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation = Pearson correlation of the ranks."""
    return pearson(rank(a.double()), rank(b.double()))


def topk_overlap(exact: torch.Tensor, approx: torch.Tensor, k: int) -> float:
    """Mean over columns j of |top-k_i exact[:, j] ∩ top-k_i approx[:, j]| / k, self-pairs excluded.

    Args:
        exact: (n, n) exact inner products.
        approx: (n, n) sketched inner products.
        k: how many top entries per column.
    """
    n = exact.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    e = exact.masked_fill(eye, float("-inf"))  # (n, n)
    a = approx.masked_fill(eye, float("-inf"))  # (n, n)
    k = min(k, n - 1)
    te = e.topk(k, dim=0).indices  # (k, n)
    ta = a.topk(k, dim=0).indices  # (k, n)
    hits = [len(set(te[:, j].tolist()) & set(ta[:, j].tolist())) for j in range(n)]
    return sum(hits) / (k * n)


def sketch_fidelity(G: torch.Tensor, Ks: list[int], seed: int, rounds: int, k: int = 10) -> list[dict[str, Any]]:
    """Compare sketched with exact inner products of the rows of ``G`` (n, D) for each K in ``Ks``."""
    n = G.shape[0]
    exact = (G.double() @ G.double().T).float()  # (n, n)
    off = ~torch.eye(n, dtype=torch.bool)  # (n, n) pairs i != j
    rows = []
    for K in Ks:
        t0 = time.perf_counter()
        proj = RapidGrad(G.shape[1], K, seed, rounds, device=G.device)
        t1 = time.perf_counter()
        P = proj.project(G).half().float()  # (n, K), stored in fp16 as in the cache
        t2 = time.perf_counter()
        approx = P @ P.T  # (n, n)
        rows.append(
            {
                "K": K,
                "pearson": pearson(exact[off], approx[off]),
                "spearman": spearman(exact[off], approx[off]),
                f"top{min(k, n - 1)}_overlap": topk_overlap(exact, approx, k),
                "pairs": int(off.sum()),
                "map_build_s": t1 - t0,
                "sketch_s_per_sample": (t2 - t1) / n,
            }
        )
    return rows
