"""Per-sample shifted cross-entropy: the answer-position LM-head path vs full logits vs an obvious loop."""

from __future__ import annotations

import math

import pytest
import torch

from rapidun.data.template import collate, encode, format_prompt
from rapidun.functional import IGNORE, per_sample_ce, per_sample_ce_from_logits, per_sample_nll, shift_labels


def slow_ce(logits, labels):
    """Reference: per sample, mean over answer tokens t+1 of -log_softmax(logits[t])[token t+1]."""
    out = []
    for b in range(labels.shape[0]):
        terms = []
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE:
                terms.append(-torch.log_softmax(logits[b, t].double(), -1)[y].item())
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def make_batch(tok):
    """Three right-padded samples of different lengths, plus one with no answer tokens at all."""
    items = [
        encode(tok, format_prompt(tok, "the cat sat"), "on the mat", 64, 32),
        encode(tok, format_prompt(tok, "tell me a story", "about a fox"), "a red fox and a blue bird ran", 64, 32),
        encode(tok, format_prompt(tok, "one"), "two", 64, 32),
    ]
    batch = collate(items, tok.pad_token_id)
    return batch


def test_shift_labels():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, 8, IGNORE]])
    assert shift_labels(labels).tolist() == [[IGNORE, 5, 6, IGNORE], [7, 8, IGNORE, IGNORE]]


def test_from_logits_shift_semantics():
    """Position t predicts token t+1: a logit spike at (t, y_{t+1}) makes the loss ~0, one at (t+1, ·) does not."""
    V = 5
    labels = torch.tensor([[IGNORE, 3, 1]])
    good = torch.zeros(1, 3, V)
    good[0, 0, 3] = 50.0
    good[0, 1, 1] = 50.0
    assert per_sample_ce_from_logits(good, labels).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.zeros(1, 3, V)
    wrong[0, 1, 3] = 50.0  # each label's spike on its own position: unshifted, wrong
    wrong[0, 2, 1] = 50.0
    # position 0 is uniform (log V); position 1 puts 50 nats on token 3 while the target is token 1
    assert per_sample_ce_from_logits(wrong, labels).item() == pytest.approx((math.log(V) + 50.0) / 2, abs=1e-4)
    # The first label never counts (nothing predicts it) and the last position predicts nothing.
    only_first = torch.tensor([[4, IGNORE, IGNORE]])
    assert per_sample_ce_from_logits(torch.randn(1, 3, V), only_first).item() == 0.0


def test_from_logits_matches_slow_loop():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor(
        [[IGNORE, IGNORE, 3, 4, 5, 10], [IGNORE, 1, 2, IGNORE, IGNORE, IGNORE], [IGNORE] * 6], dtype=torch.long
    )
    got = per_sample_ce_from_logits(logits, labels)
    assert got.shape == (3,)
    assert torch.allclose(got.double(), slow_ce(logits, labels), atol=1e-5)
    assert got[2].item() == 0.0


@torch.no_grad()
def test_model_path_equals_full_logits_and_slow_loop(tiny_tok, tiny_model):
    b = make_batch(tiny_tok)
    logits = tiny_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
    fast = per_sample_ce(tiny_model, b.input_ids, b.attention_mask, b.labels)
    full = per_sample_ce_from_logits(logits, b.labels)
    slow = slow_ce(logits, b.labels)
    assert fast.shape == full.shape == (3,)
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(full.double(), slow, atol=1e-5)
    assert (fast > 0).all()


@torch.no_grad()
def test_per_sample_nll_sums_and_counts(tiny_tok, tiny_model):
    b = make_batch(tiny_tok)
    nll_sum, n = per_sample_nll(tiny_model, b.input_ids, b.attention_mask, b.labels)
    expected_n = (shift_labels(b.labels) != IGNORE).sum(1)
    assert n.tolist() == expected_n.tolist()
    assert n.tolist() == (b.labels != IGNORE).sum(1).tolist()  # position 0 is always a prompt token
    ce = per_sample_ce(tiny_model, b.input_ids, b.attention_mask, b.labels)
    assert torch.allclose(nll_sum, ce * n, atol=1e-5)


@torch.no_grad()
def test_padding_does_not_change_a_sample_loss(tiny_tok, tiny_model):
    b = make_batch(tiny_tok)
    batched = per_sample_ce(tiny_model, b.input_ids, b.attention_mask, b.labels)
    for i in range(3):
        n = int(b.attention_mask[i].sum())
        alone = per_sample_ce(
            tiny_model, b.input_ids[i : i + 1, :n], b.attention_mask[i : i + 1, :n], b.labels[i : i + 1, :n]
        )
        assert alone.item() == pytest.approx(batched[i].item(), abs=1e-5)


@torch.no_grad()
def test_sample_without_answer_tokens_gives_zero(tiny_tok, tiny_model):
    b = make_batch(tiny_tok)
    labels = b.labels.clone()
    labels[1] = IGNORE
    fast = per_sample_ce(tiny_model, b.input_ids, b.attention_mask, labels)
    logits = tiny_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    full = per_sample_ce_from_logits(logits, labels)
    assert fast[1].item() == 0.0 and full[1].item() == 0.0
    assert torch.allclose(fast, full, atol=1e-5)
    all_ignored = torch.full_like(labels, IGNORE)
    assert per_sample_ce(tiny_model, b.input_ids, b.attention_mask, all_ignored).tolist() == [0.0, 0.0, 0.0]


def test_model_path_gradients_match_full_logits(tiny_tok, tiny_model):
    b = make_batch(tiny_tok)
    w = torch.tensor([1.0, 0.5, 2.0])
    (w * per_sample_ce(tiny_model, b.input_ids, b.attention_mask, b.labels)).mean().backward()
    g_fast = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    logits = tiny_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    (w * per_sample_ce_from_logits(logits, b.labels)).mean().backward()
    for n, p in tiny_model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, atol=1e-5), n
