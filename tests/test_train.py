"""The training loop: LR schedule, LoRA memorisation on a tiny model, weighted loss, statistics, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import make_model
from rapidun.config import SFTConfig
from rapidun.data.template import collate, encode, format_prompt
from rapidun.errors import RapidunError
from rapidun.functional import per_sample_ce
from rapidun.models import attach_lora
from rapidun.train import ce_loss, lr_lambda, train

CPU = torch.device("cpu")
DATA = [
    ("the cat sat", "on the mat"),
    ("tell me a story", "a red fox"),
    ("one two", "three four five"),
    ("alpha beta", "gamma delta epsilon zeta"),
]


def test_lr_lambda_warmup_and_cosine():
    total, warmup = 100, 10
    assert lr_lambda(0, total, warmup) == pytest.approx(0.1)
    assert lr_lambda(4, total, warmup) == pytest.approx(0.5)
    assert lr_lambda(9, total, warmup) == pytest.approx(1.0)
    assert lr_lambda(10, total, warmup) == pytest.approx(1.0)  # peak right after warm-up
    assert lr_lambda(55, total, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert lr_lambda(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(150, total, warmup) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    values = [lr_lambda(s, total, warmup) for s in range(total + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values[:11]))  # rising during warm-up
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # falling after


def test_lr_lambda_without_warmup():
    assert lr_lambda(0, 10, 0) == pytest.approx(1.0)
    assert lr_lambda(5, 10, 0) == pytest.approx(0.5)
    assert lr_lambda(10, 10, 0) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(0, 1, 0) == pytest.approx(1.0)
    assert 0.0 <= lr_lambda(3, 4, 4) <= 1.0


def lora_model(tok, init_range=0.2):
    model = make_model(len(tok), init_range=init_range)
    return attach_lora(model, r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"], seed=0)


def encoded(tok):
    return [encode(tok, format_prompt(tok, i), a, 64, 32) for i, a in DATA]


@torch.no_grad()
def mean_loss(model, samples, pad_id):
    model.eval()
    b = collate(samples, pad_id)
    return per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)


def test_train_lora_memorises(tiny_tok):
    model = lora_model(tiny_tok)
    samples = encoded(tiny_tok)
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = mean_loss(model, samples, tiny_tok.pad_token_id)
    cfg = SFTConfig(lr=1e-2, epochs=20, batch_size=2, lora_dropout=0.0, autocast="off")
    stats = train(model, samples, cfg, tiny_tok.pad_token_id, CPU)
    after = mean_loss(model, samples, tiny_tok.pad_token_id)
    assert after.mean() < 0.5 * before.mean(), (before, after)
    assert (after < before).all()
    assert stats["steps"] == 20 * 2 == len(stats["loss_curve"])
    assert stats["tokens"] == 20 * sum(len(s.input_ids) for s in samples)
    assert stats["samples"] == 4 and stats["epochs"] == 20
    assert stats["time_s"] > 0 and stats["tokens_per_s"] > 0
    assert not model.training
    for n, p in model.named_parameters():  # only the adapter moved
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_weighted_first_step_loss(tiny_tok):
    model = lora_model(tiny_tok)
    samples = encoded(tiny_tok)
    weights = [0.5, 2.0, 1.0, 0.25]
    model.train()
    with torch.no_grad():
        b = collate(samples, tiny_tok.pad_token_id)
        ce = per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)
        expected = (torch.tensor(weights) * ce).mean().item()
        unweighted = ce.mean().item()
    assert abs(expected - unweighted) > 1e-2  # the weights matter for this check
    cfg = SFTConfig(lr=1e-2, epochs=1, batch_size=len(samples), lora_dropout=0.0, autocast="off")
    stats = train(model, samples, cfg, tiny_tok.pad_token_id, CPU, weights=weights)
    assert stats["steps"] == 1
    assert stats["loss_curve"][0] == pytest.approx(expected, abs=1e-5)


def test_default_weights_are_one(tiny_tok):
    model = lora_model(tiny_tok)
    samples = encoded(tiny_tok)
    with torch.no_grad():
        b = collate(samples, tiny_tok.pad_token_id)
        expected = per_sample_ce(model, b.input_ids, b.attention_mask, b.labels).mean().item()
    cfg = SFTConfig(lr=1e-2, epochs=1, batch_size=4, lora_dropout=0.0, autocast="off")
    stats = train(model, samples, cfg, tiny_tok.pad_token_id, CPU)
    assert stats["loss_curve"][0] == pytest.approx(expected, abs=1e-5)


def test_weights_follow_samples_through_shuffled_batches(tiny_tok):
    """With batches of 2 in shuffled order, every step's loss is mean(w_i * l_i) over *its own* samples."""
    model = lora_model(tiny_tok)
    samples = encoded(tiny_tok)
    value = {tuple(s.input_ids): float(i + 1) for i, s in enumerate(samples)}  # l_i = i + 1
    weights = [1.0, 10.0, 100.0, 1000.0]
    weight = {tuple(s.input_ids): w for s, w in zip(samples, weights, strict=True)}
    expected: list[float] = []

    def loss_fn(m, batch):
        keys = [tuple(r[a.bool()].tolist()) for r, a in zip(batch.input_ids, batch.attention_mask, strict=True)]
        expected.append(sum(weight[k] * value[k] for k in keys) / len(keys))
        anchor = sum(p.sum() for p in m.parameters() if p.requires_grad) * 0.0
        return torch.tensor([value[k] for k in keys]) + anchor

    cfg = SFTConfig(lr=1e-3, epochs=3, batch_size=2, lora_dropout=0.0, autocast="off")
    stats = train(model, samples, cfg, tiny_tok.pad_token_id, CPU, weights=weights, loss_fn=loss_fn)
    assert stats["loss_curve"] == pytest.approx(expected)
    assert len(expected) == 6


