"""Batched greedy generation with left padding and early stopping once the detector has decided."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


class DecidedStop(StoppingCriteria):
    """Marks a sequence finished once ``decided(text_so_far)`` is true (checked every ``every`` tokens)."""

    def __init__(self, tok: Any, prompt_len: int, decided: Callable[[str], bool], every: int = 4) -> None:
        self.tok, self.prompt_len, self.decided, self.every = tok, prompt_len, decided, every
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.step += 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
        if self.step % self.every:
            return done
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.decided(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    decided: Callable[[str], bool] | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (text), in order. Prompts are sorted by length into batches."""
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    model.eval()
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=2.0):
        idx = order[s : s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        T = enc["input_ids"].shape[1]
        stop = StoppingCriteriaList([DecidedStop(tok, T, decided)]) if decided else None
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=stop,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        texts = tok.batch_decode(gen[:, T:], skip_special_tokens=True)  # (B,) new text only
        for i, t in zip(idx, texts, strict=True):
            out[i] = t.strip()
    return out
