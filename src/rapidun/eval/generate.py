"""Batched greedy generation with left padding and early stopping once the detector has decided.

Under ``torchrun`` / ``accelerate launch`` (``shard=True``) rank r generates the length-sorted batches r, r+W, ...
and the texts are gathered on every rank: each prompt is generated in the batch it would have in one process, so
the texts do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from rapidun.distributed import gather_dicts, rank_world
from rapidun.io import fault_point


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
    shard: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text), in order. Prompts are sorted by length into batches.

    With ``shard`` every rank of an initialised process group must call this with the same prompts; each
    generates its share of the batches and all ranks return every text.
    """
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    mine: dict[int, str] = {}
    device = next(model.parameters()).device
    model.eval()
    rank, world = rank_world() if shard else (0, 1)
    starts = list(range(0, len(order), batch_size))[rank::world]
    for s in tqdm(starts, desc=desc, unit="batch", mininterval=2.0, disable=rank != 0):
        fault_point("eval:batch")
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
            mine[i] = t.strip()
    done = gather_dicts(mine) if world > 1 else mine
    return [done[i] for i in range(len(prompts))]
