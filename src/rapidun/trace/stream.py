"""Streaming retrieval: corpus sketches × probe sketches, one shard at a time, with a running top-k.

Notation: ``N`` corpus records, ``Q`` probes, ``K`` sketch length, ``m`` rows of one streamed chunk. The score of
corpus record ``i`` for probe ``j`` is the influence ``I[i, j] = ⟨g_i, p_j⟩`` (mode ``"dot"``; ``"cosine"`` divides
by both norms, a zero row scoring 0) of :mod:`rapidun.influence.retrieval`. Per record three aggregates are kept:

    mean_i  = (1/Q) Σ_j I[i, j]
    max_i   = max_j I[i, j]
    count_i = #{ j : i is among the k highest-scoring records of probe j }

Memory: the ``(N, Q)`` matrix is never formed; the state is three length-``N`` vectors (12 bytes per record)
plus ``(Q, k)`` running top-k values and indices, plus one chunk ``(m, K)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from rapidun.errors import RapidunError
from rapidun.influence.retrieval import MODES, NORM_EPS

AGGREGATES = ("mean", "max", "count")


@dataclass
class Scores:
    """Per-record aggregates and the per-probe top-k of a streamed retrieval."""

    mean: torch.Tensor  # (N,) float32
    max: torch.Tensor  # (N,) float32
    count: torch.Tensor  # (N,) int64
    top_idx: torch.Tensor  # (Q, k') int64, best first (k' = min(k, N))
    top_val: torch.Tensor  # (Q, k') float32

    def key(self, aggregate: str) -> torch.Tensor:
        """The ranking score of every record for ``aggregate`` (``mean``, ``max`` or ``count``), ``(N,)``."""
        if aggregate not in AGGREGATES:
            raise RapidunError(f"unknown trace aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        return getattr(self, aggregate).to(torch.float32)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / ‖x‖`` row-wise, ``(n, K)``; a row with norm below ``NORM_EPS`` becomes zero (it scores 0)."""
    norms = x.norm(dim=1, keepdim=True)  # (n, 1)
    return torch.where(norms < NORM_EPS, torch.zeros_like(x), x / norms.clamp_min(NORM_EPS))


def _merge_topk(
    vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of the running ``(Q, a)`` and the new ``(Q, m)`` candidates: value descending, ties by
    the smaller record index (the order a full stable ranking gives)."""
    v = torch.cat([vals, new_vals], dim=1)  # (Q, a + m)
    i = torch.cat([idx, new_idx], dim=1)  # (Q, a + m)
    by_idx = torch.argsort(i, dim=1, stable=True)  # (Q, a + m)
    v, i = v.gather(1, by_idx), i.gather(1, by_idx)
    by_val = torch.argsort(-v, dim=1, stable=True)[:, :k]  # (Q, k) best first, ties by index
    return v.gather(1, by_val), i.gather(1, by_val)


def stream_scores(
    chunks: Iterable[tuple[list[int], torch.Tensor]],
    probes: torch.Tensor,
    n: int,
    k: int,
    mode: str = "dot",
) -> Scores:
    """Aggregate influence scores of ``n`` corpus records over ``Q`` probes, streaming the corpus.

    Args:
        chunks: Iterable of ``(positions, rows)``: ``rows`` a ``(m, K)`` float tensor holding the sketches of the
            corpus records at ``positions`` (indices in ``range(n)``); every position must come exactly once
            (e.g. :meth:`rapidun.influence.cache.SketchCache.iter_rows`).
        probes: ``(Q, K)`` probe sketches.
        n: Corpus size ``N``.
        k: Records kept per probe for the top-k (and the count aggregate); clipped to ``n``.
        mode: ``"dot"`` or ``"cosine"``.

    Returns:
        :class:`Scores`.

    Raises:
        RapidunError: Unknown mode, a bad ``k``, shapes that do not fit, or positions missing/repeated/out of range.
    """
    if mode not in MODES:
        raise RapidunError(f"unknown influence mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RapidunError(f"trace top-k must be a positive integer, got {k!r}")
    if probes.ndim != 2 or probes.shape[0] < 1:
        raise RapidunError(f"probe sketches must be a non-empty (Q, K) tensor, got {tuple(probes.shape)}")
    q = probes.to(torch.float32)  # (Q, K)
    if mode == "cosine":
        q = _unit_rows(q)  # (Q, K)
    Q, kk = q.shape[0], min(k, n)
    total = torch.zeros(n, dtype=torch.float64)  # (N,) float64: a sum over many probes stays exact enough
    best = torch.full((n,), float("-inf"))  # (N,)
    seen = torch.zeros(n, dtype=torch.bool)  # (N,)
    top_val = torch.empty(Q, 0)  # (Q, 0) grows to (Q, k')
    top_idx = torch.empty(Q, 0, dtype=torch.long)
    for positions, rows in chunks:
        pos = torch.as_tensor(positions, dtype=torch.long)  # (m,)
        if rows.ndim != 2 or rows.shape[1] != q.shape[1] or rows.shape[0] != pos.numel():
            raise RapidunError(
                f"a corpus chunk has shape {tuple(rows.shape)} for {pos.numel()} positions; expected (m, {q.shape[1]})"
            )
        if pos.numel() == 0:
            continue
        if int(pos.min()) < 0 or int(pos.max()) >= n or bool(seen[pos].any()) or pos.unique().numel() != pos.numel():
            raise RapidunError("corpus chunks must cover every position in range(n) exactly once")
        seen[pos] = True
        r = rows.to(torch.float32)  # (m, K)
        if mode == "cosine":
            r = _unit_rows(r)  # (m, K)
        s = r @ q.T  # (m, Q)
        total[pos] = s.sum(dim=1, dtype=torch.float64)
        best[pos] = s.max(dim=1).values
        top_val, top_idx = _merge_topk(top_val, top_idx, s.T, pos.expand(Q, -1), kk)
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:5].tolist()
        raise RapidunError(f"corpus chunks left out {int((~seen).sum())} position(s), e.g. {missing}")
    count = torch.bincount(top_idx.flatten(), minlength=n)  # (N,)
    return Scores((total / Q).to(torch.float32), best, count, top_idx, top_val)


def full_scores(corpus: torch.Tensor, probes: torch.Tensor, k: int, mode: str = "dot") -> Scores:
    """The same aggregates from the whole ``(N, Q)`` matrix in memory: the obvious version, for tests and small
    sets. Ties in the top-k go to the smaller index (stable sort)."""
    from rapidun.influence.retrieval import influence_matrix

    M = influence_matrix(corpus, probes, mode)  # (N, Q)
    kk = min(k, M.shape[0])
    order = torch.argsort(-M.T, dim=1, stable=True)[:, :kk]  # (Q, k')
    top_val = M.T.gather(1, order)  # (Q, k')
    count = torch.bincount(order.flatten(), minlength=M.shape[0])  # (N,)
    return Scores(M.mean(dim=1), M.max(dim=1).values, count, order, top_val)
