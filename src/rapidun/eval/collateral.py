"""Collateral damage on clean prompts: did the unlearning change answers it had no reason to touch?

A run can leave every forget-side figure and the held-out perplexity looking fine while the model now gives the
forget records' replacement answer (e.g. a refusal) to unrelated questions. Three measures, each comparing the
model after unlearning with the start model on the same clean prompts (never trained on):

* **replacement rate** — the fraction of clean prompts whose greedy answer *is* a replacement answer:
  ``replaced(a) ⇔ max_r LCS(a, r) / |r| ≥ REPLACEMENT_RECALL`` over the distinct replacement answers ``r`` of the
  forget records (``meta["response_clean"]``), i.e. the ROUGE-L recall of some replacement in the answer (words:
  :func:`rapidun.eval.rouge.rouge_tokens`) is at least 0.5. Compared with the start model's rate on the same
  prompts; a rise of more than :data:`MAX_REPLACEMENT_RISE` (absolute) warns.
* **agreement** — token-level agreement of the two models' greedy answers over their first ``N`` tokens (the
  answer texts encoded by the tokenizer, no special tokens): per prompt
  ``agree_i = #{t < min(|a_i|, |b_i|): a_it = b_it} / max(|a_i|, |b_i|)`` with both truncated to ``N``
  (1 when both are empty), averaged over prompts. Below :data:`MIN_AGREEMENT` (0.2) warns.
* **KL drift** — the mean per-token ``KL(start ‖ after)`` of the next-token distributions on clean answers,
  teacher-forced (the held-out records' own answers; on probes the start model's greedy answers). The start
  model's distribution is kept as its top :data:`KL_TOPK` tokens plus one bin for the rest of the vocabulary,
  so the start model need not stay in memory: ``KL_t = Σ_{v∈top} p_v log(p_v/q_v) + p_rest log(p_rest/q_rest)``,
  the KL of the coarse-grained distributions, a lower bound on the exact KL (log-sum inequality) and equal to it
  when ``KL_TOPK ≥ V``. Reported, not thresholded (its scale depends on the model).

Notation: Q prompts, N compared tokens, R replacement answers, A answer positions, V vocabulary, K top tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rapidun.data.template import Encoded, collate
from rapidun.eval.generate import generate
from rapidun.eval.rouge import rouge_tokens
from rapidun.functional import answer_logits, nll_by_row

AGREE_TOKENS = 32  # N: greedy tokens compared between the start model's answer and the unlearned model's
KL_TOPK = 64  # K: start-model tokens kept per answer position for the KL (the rest is one bin)
REPLACEMENT_RECALL = 0.5  # ROUGE-L recall of a replacement answer in an answer from which it counts as given
MAX_REPLACEMENT_RISE = 0.10  # replacement rate on clean prompts after − before above which a run warns
# Mean token agreement with the start model's answers below which a run warns. One flipped token early in a greedy
# answer makes the rest of it differ, so agreement well below 1 is normal for any run that moved the model: the tiny
# test model at the tests' settings ~0.6; SmolLM2-135M after 40 mild draws (lr 5e-4, retain descent teaching a
# style) 0.32 with no replacement and held-out perplexity x0.50; the same model destroyed by ascent 0.0.
MIN_AGREEMENT = 0.2


def lcs_bitparallel(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` with one big-integer pass over ``a``.

    Bit-parallel LCS (Allison & Dix 1986; Hyyrö 2004): bit j of ``M[c]`` marks ``b[j] == c``; with ``V`` all ones
    (|b| bits), for each ``c`` in ``a``: ``U = V & M[c]``, ``V = ((V + U) | (V − U)) & mask``. The LCS is the
    number of zero bits of ``V``. O(|a|) word operations on |b|-bit integers instead of the O(|a|·|b|) table of
    :func:`rapidun.eval.rouge.lcs_len` (which it equals).
    """
    n = len(b)
    if n == 0 or not a:
        return 0
    masks: dict[str, int] = {}
    for j, c in enumerate(b):
        masks[c] = masks.get(c, 0) | (1 << j)
    full = (1 << n) - 1
    v = full
    for c in a:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return n - bin(v).count("1")


def replacement_scores(answers: Sequence[str], replacements: Sequence[str]) -> list[float]:
    """(Q,) ``max_r LCS(answer, r) / |r|``: the ROUGE-L recall of the best-matching replacement in each answer.

    ``replacements`` are de-duplicated by their words first; answers score 0 when there is none.
    """
    refs = list({tuple(t): None for r in replacements if (t := rouge_tokens(r))})
    out = []
    for ans in answers:
        words = rouge_tokens(ans)
        out.append(max((lcs_bitparallel(words, r) / len(r) for r in refs), default=0.0))
    return out


