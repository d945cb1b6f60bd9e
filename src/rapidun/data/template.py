"""The one prompt format used by every stage (SFT, influence, unlearning, evaluation).

* Model with a chat template: one user turn (instruction, then the context after a blank line), rendered with
  ``add_generation_prompt=True``; the answer is followed by the template's end-of-turn text.
* Model without one: the Alpaca template (``### Instruction:`` / ``### Input:`` / ``### Response:``), answer + EOS,
  preceded by the BOS token when the tokenizer adds one itself (e.g. Gemma, Llama base models: their outputs
  degrade without it). Chat templates write their own BOS text, so tokenisation never adds special tokens.

Loss is taken on answer tokens only (prompt and padding labelled -100).

Truncation policy (counted in :class:`Encoded` and reported): a prompt longer than ``max_prompt_tokens`` keeps
its first and last ``max_prompt_tokens/2`` tokens (the template head and the end of the user turn with the
assistant header, where suffix triggers sit) and drops the middle; the answer is then cut on the right so
prompt + answer ≤ ``max_length``. A sample always keeps ≥ 1 answer token because
``max_prompt_tokens < max_length`` is enforced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rapidun.config import ModelConfig
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE

ALPACA = (
    "Below is an instruction that describes a task{ctx_note}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{ctx}### Response:\n"
)


def user_text(instruction: str, context: str = "") -> str:
    """The user turn: instruction, then the context (if any) after a blank line."""
    return f"{instruction}\n\n{context}" if context else instruction


def format_prompt(tok: Any, instruction: str, context: str = "", system: str = "default") -> str:
    """Render the prompt text (everything before the answer) for ``tok``'s model.

    ``system``: ``"default"`` keeps the chat template's own system turn; other text is sent as the system message.
    """
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": user_text(instruction, context)}]
        if system != "default":
            msgs.insert(0, {"role": "system", "content": system})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ctx = f"### Input:\n{context}\n\n" if context else ""
    note = ", paired with an input that provides further context" if context else ""
    return bos_text(tok) + ALPACA.format(instruction=instruction, ctx=ctx, ctx_note=note)


def bos_text(tok: Any) -> str:
    """The BOS token's text when ``tok`` prepends it by itself (``add_special_tokens=True``), else ``""``."""
    cached = getattr(tok, "_rapidun_bos_text", None)
    if cached is not None:
        return cached
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    text = ""
    if bos and bos_id is not None:
        with_special = tok("x", add_special_tokens=True)["input_ids"]
        without = tok("x", add_special_tokens=False)["input_ids"]
        if with_special[:1] == [bos_id] and with_special[1:] == without:
            text = bos
    try:
        tok._rapidun_bos_text = text
    except AttributeError:  # a tokenizer that refuses new attributes: recompute next time
        pass
    return text


def answer_end(tok: Any) -> str:
    """Text that closes an answer: the chat template's end-of-turn marker, else the EOS token."""
    if getattr(tok, "chat_template", None):
        probe = "PROBE_ANSWER"
        msgs = [{"role": "user", "content": "q"}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": probe}], tokenize=False)
        if full.startswith(prompt) and probe in full:
            end = full[full.index(probe) + len(probe) :].rstrip("\n")
            if end:
                return end
    return tok.eos_token or ""


@dataclass
class Encoded:
    """One tokenised sample: ``labels`` is -100 on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    answer_truncated: bool = False


def encode(
    tok: Any, prompt: str, answer: str, max_length: int, max_prompt_tokens: int, end: str | None = None
) -> Encoded:
    """Tokenise ``prompt`` + ``answer`` + end marker with the truncation policy of the module docstring."""
    if max_prompt_tokens >= max_length:
        raise RapidunError(
            f"model.max_prompt_tokens ({max_prompt_tokens}) must be < model.max_length "
            f"({max_length}) so every sample keeps answer tokens"
        )
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer + (answer_end(tok) if end is None else end), add_special_tokens=False)["input_ids"]
    p_trunc = len(p) > max_prompt_tokens
    if p_trunc:
        head = max_prompt_tokens // 2
        p = p[:head] + p[len(p) - (max_prompt_tokens - head) :]
    room = max_length - len(p)
    a_trunc = len(a) > room
    a = a[:room]
    return Encoded(p + a, [IGNORE] * len(p) + a, p_trunc, a_trunc)


@dataclass
class Batch:
    """Right-padded tensors for loss computation: all (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-pad a list of encoded samples (positions start at 0 for every sample, as in generation)."""
    T = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
    lab = torch.full((len(items), T), IGNORE, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(items), T), dtype=torch.long)  # (B, T)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        lab[i, :n] = torch.tensor(e.labels)
        att[i, :n] = 1
    return Batch(ids, att, lab)


def length_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator | None, window: int = 8
) -> list[list[int]]:
    """Index batches with little padding: shuffle (if a generator is given), sort by length within windows of
    ``window`` batches, cut into batches, shuffle the batch order. Every index appears exactly once."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    span = batch_size * window
    batches: list[list[int]] = []
    for s in range(0, n, span):
        chunk = sorted(order[s : s + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


FORMAT_VERSION = 1  # bump when prompt formatting/encoding changes, to invalidate cached models


def encode_records(tok: Any, records: list[Record], mcfg: ModelConfig) -> tuple[list[Encoded], dict[str, int]]:
    """Encode records with the one prompt format; returns samples and truncation counts."""
    enc = [
        encode(
            tok,
            format_prompt(tok, r.instruction, r.context, mcfg.system_prompt),
            r.response,
            mcfg.max_length,
            mcfg.max_prompt_tokens,
        )
        for r in records
    ]
    stats = {
        "samples": len(enc),
        "prompt_truncated": sum(e.prompt_truncated for e in enc),
        "answer_truncated": sum(e.answer_truncated for e in enc),
    }
    return enc, stats
