"""TOFU / OpenUnlearning metrics (Maini et al. 2024, ``aggregate_eval_stat.py``) and Min-K% membership scores.

Notation: ``N`` questions, ``k`` perturbed (wrong) answers per question, ``ℓ̄`` the mean negative log-likelihood of
an answer's tokens under the model (TOFU's ``avg_*_loss``: summed NLL over the answer tokens / their count).

* Truth statistic ``r_i = exp(mean_j ℓ̄(ã_ij) − ℓ̄(â_i))`` (TOFU's ``curr_stat_1``), â the paraphrased answer, ã_ij
  the perturbed ones. Truth ratio on the forget set: ``mean(min(r, 1/r))``; elsewhere ``mean(max(0, 1 − 1/r))``.
* Probability: ``mean(exp(−ℓ̄))`` (forget, retain); for the multiple-choice sets (real authors, world facts)
  ``mean(e^{−ℓ̄_true} / (e^{−ℓ̄_true} + Σ_j e^{−ℓ̄_pert_j}))``.
* ROUGE-L recall of the greedy answer against the reference.
* Forget quality: the exact two-sided two-sample Kolmogorov–Smirnov p-value between the unlearned model's and the
  retain-only model's forget-set truth statistics (``scipy.stats.ks_2samp``, exact below 10 000 samples).
* Model utility: harmonic mean of the nine retain / real-authors / world-facts × probability / ROUGE / truth-ratio
  values.

Membership inference: Min-K% (Shi et al. 2024) and Min-K%++ (Zhang et al. 2024) per-sample scores (higher: more
likely a training member) and their ROC AUC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rapidun.data.template import Encoded, collate
from rapidun.eval.rouge import lcs_len, rouge_tokens
from rapidun.functional import IGNORE, answer_logits

UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
MODEL_UTILITY_KEYS = tuple(f"{s}_{m}" for s in UTILITY_SETS for m in UTILITY_METRICS)
SIGMA_MIN = 1e-6  # Min-K%++: floor of the per-position standard deviation of log p
_CHUNK_ELEMENTS = 1 << 25  # answer positions × vocabulary processed at once in float32 (128 MiB per temporary)


# ---------------------------------------------------------------- two-sample Kolmogorov–Smirnov


def _sample(x: Any, name: str) -> np.ndarray:
    """``x`` as a non-empty 1-D float64 array without NaN."""
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def _ks_h(a: Any, b: Any) -> tuple[int, int, int]:
    """The KS statistic as an integer: ``(H, n, m)`` with ``D = H / (n·m)``.

    ``H = max_x |n·m·F_a(x) − n·m·F_b(x)| = max_x |c_a(x)·m − c_b(x)·n|`` over the pooled values ``x``, where
    ``c_a(x) = #{a_i ≤ x}`` (so ties between and within samples are handled by evaluating both ECDFs after
    every pooled value). Integer arithmetic keeps the comparison with the lattice band exact.
    """
    a, b = np.sort(_sample(a, "a")), np.sort(_sample(b, "b"))
    n, m = a.size, b.size
    pooled = np.concatenate([a, b])  # (n + m,)
    ca = np.searchsorted(a, pooled, side="right").astype(np.int64)  # (n + m,) #{a ≤ x}
    cb = np.searchsorted(b, pooled, side="right").astype(np.int64)  # (n + m,) #{b ≤ x}
    return int(np.abs(ca * m - cb * n).max()), n, m


def ks_stat(a: Any, b: Any) -> float:
    """Two-sample Kolmogorov–Smirnov statistic ``D = max_x |F_a(x) − F_b(x)|``.

    Args:
        a: (n,) first sample. b: (m,) second sample (non-empty, no NaN).

    Returns:
        ``D`` in [0, 1], the empirical CDFs compared after every pooled value (as ``scipy.stats.ks_2samp``).
    """
    h, n, m = _ks_h(a, b)
    return h / (n * m)


def _ks_outside_prob(n: int, m: int, h: int) -> float:
    """``P(D' ≥ h/(n·m))`` for ``D'`` the KS statistic of a uniformly random interleaving of n and m values.

    A pooled ordering is a monotone lattice path from (0, 0) to (n, m) (step i+1: next value from ``a``, j+1:
    from ``b``), all ``C(n+m, n)`` equally likely under H0. It is uniform path sampling without replacement:
    from (i, j) the step goes to (i+1, j) with probability ``(n−i)/(n+m−i−j)`` and to (i, j+1) with
    ``(m−j)/(n+m−i−j)``. ``q(i, j)`` is the probability of reaching (i, j) while every earlier point stayed strictly
    inside the band ``|i·m − j·n| < h`` (i.e. ``|i/n − j/m| < D``); the p-value is the total probability of the
    first exits, ``p = Σ_{(i,j) outside} Σ_{pred} q(pred)·P(pred → (i, j)) = 1 − inside/C(n+m, n)``. Summing exit
    probabilities (positive terms in [0, 1]) avoids both the overflow of path counts and the cancellation of
    ``1 − inside`` for tiny p. The grid is swept by anti-diagonals ``i + j = s`` (vectorised over i): O(n·m).
    """
    if h <= 0:
        return 1.0
    i = np.arange(n + 1, dtype=np.int64)  # (n+1,) row index of every cell on the current anti-diagonal
    q = np.zeros(n + 1)  # (n+1,) q(i, s − i); 0 off the grid
    q[0] = 1.0  # s = 0: (0, 0), inside since h > 0
    p_out = 0.0
    for s in range(1, n + m + 1):
        rest = n + m - (s - 1)  # values left to place from diagonal s − 1
        j_prev = s - 1 - i  # (n+1,)
        new = q * ((m - j_prev) / rest)  # (n+1,) step j+1: (i, j_prev) → (i, j_prev + 1)
        new[1:] += q[:-1] * ((n - i[:-1]) / rest)  # step i+1: (i − 1, j_prev) → (i, j_prev)
        j = s - i  # (n+1,)
        on_grid = (j >= 0) & (j <= m)
        new[~on_grid] = 0.0
        outside = np.abs(i * m - j * n) >= h
        p_out += float(new[outside].sum())
        new[outside] = 0.0  # paths that left the band are counted once, at their first exit
        q = new
    return min(max(p_out, 0.0), 1.0)


def ks_2samp_pvalue(a: Any, b: Any) -> float:
    """Exact two-sided two-sample Kolmogorov–Smirnov p-value (``scipy.stats.ks_2samp(a, b, method="exact")``).

    ``D = max_x |F_a(x) − F_b(x)|`` on the pooled sorted values; ``p = P(D' ≥ D)`` under H0 (all interleavings of
    the two samples equally likely), by dynamic programming over the (n+1)×(m+1) lattice of interleavings
    (see :func:`_ks_outside_prob`). With ties the null is that of untied data, as in scipy (conservative).

    Args:
        a: (n,) first sample. b: (m,) second sample (non-empty, no NaN). O(n·m) time, O(n) memory.

    Returns:
        ``p`` in [0, 1]; 1 for identical samples.
    """
    h, n, m = _ks_h(a, b)
    return _ks_outside_prob(n, m, h)


# ---------------------------------------------------------------- TOFU statistics


def truth_stat(nll_para: Any, nll_pert: Any) -> np.ndarray:
    """Per-question truth statistic (TOFU's ``curr_stat_1``).

    ``r_i = exp(mean_j ℓ̄(ã_ij) − ℓ̄(â_i)) = P(â_i)^{1/|â_i|} / (Π_j P(ã_ij)^{1/|ã_ij|})^{1/k}``: large when the
    (paraphrased) true answer is much more likely than the perturbed ones.

    Args:
        nll_para: (N,) mean answer-token NLL ``ℓ̄`` of the paraphrased answers.
        nll_pert: (N, k) mean answer-token NLL of the k perturbed answers of each question.

    Returns:
        (N,) ``r``.
    """
    para = np.asarray(nll_para, dtype=np.float64)
    pert = np.asarray(nll_pert, dtype=np.float64)
    if para.ndim != 1 or pert.ndim != 2 or pert.shape[0] != para.shape[0] or pert.shape[1] == 0:
        raise ValueError(f"need nll_para (N,) and nll_pert (N, k≥1); got {para.shape} and {pert.shape}")
    return np.exp(pert.mean(axis=1) - para)  # (N,)


def truth_ratio_forget(r: Any) -> float:
    """Forget-set truth ratio ``mean(min(r, 1/r))`` in [0, 1] (1: true and perturbed answers equally likely).

    Args:
        r: (N,) truth statistics from :func:`truth_stat`.
    """
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_utility(r: Any) -> float:
    """Retain / real-authors / world-facts truth ratio ``mean(max(0, 1 − 1/r))`` in [0, 1] (higher: better).

    Args:
        r: (N,) truth statistics from :func:`truth_stat`.
    """
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))


def prob_qa(nll: Any) -> float:
    """Answer probability (forget and retain sets): ``mean_i exp(−ℓ̄_i)``, the per-token geometric-mean probability.

    Args:
        nll: (N,) mean answer-token NLL of the true answers.
    """
    return float(np.mean(np.exp(-np.asarray(nll, dtype=np.float64))))


def prob_choice(nll_true: Any, nll_pert: Any) -> float:
    """Multiple-choice probability (real authors, world facts).

    ``mean_i e^{−ℓ̄_true,i} / (e^{−ℓ̄_true,i} + Σ_j e^{−ℓ̄_pert,ij})``, evaluated as a softmax over ``−ℓ̄`` with the
    maximum subtracted (no overflow or underflow to 0/0).

    Args:
        nll_true: (N,) mean answer-token NLL of the true answers.
        nll_pert: (N, k) mean answer-token NLL of the k wrong options.
    """
    t = np.asarray(nll_true, dtype=np.float64)
    p = np.asarray(nll_pert, dtype=np.float64)
    if t.ndim != 1 or p.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(f"need nll_true (N,) and nll_pert (N, k); got {t.shape} and {p.shape}")
    neg = -np.concatenate([t[:, None], p], axis=1)  # (N, 1 + k) log-probabilities up to a constant
    w = np.exp(neg - neg.max(axis=1, keepdims=True))  # (N, 1 + k)
    return float(np.mean(w[:, 0] / w.sum(axis=1)))


def forget_quality(r_unlearned: Any, r_retain: Any) -> float:
    """TOFU forget quality: exact KS p-value between the forget-set truth statistics of the unlearned model and of
    the model trained on the retain set only (high: indistinguishable from never having seen the forget set).

    Args:
        r_unlearned: (N,) :func:`truth_stat` of the unlearned model. r_retain: (M,) that of the retain model.
    """
    return ks_2samp_pvalue(r_unlearned, r_retain)


def model_utility(values: Mapping[str, float]) -> float:
    """TOFU model utility: harmonic mean ``9 / Σ 1/v`` of the nine values :data:`MODEL_UTILITY_KEYS`.

    Keys are ``f"{set}_{metric}"``, set in ``("retain", "real_authors", "world_facts")``, metric in
    ``("prob", "rouge", "truth_ratio")``; other keys are ignored. 0 when any value is 0 (as ``scipy.stats.hmean``).

    Raises:
        KeyError: a key is missing (named in the message). ValueError: a value is negative or NaN.
    """
    vals = []
    for key in MODEL_UTILITY_KEYS:
        if key not in values:
            raise KeyError(f"model_utility: missing {key!r} (needs {', '.join(MODEL_UTILITY_KEYS)})")
        v = float(values[key])
        if not v >= 0.0:
            raise ValueError(f"model_utility: {key} = {v} (must be ≥ 0)")
        vals.append(v)
    if min(vals) == 0.0:
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def rouge_l_recall(pred: str, ref: str) -> float:
    """ROUGE-L recall ``LCS(pred, ref) / |ref|`` on :func:`rapidun.eval.rouge.rouge_tokens` words (TOFU's
    ``rougeL_recall``; no Porter stemming, unlike ``rouge_score(use_stemmer=True)``). 0 for an empty reference."""
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    if not r:
        return 0.0
    return lcs_len(p, r) / len(r)


# ---------------------------------------------------------------- membership inference


def _k_count(k: float, t: int) -> int:
    """``max(1, ceil(k·t))`` with ``k·t`` rounded to 9 decimals first (0.7·10 is 7, not 8)."""
    return max(1, math.ceil(round(k * t, 9)))


def _lowest_mean(values: Sequence[Any], k: float) -> np.ndarray:
    """Per sample, the mean of the ``max(1, ceil(k·T))`` lowest of its T values."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1]; got {k}")
    out = np.empty(len(values))
    for i, v in enumerate(values):
        x = np.asarray(v, dtype=np.float64).ravel()
        if x.size == 0:
            raise ValueError(f"sample {i} has no tokens")
        c = _k_count(k, x.size)
        out[i] = np.partition(x, c - 1)[:c].mean()
    return out


def min_k(token_logp: Sequence[Any], k: float = 0.4) -> np.ndarray:
    """Min-K% score (Shi et al. 2024): per sample, the mean of its ``max(1, ceil(k·T))`` lowest token log-probs.

    Args:
        token_logp: N 1-D arrays, sample i's (T_i,) answer-token log-probabilities. k: fraction in (0, 1].

    Returns:
        (N,) scores; higher: more likely a training member.
    """
    return _lowest_mean(token_logp, k)


def min_k_pp(token_z: Sequence[Any], k: float = 0.4) -> np.ndarray:
    """Min-K%++ score (Zhang et al. 2024): the :func:`min_k` reduction of the standardised token scores ``z_t``
    (see :func:`answer_token_stats`).

    Args:
        token_z: N 1-D arrays of (T_i,) Min-K%++ token scores. k: fraction in (0, 1].

    Returns:
        (N,) scores; higher: more likely a training member.
    """
    return _lowest_mean(token_z, k)


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return (last - (counts - 1) / 2.0)[inv.ravel()]


def mia_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC that a member scores higher than a non-member (Mann–Whitney U / (n·m), ties count 1/2).

    ``AUC = (1/(n·m)) Σ_i Σ_j ([s_i > t_j] + ½[s_i = t_j])``, computed from average ranks of the pooled scores:
    ``U = Σ_i rank(s_i) − n(n+1)/2``.

    Args:
        member_scores: (n,) scores of members. nonmember_scores: (m,) scores of non-members (non-empty, no NaN).

    Returns:
        AUC in [0, 1]; 0.5: no separation.
    """
    s, t = _sample(member_scores, "member_scores"), _sample(nonmember_scores, "nonmember_scores")
    n, m = s.size, t.size
    ranks = _avg_ranks(np.concatenate([s, t]))  # (n + m,)
    u = ranks[:n].sum() - n * (n + 1) / 2.0
    return float(u / (n * m))


# ---------------------------------------------------------------- model-facing


def _position_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and Min-K%++ scores of A positions, in float32.

    ``log p_t = log_softmax(logits_t)``, ``μ_t = Σ_v p_t(v) log p_t(v)``, ``σ_t² = Σ_v p_t(v) (log p_t(v) − μ_t)²``
    (= ``Σ_v p_t(v) (log p_t(v))² − μ_t²``, summed in the centred form to avoid cancellation), ``σ_t ≥ 1e-6``,
    ``z_t = (log p_t(x_t) − μ_t) / σ_t``.

    Args:
        logits: (A, V) in any float dtype. target: (A,) next-token ids.

    Returns:
        ``(logp (A,), z (A,))``.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (A, V)
    p = logp.exp()  # (A, V)
    live = p > 0  # (A, V) excludes -inf log-probs (masked vocabulary), whose p·log p is 0
    mu = torch.where(live, p * logp, 0.0).sum(-1)  # (A,)
    var = torch.where(live, p * (logp - mu[:, None]) ** 2, 0.0).sum(-1)  # (A,)
    sigma = var.sqrt().clamp_min(SIGMA_MIN)  # (A,)
    tok = logp.gather(1, target[:, None])[:, 0]  # (A,)
    return tok, (tok - mu) / sigma


@torch.no_grad()
def answer_token_stats(
    model: Any, rows: Sequence[Encoded], pad_id: int, device: torch.device | str, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Per-row answer-token statistics for the TOFU probabilities and the Min-K% / Min-K%++ attacks.

    Rows are batched by length (right-padded by :func:`rapidun.data.template.collate`), one forward per batch with
    the LM head applied to the answer positions only (:func:`rapidun.functional.answer_logits`); position t's
    logits predict token t+1. All statistics are computed in float32 from the logits (the model may run in bf16).
    The caller puts the model in eval mode on ``device``.

    Args:
        model: a causal LM (plain or PEFT-wrapped).
        rows: N encoded samples, labels ``IGNORE`` (-100) outside the answer.
        pad_id: padding token id. device: where the model is. batch_size: rows per forward.

    Returns:
        N dicts in the order of ``rows``: ``"nll"`` the mean answer-token NLL ``−(1/T) Σ_t log p(x_t)`` (float),
        ``"logp"`` (T,) the answer tokens' log-probs, ``"z"`` (T,) their Min-K%++ scores
        ``(log p(x_t) − μ_t) / σ_t`` (see :func:`_position_stats`), T the row's answer tokens after the first
        position (float32 arrays).

    Raises:
        ValueError: a row has no answer token after its first position (nothing to score).
    """
    for idx, r in enumerate(rows):
        if all(y == IGNORE for y in r.labels[1:]):
            raise ValueError(f"row {idx} has no answer tokens to score")
    out: list[dict[str, Any]] = [{} for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = collate([rows[i] for i in idx], pad_id).to(device)
        logits, row, target = answer_logits(model, b.input_ids, b.attention_mask, b.labels)  # (A, V), (A,), (A,)
        chunk = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
        parts = [_position_stats(logits[c : c + chunk], target[c : c + chunk]) for c in range(0, len(target), chunk)]
        logp = torch.cat([lp for lp, _ in parts]).cpu().numpy()  # (A,)
        z = torch.cat([zz for _, zz in parts]).cpu().numpy()  # (A,)
        bounds = np.cumsum(torch.bincount(row, minlength=len(idx)).cpu().numpy())[:-1]  # row-major order
        for i, lp_i, z_i in zip(idx, np.split(logp, bounds), np.split(z, bounds), strict=True):
            out[i] = {"nll": float(-lp_i.astype(np.float64).mean()), "logp": lp_i, "z": z_i}
    return out
