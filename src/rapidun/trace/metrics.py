"""How well a ranking finds known culprits, and the text baseline it must beat.

A ranking is a score per corpus record (higher = more suspect); ``labels`` marks the culprits (True). Ties are
handled the way a threshold on the score sees them:

* ``precision_at_k`` / ``recall_at_k``: the ``k`` first records of the ranking (score descending, ties broken by
  the smaller index, i.e. corpus order), precision = culprits among them / k, recall = culprits among them / all
  culprits;
* ``average_precision`` (the area under the precision-recall curve, step-wise as in scikit-learn): with the
  distinct scores ``t_1 > t_2 > ...`` as thresholds, ``AP = Σ_n (R_n − R_{n−1}) · P_n`` where ``P_n, R_n`` are the
  precision and recall of "score ≥ t_n"; a block of tied records enters all at once.

BM25 (Robertson–Spärck Jones, ``k1`` 1.5, ``b`` 0.75): the score of document ``d`` for query ``q`` is
``Σ_{w ∈ q} idf(w) · f(w,d)·(k1+1) / (f(w,d) + k1·(1 − b + b·|d|/avgdl))`` with
``idf(w) = ln(1 + (N − n_w + 0.5)/(n_w + 0.5))``, words counted with multiplicity in the query.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from rapidun.errors import RapidunError

_TOKEN = re.compile(r"\w+", re.UNICODE)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)  # (N,)
    y = np.asarray(labels, dtype=bool).reshape(-1)  # (N,)
    if s.shape != y.shape:
        raise RapidunError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.isfinite(s).all():
        raise RapidunError("ranking scores must be finite")
    return s, y


def ranking(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Record indices by score descending, ties by the smaller index, ``(N,)``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.lexsort((np.arange(s.size), -s))


def precision_recall_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """(precision@k, recall@k) of the ranking; recall is 0 when there is no culprit."""
    s, y = _check(scores, labels)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RapidunError(f"k must be a positive integer, got {k!r}")
    kk = min(k, s.size)
    hits = int(y[ranking(s)[:kk]].sum())
    return hits / kk if kk else 0.0, hits / int(y.sum()) if y.any() else 0.0


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Tie-aware average precision (see module docstring); None when there is no culprit."""
    s, y = _check(scores, labels)
    if not y.any():
        return None
    order = np.argsort(-s, kind="stable")  # (N,)
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # (T,) last position of each block of equal scores
    tp = np.cumsum(y)[last]  # (T,) culprits with score ≥ t_n
    precision = tp / (last + 1)  # (T,)
    recall = tp / y.sum()  # (T,)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tokens(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, underscore; any script)."""
    return _TOKEN.findall(text.lower())


def bm25(docs: Sequence[str], queries: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 score of every document for every query, ``(N, Q)`` float64 (formula in the module docstring)."""
    toks = [tokens(d) for d in docs]
    n = len(toks)
    if n == 0:
        return np.zeros((0, len(queries)))
    tf = [Counter(t) for t in toks]
    df: Counter[str] = Counter()
    for c in tf:
        df.update(c.keys())
    lengths = np.array([len(t) for t in toks], dtype=np.float64)  # (N,)
    avgdl = max(float(lengths.mean()), 1e-12)
    norm = k1 * (1.0 - b + b * lengths / avgdl)  # (N,)
    out = np.zeros((n, len(queries)))  # (N, Q)
    for j, qtext in enumerate(queries):
        for w, mult in Counter(tokens(qtext)).items():
            nw = df.get(w, 0)
            if nw == 0:
                continue
            idf = math.log(1.0 + (n - nw + 0.5) / (nw + 0.5))
            f = np.array([c.get(w, 0) for c in tf], dtype=np.float64)  # (N,)
            out[:, j] += mult * idf * f * (k1 + 1.0) / (f + norm)
    return out


def retrieval_metrics(scores: np.ndarray, families: Sequence[str | None], k: int) -> dict[str, object]:
    """Precision/recall@k and AP of finding the culprits, overall and per family.

    Args:
        scores: ``(N,)`` ranking scores, higher = more suspect.
        families: ``N`` entries, a culprit's family (e.g. its trigger family) or None for an innocent record.
        k: The cut-off (e.g. the number of culprits).

    Returns:
        ``{"k", "n", "n_culprits", "precision_at_k", "recall_at_k", "auprc", "families": {f: {"n", "recall_at_k",
        "auprc"}}}``. A family's recall@k counts its culprits in the overall top ``k``; its AP ranks its culprits
        against the innocent records only (the other families' culprits left out).
    """
    y = np.array([f is not None for f in families])
    s = np.asarray(scores, dtype=np.float64)
    p, r = precision_recall_at_k(s, y, k)
    top = set(ranking(s)[: min(k, s.size)].tolist())
    fams: dict[str, dict[str, object]] = {}
    for f in sorted({f for f in families if f is not None}):
        mine = np.array([g == f for g in families])
        keep = mine | ~y
        fams[f] = {
            "n": int(mine.sum()),
            "recall_at_k": sum(1 for i in np.nonzero(mine)[0] if i in top) / int(mine.sum()),
            "auprc": average_precision(s[keep], mine[keep]),
        }
    return {
        "k": k,
        "n": int(s.size),
        "n_culprits": int(y.sum()),
        "precision_at_k": p,
        "recall_at_k": r,
        "auprc": average_precision(s, y),
        "families": fams,
    }
