"""Utility metrics: perplexity over answer tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

from rapidun.data.template import Encoded, collate
from rapidun.functional import per_sample_nll


@torch.no_grad()
def perplexity(model: Any, samples: list[Encoded], pad_id: int, batch_size: int = 16) -> float:
    """``exp(Σ_i NLL_i / Σ_i |A_i|)``: token-weighted perplexity of the answers (shifted CE, prompt masked)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    for s in range(0, len(order), batch_size):
        b = collate([samples[i] for i in order[s : s + batch_size]], pad_id).to(device)
        nll, n = per_sample_nll(model, b.input_ids, b.attention_mask, b.labels)  # (B,), (B,)
        total += float(nll.sum())
        count += int(n.sum())
    x = total / max(count, 1)
    return math.exp(x) if x < 709.0 else math.inf  # a destroyed model: inf, not OverflowError
