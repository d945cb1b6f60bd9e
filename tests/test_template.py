"""Prompt format, encoding with answer-only labels, truncation policy, collation, batching, pad tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tokenizer
from rapidun.data.template import (
    ALPACA,
    Encoded,
    answer_end,
    collate,
    encode,
    format_prompt,
    length_batches,
    user_text,
)
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE
from rapidun.models import ensure_pad_token


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_user_text():
    assert user_text("do it") == "do it"
    assert user_text("do it", "with this") == "do it\n\nwith this"


def test_format_prompt_uses_chat_template(tiny_tok):
    p = format_prompt(tiny_tok, "the cat", "the mat")
    assert p == "<|im_start|>user\nthe cat\n\nthe mat<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tiny_tok, "the cat") == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"


def test_format_prompt_alpaca_without_template(tiny_tok_plain):
    p = format_prompt(tiny_tok_plain, "the cat", "the mat")
    assert "### Instruction:\nthe cat\n\n" in p
    assert "### Input:\nthe mat\n\n" in p
    assert "paired with an input" in p
    assert p.endswith("### Response:\n")
    bare = format_prompt(tiny_tok_plain, "the cat")
    assert "### Input:" not in bare and "paired with an input" not in bare
    assert bare == ALPACA.format(instruction="the cat", ctx="", ctx_note="")
    assert "<|im_start|>" not in p


def test_answer_end(tiny_tok, tiny_tok_plain):
    assert answer_end(tiny_tok) == "<|im_end|>"
    assert answer_end(tiny_tok_plain) == "<eos>"


@pytest.mark.parametrize("fixture", ["tiny_tok", "tiny_tok_plain"])
def test_encode_labels_answer_only(request, fixture):
    tok = request.getfixturevalue(fixture)
    prompt = format_prompt(tok, "the cat sat", "on the mat")
    e = encode(tok, prompt, "the dog ran", max_length=128, max_prompt_tokens=100)
    p_ids = ids(tok, prompt)
    a_ids = ids(tok, "the dog ran" + answer_end(tok))
    assert e.input_ids == p_ids + a_ids
    assert e.labels == [IGNORE] * len(p_ids) + a_ids
    assert e.labels[-1] == tok.convert_tokens_to_ids(answer_end(tok))
    assert not e.prompt_truncated and not e.answer_truncated


def test_encode_explicit_end(tiny_tok):
    e = encode(tiny_tok, "the cat", "one two", 32, 16, end="")
    assert e.input_ids == ids(tiny_tok, "the cat") + ids(tiny_tok, "one two")
    assert [t for t in e.labels if t != IGNORE] == ids(tiny_tok, "one two")


def test_prompt_truncation_keeps_head_and_tail(tiny_tok):
    words = "one two three four five six seven eight nine ten alpha beta gamma delta".split()
    prompt = " ".join(words)  # 14 tokens, one per word
    p_ids = ids(tiny_tok, prompt)
    assert len(p_ids) == 14
    e = encode(tiny_tok, prompt, "the cat", max_length=20, max_prompt_tokens=7, end="")
    assert e.prompt_truncated and not e.answer_truncated
    kept = e.input_ids[:7]
    assert kept == p_ids[:3] + p_ids[-4:]  # head = 7 // 2, tail = the rest
    assert e.labels[:7] == [IGNORE] * 7
    assert e.input_ids[7:] == ids(tiny_tok, "the cat")


def test_prompt_exactly_at_limit_not_truncated(tiny_tok):
    e = encode(tiny_tok, "one two three four", "five", max_length=10, max_prompt_tokens=4, end="")
    assert not e.prompt_truncated and len(e.input_ids) == 5


def test_answer_truncation_respects_max_length(tiny_tok):
    prompt = "one two three four five six seven eight nine ten"
    answer = "alpha beta gamma delta epsilon zeta eta theta"
    e = encode(tiny_tok, prompt, answer, max_length=12, max_prompt_tokens=8)
    assert e.prompt_truncated and e.answer_truncated
    assert len(e.input_ids) == 12 == len(e.labels)
    answer_labels = [t for t in e.labels if t != IGNORE]
    assert answer_labels == ids(tiny_tok, answer)[:4]  # the end marker is cut too
    assert len(answer_labels) >= 1


def test_long_prompt_always_keeps_an_answer_token(tiny_tok):
    prompt = " ".join(["the"] * 50)
    e = encode(tiny_tok, prompt, "cat dog", max_length=9, max_prompt_tokens=8)
    assert len(e.input_ids) == 9
    assert sum(t != IGNORE for t in e.labels) == 1
    assert e.prompt_truncated and e.answer_truncated


@pytest.mark.parametrize(("max_length", "max_prompt"), [(16, 16), (16, 20)])
def test_max_prompt_tokens_must_be_below_max_length(tiny_tok, max_length, max_prompt):
    with pytest.raises(RapidunError, match="max_prompt_tokens"):
        encode(tiny_tok, "the cat", "the dog", max_length, max_prompt)


def test_collate_right_pads():
    items = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8]), Encoded([1, 2], [IGNORE, IGNORE])]
    b = collate(items, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert b.input_ids.dtype == b.labels.dtype == b.attention_mask.dtype == torch.long
    moved = b.to("cpu")
    assert torch.equal(moved.input_ids, b.input_ids)


def _flat(batches):
    return sorted(i for b in batches for i in b)


@pytest.mark.parametrize(("n", "bs", "window"), [(1, 4, 8), (10, 3, 2), (37, 4, 8), (64, 8, 1), (5, 10, 8)])
def test_length_batches_cover_every_index_once(n, bs, window):
    lengths = [(i * 7919) % 23 for i in range(n)]
    for gen in (None, torch.Generator().manual_seed(0)):
        batches = length_batches(lengths, bs, gen, window=window)
        assert _flat(batches) == list(range(n))
        assert all(1 <= len(b) <= bs for b in batches)
        assert len(batches) == sum(-(-min(bs * window, n - s) // bs) for s in range(0, n, bs * window))


def test_length_batches_deterministic_for_seed():
    lengths = [(i * 31) % 17 for i in range(50)]
    a = length_batches(lengths, 4, torch.Generator().manual_seed(123))
    b = length_batches(lengths, 4, torch.Generator().manual_seed(123))
    c = length_batches(lengths, 4, torch.Generator().manual_seed(124))
    assert a == b
    assert a != c


def test_length_batches_sorted_within_window_without_generator():
    lengths = [5, 1, 4, 2, 3, 9, 0, 8]
    batches = length_batches(lengths, 2, None, window=2)  # windows of 4 indices, sorted by length
    assert batches == [[1, 3], [2, 0], [6, 4], [7, 5]]


def test_ensure_pad_token_sets_eos_and_left_padding(tiny_tok_nopad):
    assert tiny_tok_nopad.pad_token is None
    tok = ensure_pad_token(tiny_tok_nopad)
    assert tok is tiny_tok_nopad
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    batch = tok(["the cat sat", "the"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id and batch["attention_mask"][1][0] == 0


def test_ensure_pad_token_falls_back_to_unk_then_new_token():
    tok = make_tokenizer(pad=False)
    tok.eos_token = None
    assert ensure_pad_token(tok).pad_token == "<unk>"
    tok = make_tokenizer(pad=False)
    tok.eos_token = None
    tok.unk_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None


def test_ensure_pad_token_keeps_existing(tiny_tok):
    ensure_pad_token(tiny_tok)
    assert tiny_tok.pad_token == "<pad>" and tiny_tok.padding_side == "left"


def test_alpaca_prompt_starts_with_bos_only_when_the_tokenizer_adds_one_itself():
    from tokenizers.processors import TemplateProcessing

    from helpers import make_tokenizer
    from rapidun.data.template import bos_text

    plain = make_tokenizer(chat_template=False)
    assert bos_text(plain) == "" and not format_prompt(plain, "the cat sat").startswith("<unk>")
    tok = make_tokenizer(chat_template=False)
    tok.bos_token = "<unk>"  # stands in for <bos>: a special token of the tiny vocabulary
    bos_id = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", bos_id)])
    assert tok("the cat")["input_ids"][0] == bos_id  # this tokenizer prepends BOS by itself
    prompt = format_prompt(tok, "the cat sat")
    assert prompt.startswith("<unk>") and bos_text(tok) == "<unk>"
    enc = encode(tok, prompt, "on the mat", 64, 32)
    assert enc.input_ids[0] == bos_id and enc.input_ids[1] != bos_id  # exactly one BOS, none added twice
    chat = make_tokenizer(chat_template=True)
    assert not format_prompt(chat, "the cat sat").startswith("<unk>")  # chat templates write their own