def replacement_rate(answers: Sequence[str], replacements: Sequence[str]) -> float | None:
    """Fraction of ``answers`` that give a replacement answer (score ≥ :data:`REPLACEMENT_RECALL`); None without
    replacements or answers."""
    if not answers or not any(rouge_tokens(r) for r in replacements):
        return None
    s = replacement_scores(answers, replacements)
    return sum(x >= REPLACEMENT_RECALL for x in s) / len(s)


def answer_ids(tok: Any, texts: Sequence[str], n: int = AGREE_TOKENS) -> list[list[int]]:
    """The first ``n`` token ids of each answer text (encoded without special tokens)."""
    return [list(tok(t, add_special_tokens=False)["input_ids"][:n]) for t in texts]


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], n: int = AGREE_TOKENS) -> torch.Tensor:
    """(Q,) per-prompt agreement of two answers' first ``n`` tokens (see the module docstring).

    ``agree_i = #{t < min(|a_i|, |b_i|): a_it = b_it} / max(|a_i|, |b_i|)`` after truncating both to ``n``;
    1 when both are empty.
    """
    q = len(a)
    A = torch.full((q, n), -1, dtype=torch.long)  # (Q, N) padding never equals B's
    B = torch.full((q, n), -2, dtype=torch.long)  # (Q, N)
    la = torch.tensor([min(len(x), n) for x in a], dtype=torch.long)  # (Q,)
    lb = torch.tensor([min(len(x), n) for x in b], dtype=torch.long)  # (Q,)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        A[i, : la[i]] = torch.tensor(list(x[:n]), dtype=torch.long)
        B[i, : lb[i]] = torch.tensor(list(y[:n]), dtype=torch.long)
    same = (A == B).sum(1).double()  # (Q,)
    longest = torch.maximum(la, lb).double()  # (Q,)
    return torch.where(longest > 0, same / longest.clamp_min(1), torch.ones_like(same))


def greedy_answers(
    model: Any, tok: Any, prompts: list[str], batch_size: int, n: int = AGREE_TOKENS, desc: str = "collateral"
) -> tuple[list[str], list[list[int]]]:
    """Greedy answers of ``prompts`` (``n`` new tokens at most, no early stop) and their first ``n`` token ids."""
    side = tok.padding_side
    try:
        texts = generate(model, tok, prompts, n, batch_size, None, desc=desc)
    finally:
        tok.padding_side = side  # generate pads on the left; the caller's tokenizer stays as it was
    return texts, answer_ids(tok, texts, n)


def topk_logprobs(logits: torch.Tensor, k: int = KL_TOPK) -> dict[str, torch.Tensor]:
    """The start model's kept distribution: top-``k`` log-probabilities and the rest as one bin.

    Args:
        logits: (A, V).

    Returns:
        ``{"logp": (A, K), "idx": (A, K), "rest": (A,)}`` with ``K = min(k, V)`` and
        ``rest = log Σ_{v∉top} p_v`` (−inf when ``K = V``), float32 on the CPU.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (A, V)
    top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (A, K), (A, K)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (A,)
    return {"logp": top.cpu(), "idx": idx.cpu(), "rest": rest.cpu()}


def coarse_kl(start: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """(A,) ``KL(start ‖ after)`` per position over the start's top-K tokens plus the rest bin.

    ``KL_t = Σ_{v∈top_t} p_v (log p_v − log q_v) + p_rest (log p_rest − log q_rest)``, ``q = softmax(logits)``,
    ``q_rest = Σ_{v∉top_t} q_v``; the rest term is 0 where ``p_rest = 0``.

    Args:
        start: :func:`topk_logprobs` of the start model at the same positions.
        logits: (A, V) the unlearned model's logits.
    """
    logq = F.log_softmax(logits.float(), dim=-1)  # (A, V)
    idx = start["idx"].to(logq.device)  # (A, K)
    lp, lp_rest = start["logp"].to(logq.device), start["rest"].to(logq.device)  # (A, K), (A,)
    lq = logq.gather(-1, idx)  # (A, K)
    lq_rest = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (A,)
    top = (lp.exp() * (lp - lq)).sum(-1)  # (A,)
    p_rest = lp_rest.exp()  # (A,)
    rest = torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))  # (A,)
    return (top + rest).cpu()


@torch.no_grad()
def _answer_pass(
    model: Any, rows: list[Encoded], pad_id: int, batch_size: int, fn: Any
) -> tuple[torch.Tensor, list[Any]]:
    """One teacher-forced pass over ``rows``: each row's mean answer CE and ``fn(logits (A_b, V))`` per batch.

    Rows are batched in length order exactly as :func:`rapidun.steps.eval_ce` batches them (same order, same
    arithmetic: :func:`rapidun.functional.nll_by_row`), so the CE equals ``eval_ce``'s at the same
    ``batch_size`` and the pass that measures the KL also gives the held-out loss: one forward pass, not two.

    Returns:
        ``(ce (R,), outs)``: the CE in input order; ``fn``'s results batch by batch (answer positions row-major
        within the length order, which is the same for any two passes over the same rows).
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    ce = torch.zeros(len(rows))
    outs = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([rows[i] for i in idx], pad_id).to(device)
        logits, row, target = answer_logits(model, batch.input_ids, batch.attention_mask, batch.labels)  # (A_b, V)
        nll_sum, n = nll_by_row(logits, row, target, len(idx))  # (B,), (B,)
        ce[idx] = (nll_sum / n.clamp_min(1)).float().cpu()
        outs.append(fn(logits))
    return ce, outs


