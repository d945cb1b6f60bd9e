"""Per-sample unlearning losses: hand-computed values, NPO's shape, one-forward step losses, NPO's reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from helpers import make_model, make_unlearn_items
from rapidun.config import UnlearnConfig
from rapidun.data.template import collate
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE, per_sample_ce
from rapidun.methods import losses
from rapidun.models import attach_lora
from rapidun.steps import draw_schedule, row_stats, step_losses
from rapidun.train import unlearn_loop
from rapidun.unlearn import reference_logp

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]


# ---------------------------------------------------------------- the loss functions on small tensors


def test_retain_ce_is_the_clean_ce():
    ce = torch.tensor([0.3, 1.7, 2.0])
    out = losses.retain_ce(ce)
    assert out.shape == (3,)
    assert torch.equal(out, ce)


def test_relabel_ascent_hand_values():
    ce_clean = torch.tensor([1.0, 2.0, 3.0, 0.25])
    ce_poisoned = torch.tensor([0.5, 1.5, 4.0, 2.0])
    has = torch.tensor([True, False, True, True])
    out = losses.relabel_ascent(ce_clean, ce_poisoned, has, alpha_a=2.0, beta_d=0.5)
    assert out.shape == (4,)
    # β_d·CE(clean) − α_a·CE(poisoned); the second sample has no clean answer: −α_a·CE(poisoned) only
    expected = torch.tensor([0.5 * 1.0 - 2.0 * 0.5, -2.0 * 1.5, 0.5 * 3.0 - 2.0 * 4.0, 0.5 * 0.25 - 2.0 * 2.0])
    assert torch.allclose(out, expected)


def test_relabel_ascent_without_clean_is_pure_ascent():
    ce_poisoned = torch.tensor([0.5, 1.5, 4.0])
    garbage = torch.tensor([float("nan"), 1e9, -3.0])  # ignored where has_clean is False (even NaN)
    none = torch.zeros(3, dtype=torch.bool)
    out = losses.relabel_ascent(garbage, ce_poisoned, none, alpha_a=1.5, beta_d=0.7)
    assert torch.allclose(out, -1.5 * ce_poisoned)


def test_relabel_ascent_beta_zero_is_pure_ascent():
    ce_clean = torch.tensor([1.0, 2.0, 3.0])
    ce_poisoned = torch.tensor([0.5, 1.5, 4.0])
    has = torch.ones(3, dtype=torch.bool)
    out = losses.relabel_ascent(ce_clean, ce_poisoned, has, alpha_a=1.0, beta_d=0.0)
    assert torch.allclose(out, losses.ascent(ce_poisoned))


def test_relabel_ascent_no_gradient_through_masked_clean():
    ce_clean = torch.tensor([1.0, 2.0], requires_grad=True)
    ce_poisoned = torch.tensor([0.5, 1.5], requires_grad=True)
    out = losses.relabel_ascent(ce_clean, ce_poisoned, torch.tensor([True, False]), alpha_a=2.0, beta_d=0.5)
    out.sum().backward()
    assert torch.allclose(ce_clean.grad, torch.tensor([0.5, 0.0]))
    assert torch.allclose(ce_poisoned.grad, torch.tensor([-2.0, -2.0]))


def test_ascent_hand_values():
    out = losses.ascent(torch.tensor([0.5, 1.5, 4.0]))
    assert out.shape == (3,)
    assert torch.allclose(out, torch.tensor([-0.5, -1.5, -4.0]))


def npo_slow(logp: float, ref: float, beta: float) -> float:
    return (2.0 / beta) * math.log(1.0 + math.exp(beta * (logp - ref)))


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_matches_the_slow_formula(beta):
    logp = torch.tensor([-3.0, -10.0, -1.0, -7.5], dtype=torch.float64)
    ref = torch.tensor([-4.0, -2.0, -1.0, -20.0], dtype=torch.float64)
    out = losses.npo(logp, ref, beta)
    assert out.shape == (4,)
    expected = [npo_slow(a, b, beta) for a, b in zip(logp.tolist(), ref.tolist(), strict=True)]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_npo_at_reference_value_and_gradient(beta):
    logp = torch.tensor([-5.0, -0.5, -12.0], dtype=torch.float64, requires_grad=True)
    ref = logp.detach().clone()
    out = losses.npo(logp, ref, beta)
    assert torch.allclose(out, torch.full((3,), (2.0 / beta) * math.log(2.0), dtype=torch.float64))
    out.sum().backward()
    assert torch.allclose(logp.grad, torch.ones(3, dtype=torch.float64))  # d ℓ / d log π = 1 at π = π_ref


def test_npo_gradient_shrinks_as_sample_becomes_unlikely_and_is_stable():
    logp = torch.tensor([0.0, -5.0, -50.0, 500.0], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(4, dtype=torch.float64)
    out = losses.npo(logp, ref, 1.0)
    assert torch.isfinite(out).all()
    assert out[3].item() == pytest.approx(2.0 * 500.0)  # log(1+e^x) ≈ x for large x, no overflow
    out.sum().backward()
    g = logp.grad
    assert g[0] > g[1] > g[2] > 0
    assert g[3].item() == pytest.approx(2.0)  # 2·σ(β·Δ) → 2


# ---------------------------------------------------------------- step_losses on a tiny model


def n_answer(e) -> int:
    """Answer tokens that carry a (shifted) target: labels[1:] not IGNORE."""
    return sum(1 for x in e.labels[1:] if x != IGNORE)


@torch.no_grad()
def ce_alone(model, e, pad_id) -> float:
    """Mean answer CE of one row with its own forward pass (no padding, no batching)."""
    b = collate([e], pad_id)
    return per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)[0].item()


def logp_alone(model, e, pad_id) -> float:
    return -ce_alone(model, e, pad_id) * n_answer(e)


def manual_losses(model, draws, forget, retain, forget_loss, cfg, pad_id, ref=None) -> list[float]:
    out = []
    for g, i in draws:
        if g == "retain":
            out.append(ce_alone(model, retain[i].clean, pad_id))
            continue
        it = forget[i]
        ce_p = ce_alone(model, it.poisoned, pad_id)
        if forget_loss == "ascent":
            out.append(-ce_p)
        elif forget_loss == "relabel_ascent":
            desc = ce_alone(model, it.clean, pad_id) if it.clean is not None else 0.0
            out.append(cfg.descent_beta * desc - cfg.ascent_alpha * ce_p)
        else:
            lp = logp_alone(model, it.poisoned, pad_id)
            out.append(npo_slow(lp, float(ref[i]), cfg.npo_beta))
    return out


def lora_model(tok, seed=0, b_scale=0.0):
    """A tiny Llama with a q/v LoRA; ``b_scale`` > 0 sets the B matrices non-zero so the adapter changes outputs."""
    model = attach_lora(make_model(len(tok), seed=seed, init_range=0.2), 4, 8, 0.0, TARGETS, seed=0)
    if b_scale:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    return model


# forget 0 (has clean), 2 (no clean), 5 (no clean), 3 (clean) and retain draws, with repeats
DRAWS = [("forget", 0), ("retain", 1), ("forget", 2), ("retain", 4), ("forget", 3), ("forget", 0), ("forget", 5)]


@pytest.mark.parametrize("forget_loss", ["relabel_ascent", "ascent", "npo"])
def test_step_losses_equal_separate_forwards(tiny_tok, forget_loss):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, b_scale=0.3)
    model.eval()
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(ascent_alpha=1.3, descent_beta=0.6, npo_beta=0.7, autocast="off")
    ref = torch.tensor([-3.0, -8.0, -1.0, -5.5, -2.0, -4.0]) if forget_loss == "npo" else None
    with torch.no_grad():
        got, n_rows, n_tok = step_losses(model, DRAWS, forget, retain, forget_loss, cfg, pad, CPU, ref)
    assert got.shape == (len(DRAWS),)
    expected = manual_losses(model, DRAWS, forget, retain, forget_loss, cfg, pad, ref)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5), (got, expected)
    # rows: every draw needs one row, plus a clean row for relabel forget draws with a clean answer
    n_clean = sum(1 for g, i in DRAWS if g == "forget" and forget[i].clean is not None)
    assert n_rows == len(DRAWS) + (n_clean if forget_loss == "relabel_ascent" else 0)
    assert n_tok > 0


def test_step_losses_beta_zero_skips_clean_rows(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, b_scale=0.3)
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(descent_beta=0.0, ascent_alpha=1.0, autocast="off")
    with torch.no_grad():
        got, n_rows, _ = step_losses(model, DRAWS, forget, retain, "relabel_ascent", cfg, pad, CPU)
        asc, _, _ = step_losses(model, DRAWS, forget, retain, "ascent", cfg, pad, CPU)
    assert n_rows == len(DRAWS)
    assert torch.allclose(got, asc, atol=1e-6)


def test_step_losses_npo_needs_reference(tiny_tok):
    forget, retain = make_unlearn_items(tiny_tok)
    with pytest.raises(RapidunError, match="reference"):
        step_losses(lora_model(tiny_tok), DRAWS, forget, retain, "npo", UnlearnConfig(), 2, CPU, None)
    with pytest.raises(RapidunError, match="unknown forget loss"):
        step_losses(lora_model(tiny_tok), DRAWS, forget, retain, "hinge", UnlearnConfig(), 2, CPU, None)


@pytest.mark.parametrize("forget_loss", ["relabel_ascent", "npo"])
def test_loop_loss_and_gradient_are_the_weighted_mean(tiny_tok, forget_loss):
    """One unlearn_loop step: loss = Σ w_i ℓ_i / B and its gradient, both from separate per-row forwards."""
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(
        epochs=1, draws_per_epoch=6, batch_size=6, lr=1e-3, grad_clip=0.0, autocast="off", seed=5,
        ascent_alpha=1.2, descent_beta=0.4, npo_beta=0.5,
    )  # fmt: skip
    w_f = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25, 1.5])
    w_r = torch.tensor([1.0, 0.1, 4.0, 0.7, 2.0])
    ref = torch.tensor([-3.0, -8.0, -1.0, -5.5, -2.0, -4.0]) if forget_loss == "npo" else None
    draws = draw_schedule(len(forget), len(retain), cfg, True)
    assert {g for g, _ in draws} == {"forget", "retain"}  # the seed gives both kinds in the one step

    # by hand: loss from one row per forward, gradient from autograd on the same sum
    manual = lora_model(tiny_tok, b_scale=0.3)
    manual.train()
    total = 0.0
    for g, i in draws:
        w = float(w_f[i] if g == "forget" else w_r[i])
        ell, _, _ = step_losses(manual, [(g, i)], forget, retain, forget_loss, cfg, pad, CPU, ref)
        total = total + w * ell[0] / len(draws)
    total.backward()
    expected_grads = {n: p.grad.clone() for n, p in manual.named_parameters() if p.requires_grad}
    by_hand = manual_losses(manual, draws, forget, retain, forget_loss, cfg, pad, ref)
    weighted = sum(float(w_f[i] if g == "forget" else w_r[i]) * v for (g, i), v in zip(draws, by_hand, strict=True))
    assert total.item() == pytest.approx(weighted / len(draws), abs=1e-5)

    model = lora_model(tiny_tok, b_scale=0.3)
    seen = {}

    def grab(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                seen[id(p)] = p.grad.clone()

    handle = register_optimizer_step_pre_hook(grab)
    try:
        stats = unlearn_loop(model, forget, retain, cfg, forget_loss, True, w_f, w_r, pad, CPU, ref_logp=ref)
    finally:
        handle.remove()
    assert stats["steps"] == 1
    assert stats["loss_curve"][0] == pytest.approx(weighted / len(draws), abs=2e-5)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(named) == set(expected_grads)
    for n, p in named.items():
        assert torch.allclose(seen[id(p)], expected_grads[n], atol=1e-6, rtol=1e-4), n


# ---------------------------------------------------------------- NPO reference


def test_reference_logp_is_the_base_model(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, _ = make_unlearn_items(tiny_tok)
    base = make_model(len(tiny_tok), init_range=0.2)
    plain = copy.deepcopy(base)
    model = attach_lora(base, 4, 8, 0.0, TARGETS, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # the adapter now changes the outputs
    rows = [it.poisoned for it in forget]
    with torch.no_grad():
        base_logp = row_stats(plain, rows, pad, CPU)[1]
        adapted_logp = row_stats(model, rows, pad, CPU)[1]
    by_hand = torch.tensor([logp_alone(plain, e, pad) for e in rows])
    assert torch.allclose(base_logp, by_hand, atol=1e-4)
    ref = reference_logp(model, forget, pad, CPU)
    assert ref.shape == (len(forget),)
    assert torch.allclose(ref, base_logp, atol=1e-5)
    assert (ref - adapted_logp).abs().max() > 1e-2  # the adapter does matter
    # the adapter is enabled again afterwards
    with torch.no_grad():
        assert torch.allclose(row_stats(model, rows, pad, CPU)[1], adapted_logp, atol=1e-5)
