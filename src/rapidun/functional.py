"""Pure tensor math shared by every stage: shifted per-sample cross-entropy over answer tokens.

Notation: B batch, T tokens, H hidden size, V vocabulary, A answer tokens in the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts token t+1; the last position predicts nothing.

    Args:
        labels: (B, T) token ids with ``IGNORE`` on prompt/padding positions.

    Returns:
        (B, T) targets aligned with the logits at each position.
    """
    shifted = torch.full_like(labels, IGNORE)  # (B, T)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def per_sample_ce_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean shifted cross-entropy over each sample's answer tokens.

    ``ce_i = -(1/|A_i|) Σ_{t∈A_i} log p(y_{t+1} | y_≤t)``; samples without answer tokens get 0.

    Args:
        logits: (B, T, V).
        labels: (B, T), ``IGNORE`` where no loss is taken.

    Returns:
        (B,) per-sample losses.
    """
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE  # (B, T)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (B, T)
    nll = nll * mask
    return nll.sum(1) / mask.sum(1).clamp_min(1)  # (B,)


def per_sample_nll(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed NLL and answer-token counts, projecting only answer positions onto the vocabulary.

    The LM head (H×V) is applied to the A positions that carry a target instead of all B·T positions, which
    saves most of its cost for prompt-heavy batches. Equal to :func:`per_sample_ce_from_logits` × counts.

    Args:
        model: a causal LM (plain or PEFT-wrapped) with ``get_decoder`` and ``get_output_embeddings``.
        input_ids: (B, T).
        attention_mask: (B, T).
        labels: (B, T) with ``IGNORE`` on non-answer positions.

    Returns:
        ``(nll_sum (B,), n_tokens (B,))``.
    """
    logits, row, target = answer_logits(model, input_ids, attention_mask, labels)  # (A, V), (A,), (A,)
    return nll_by_row(logits, row, target, input_ids.shape[0])


def nll_by_row(
    logits: torch.Tensor, row: torch.Tensor, target: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed NLL and answer-token counts from :func:`answer_logits`' output.

    ``nll_i = −Σ_{a: row_a = i} log softmax(logits_a)[target_a]``, float32.

    Args:
        logits: (A, V). row: (A,) sample index of each position. target: (A,) next token. n: B.

    Returns:
        ``(nll_sum (B,), n_tokens (B,))``.
    """
    nll = F.cross_entropy(logits.float(), target, reduction="none")  # (A,)
    nll_sum = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add_(0, row, nll)  # (B,)
    return nll_sum, torch.bincount(row, minlength=n)


def answer_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the A positions whose next token is an answer token (the LM head applied to those only).

    Args:
        model: a causal LM (plain or PEFT-wrapped) with ``get_decoder`` and ``get_output_embeddings``.
        input_ids: (B, T). attention_mask: (B, T). labels: (B, T) with ``IGNORE`` on non-answer positions.

    Returns:
        ``(logits (A, V), row (A,), target (A,))``: the logits, the sample index of each position and the next
        token it predicts, in row-major (sample, position) order.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,T,H)
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE  # (B, T)
    logits = base.get_output_embeddings()(hidden[mask])  # (A, V)
    row = torch.nonzero(mask, as_tuple=True)[0]  # (A,) sample index of each answer position
    return logits, row, targets[mask]


def per_sample_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, row: torch.Tensor, n: int
) -> torch.Tensor:
    """Forward KL of the student's next-token distributions from the teacher's, averaged per sample.

    ``kl_i = (1/|A_i|) Σ_{t∈A_i} Σ_v p_t(v)·(log p_t(v) − log q_t(v))`` with ``p = softmax(teacher)``,
    ``q = softmax(student)`` (float32); a sample without positions gets 0. Gradient flows into the student only
    when the teacher logits are detached (the caller computes them under ``no_grad``).

    Args:
        teacher_logits: (A, V). student_logits: (A, V). row: (A,) sample index of each position. n: B.

    Returns:
        (B,) per-sample KL.
    """
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)  # (A, V)
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # (A, V)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (A,)
    total = torch.zeros(n, dtype=kl.dtype, device=kl.device).index_add_(0, row, kl)  # (B,)
    count = torch.bincount(row, minlength=n).clamp_min(1)  # (B,)
    return total / count


def per_sample_ce(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(B,) mean answer-token cross-entropy per sample (0 for a sample without answer tokens)."""
    nll_sum, n = per_sample_nll(model, input_ids, attention_mask, labels)
    return nll_sum / n.clamp_min(1)