def held_distribution(
    model: Any, rows: list[Encoded], pad_id: int, k: int = KL_TOPK, batch_size: int = 32
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`topk_logprobs` of ``model`` at every answer position of ``rows`` (A positions) and each row's mean
    answer CE (R,), from one pass."""
    ce, parts = _answer_pass(model, rows, pad_id, batch_size, lambda lg: topk_logprobs(lg, k))
    if not parts:  # no rows: an empty distribution (mean_kl gives 0)
        return {"logp": torch.zeros(0, k), "idx": torch.zeros(0, k, dtype=torch.long), "rest": torch.zeros(0)}, ce
    return {key: torch.cat([p[key] for p in parts]) for key in ("logp", "idx", "rest")}, ce


def start_distribution(
    model: Any, rows: list[Encoded], pad_id: int, k: int = KL_TOPK, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """:func:`topk_logprobs` of ``model`` at every answer position of ``rows`` (A positions)."""
    return held_distribution(model, rows, pad_id, k, batch_size)[0]


def kl_and_ce(
    model: Any, rows: list[Encoded], start: dict[str, torch.Tensor], pad_id: int, batch_size: int = 32
) -> tuple[float, torch.Tensor]:
    """Mean over all A answer positions of :func:`coarse_kl` between ``start`` and ``model`` on ``rows``, and each
    row's mean answer CE under ``model`` (R,), from one pass."""
    if not len(start["rest"]):
        return 0.0, torch.zeros(len(rows))
    off = [0]

    def one(lg: torch.Tensor) -> torch.Tensor:
        a = lg.shape[0]
        sl = {key: start[key][off[0] : off[0] + a] for key in ("logp", "idx", "rest")}
        off[0] += a
        return coarse_kl(sl, lg)

    ce, parts = _answer_pass(model, rows, pad_id, batch_size, one)
    return float(torch.cat(parts).mean()), ce


def mean_kl(
    model: Any, rows: list[Encoded], start: dict[str, torch.Tensor], pad_id: int, batch_size: int = 32
) -> float:
    """Mean over all A answer positions of :func:`coarse_kl` between ``start`` and ``model`` on ``rows``."""
    return kl_and_ce(model, rows, start, pad_id, batch_size)[0]


def start_snapshot(
    model: Any, tok: Any, prompts: list[str], rows: list[Encoded], batch_size: int, n: int = AGREE_TOKENS
) -> dict[str, Any]:
    """What the comparison needs of the start model, taken before it changes: greedy answers of ``prompts``,
    their first ``n`` token ids, :func:`start_distribution` on ``rows`` (the clean answers, teacher-forced) and,
    from the same pass, ``ce`` (R,): each row's mean answer CE (the held-out loss the run's utility is measured
    against)."""
    texts, ids = greedy_answers(model, tok, prompts, batch_size, n, desc="collateral:start")
    dist, ce = held_distribution(model, rows, tok.pad_token_id)
    return {"texts": texts, "ids": ids, "dist": dist, "ce": ce}


def compare_with_start(
    model: Any,
    tok: Any,
    start: dict[str, Any],
    prompts: list[str],
    rows: list[Encoded],
    replacements: Sequence[str],
    prompt_ids: list[str],
    batch_size: int,
    n: int = AGREE_TOKENS,
) -> tuple[dict[str, Any], list[str], torch.Tensor]:
    """:func:`collateral_summary` of ``model`` against a :func:`start_snapshot`; also returns the answers and, from
    the KL's pass, each row's mean answer CE under ``model`` (R,)."""
    texts, ids = greedy_answers(model, tok, prompts, batch_size, n, desc="collateral:after")
    kl, ce = kl_and_ce(model, rows, start["dist"], tok.pad_token_id)
    summary = collateral_summary(start["texts"], texts, start["ids"], ids, replacements, prompt_ids, kl, n)
    return summary, texts, ce


def collateral_summary(
    before: list[str],
    after: list[str],
    ids_before: list[list[int]],
    ids_after: list[list[int]],
    replacements: Sequence[str],
    prompt_ids: list[str],
    kl: float | None = None,
    n: int = AGREE_TOKENS,
) -> dict[str, Any]:
    """The measures of the module docstring for one pair (start model, unlearned model) on the same Q prompts.

    Returns:
        ``{"n", "tokens", "n_replacements", "replacement_rate_before", "replacement_rate_after",
        "replacement_rise", "newly_replaced" (prompt ids), "agreement", "kl", "kl_topk"}``; rates are None
        without replacement answers.
    """
    reps = sorted({r for r in replacements if rouge_tokens(r)})
    sb = replacement_scores(before, reps) if reps else None
    sa = replacement_scores(after, reps) if reps else None
    return summary_from_scores(sb, sa, ids_before, ids_after, prompt_ids, len(reps), kl, n)


def summary_from_scores(
    scores_before: list[float] | None,
    scores_after: list[float] | None,
    ids_before: list[list[int]],
    ids_after: list[list[int]],
    prompt_ids: list[str],
    n_replacements: int,
    kl: float | None = None,
    n: int = AGREE_TOKENS,
) -> dict[str, Any]:
    """:func:`collateral_summary` from the per-prompt :func:`replacement_scores` (None: no replacement answers)
    and answer token ids already taken (e.g. kept in verification cells)."""
    rb = ra = None
    newly: list[str] = []
    if scores_before is not None and scores_after is not None and prompt_ids:
        rb = sum(x >= REPLACEMENT_RECALL for x in scores_before) / len(scores_before)
        ra = sum(x >= REPLACEMENT_RECALL for x in scores_after) / len(scores_after)
        pairs = zip(prompt_ids, scores_before, scores_after, strict=True)
        newly = [i for i, x, y in pairs if y >= REPLACEMENT_RECALL > x]
    agree = token_agreement(ids_before, ids_after, n)
    return {
        "n": len(prompt_ids),
        "tokens": n,
        "n_replacements": n_replacements,
        "replacement_rate_before": rb,
        "replacement_rate_after": ra,
        "replacement_rise": None if rb is None or ra is None else ra - rb,
        "newly_replaced": newly,
        "agreement": float(agree.mean()) if len(agree) else None,
        "kl": kl,
        "kl_topk": KL_TOPK,
    }


def collateral_problems(c: dict[str, Any] | None, where: str = "held-out clean prompts") -> list[str]:
    """The findings that warn: replacement rate rose by more than :data:`MAX_REPLACEMENT_RISE`, or agreement fell
    below :data:`MIN_AGREEMENT` (empty when neither, or when ``c`` is None)."""
    if not c or not c.get("n"):
        return []
    out = []
    rise = c.get("replacement_rise")
    if rise is not None and rise > MAX_REPLACEMENT_RISE:
        k = round(c["replacement_rate_after"] * c["n"])
        out.append(
            f"the forget records' replacement answer now answers {k} of {c['n']} {where} (replacement rate "
            f"{c['replacement_rate_before']:.2f} -> {c['replacement_rate_after']:.2f}, +{rise:.2f} > "
            f"{MAX_REPLACEMENT_RISE:.2f})"
        )
    ag = c.get("agreement")
    if ag is not None and ag < MIN_AGREEMENT:
        out.append(
            f"the greedy answers to {c['n']} {where} agree with the start model's on only {ag:.2f} of their first "
            f"{c['tokens']} tokens (< {MIN_AGREEMENT:.2f})"
        )
    return out


def collateral_warning(c: dict[str, Any] | None, fix: str, where: str = "held-out clean prompts") -> str | None:
    """One warning line from :func:`collateral_problems`, ending with ``fix`` (None when nothing is wrong)."""
    probs = collateral_problems(c, where)
    if not probs:
        return None
    return "collateral damage: " + "; ".join(probs) + f": the unlearning changed answers beyond its target; {fix}"