def test_uneven_last_batch_counts(tiny_tok):
    model = lora_model(tiny_tok)
    samples = encoded(tiny_tok)[:3]
    stats = train(
        model, samples, SFTConfig(epochs=2, batch_size=2, lora_dropout=0.0, autocast="off"), tiny_tok.pad_token_id, CPU
    )
    assert stats["steps"] == 2 * math.ceil(3 / 2)
    assert stats["tokens"] == 2 * sum(len(s.input_ids) for s in samples)


def test_same_seed_same_curve(tiny_tok):
    curves = []
    for _ in range(2):
        model = lora_model(tiny_tok)
        cfg = SFTConfig(lr=1e-2, epochs=2, batch_size=2, lora_dropout=0.0, seed=3, autocast="off")
        curves.append(train(model, encoded(tiny_tok), cfg, tiny_tok.pad_token_id, CPU)["loss_curve"])
    assert curves[0] == curves[1]


def test_no_samples_error(tiny_tok):
    with pytest.raises(RapidunError, match="no training samples"):
        train(lora_model(tiny_tok), [], SFTConfig(), tiny_tok.pad_token_id, CPU)


def test_non_finite_loss_stops(tiny_tok):
    model = lora_model(tiny_tok)

    def nan_loss(m, batch):
        return ce_loss(m, batch) * float("nan")

    with pytest.raises(RapidunError, match=r"sft\.lr"):
        train(model, encoded(tiny_tok), SFTConfig(epochs=1, batch_size=2), tiny_tok.pad_token_id, CPU, loss_fn=nan_loss)


def test_attach_lora_unknown_target(tiny_tok):
    with pytest.raises(RapidunError) as ei:
        attach_lora(make_model(len(tiny_tok)), 4, 8, 0.0, ["q_proj", "qkv"], seed=0)
    assert "'qkv'" in str(ei.value) and "q_proj" in str(ei.value)


@torch.no_grad()
def test_attach_lora_keeps_outputs(tiny_tok):
    model = make_model(len(tiny_tok))
    x = torch.tensor([[3, 10, 11, 12]])
    before = model(input_ids=x).logits.clone()
    wrapped = attach_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"], seed=0)
    wrapped.eval()
    assert torch.allclose(wrapped(input_ids=x).logits, before, atol=1e-6)


def test_weights_must_match_samples(tiny_tok, tiny_model):
    s = [encode(tiny_tok, "q", "a", 16, 8)]
    with pytest.raises(RapidunError, match="1 samples"):
        train(tiny_model, s, SFTConfig(epochs=1), tiny_tok.pad_token_id, torch.device("cpu"), weights=[1.0, 2.0])


def test_use_autocast_modes():
    from rapidun.train import cpu_has_bf16, use_autocast

    cpu = torch.device("cpu")
    assert use_autocast("off", cpu) is False and use_autocast("bf16", cpu) is True
    assert use_autocast("auto", cpu) is cpu_has_bf16()
    assert use_autocast("auto", torch.device("cuda")) is True
    with pytest.raises(RapidunError, match="autocast"):
        use_autocast("fp8", cpu)
