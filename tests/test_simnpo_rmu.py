"""SimNPO and RMU: the loss functions against slow formulas, the one-forward step losses against one-row-at-a-time
slow versions, RMU's frozen start-model states, its layer check, the config checks and a few loop steps."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_model, make_unlearn_items
from rapidun.config import UnlearnConfig, load_config
from rapidun.data.template import collate
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE, per_sample_ce
from rapidun.methods import losses
from rapidun.models import attach_lora
from rapidun.steps import step_losses
from rapidun.train import unlearn_loop

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]
# forget 0 (has clean), 2 (no clean), 3, 5 and retain draws, with repeats of both kinds
DRAWS = [
    ("forget", 0),
    ("retain", 1),
    ("forget", 2),
    ("retain", 4),
    ("forget", 3),
    ("forget", 0),
    ("retain", 1),
    ("forget", 5),
]


def lora_model(tok, b_scale: float = 0.0, dropout: float = 0.0):
    """A tiny Llama (seed 0) with a q/v LoRA; ``b_scale`` > 0 sets the B matrices non-zero (the adapter then
    changes every hidden state after the first attention)."""
    model = attach_lora(make_model(len(tok), seed=0, init_range=0.2), 4, 8, dropout, TARGETS, seed=0)
    if b_scale:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    return model


def start_model(tok):
    """The plain model the adapter of :func:`lora_model` sits on (same seed: the same weights)."""
    return make_model(len(tok), seed=0, init_range=0.2)


# ---------------------------------------------------------------- SimNPO


def simnpo_slow(ce: float, beta: float, gamma: float) -> float:
    """−(2/β)·log σ(β·CE − γ) = (2/β)·log(1 + exp(−(β·CE − γ))), with math only."""
    return (2.0 / beta) * math.log(1.0 + math.exp(-(beta * ce - gamma)))


@pytest.mark.parametrize(("beta", "gamma"), [(2.5, 0.0), (0.5, 1.0), (4.0, 0.3)])
def test_simnpo_matches_the_slow_formula(beta, gamma):
    ce = torch.tensor([0.0, 0.2, 1.5, 3.0, 7.25], dtype=torch.float64)
    out = losses.simnpo(ce, beta, gamma)
    assert out.shape == (5,)
    expected = torch.tensor([simnpo_slow(c, beta, gamma) for c in ce.tolist()], dtype=torch.float64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_simnpo_hand_values_and_gradient():
    # CE = 0, γ = 0: −(2/β)·log σ(0) = (2/β)·ln 2
    assert losses.simnpo(torch.tensor([0.0], dtype=torch.float64), 2.5, 0.0).item() == pytest.approx(
        0.8 * math.log(2.0), rel=1e-12
    )
    # β = 2, γ = 1, CE = 0.5: β·CE − γ = 0, so ℓ = (2/2)·ln 2 = ln 2 (γ is NOT multiplied by β)
    assert losses.simnpo(torch.tensor([0.5], dtype=torch.float64), 2.0, 1.0).item() == pytest.approx(
        math.log(2.0), rel=1e-12
    )
    # β = 1, γ = 0, CE = ln 3: σ(ln 3) = 3/4, ℓ = −2·ln(3/4)
    assert losses.simnpo(torch.tensor([math.log(3.0)], dtype=torch.float64), 1.0, 0.0).item() == pytest.approx(
        -2.0 * math.log(0.75), rel=1e-12
    )
    # dℓ/dCE = −2·σ(γ − β·CE): ascent on the CE that fades as the answer becomes unlikely
    ce = torch.tensor([0.0, 1.0, 5.0, 500.0], dtype=torch.float64, requires_grad=True)
    out = losses.simnpo(ce, 2.5, 0.5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    expected = [-2.0 / (1.0 + math.exp(2.5 * c - 0.5)) for c in (0.0, 1.0, 5.0)] + [0.0]
    assert torch.allclose(ce.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert ce.grad[0] < ce.grad[1] < ce.grad[2] < 0


@torch.no_grad()
def ce_alone(model, e, pad_id) -> float:
    """Mean answer CE of one row with its own forward pass."""
    b = collate([e], pad_id)
    return per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)[0].item()


def test_step_losses_simnpo_equal_one_row_at_a_time(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, b_scale=0.3).eval()
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(simnpo_beta=0.7, simnpo_gamma=0.4, autocast="off")
    with torch.no_grad():
        got, n_rows, n_tok = step_losses(model, DRAWS, forget, retain, "simnpo", cfg, pad, CPU)
    expected = [
        simnpo_slow(ce_alone(model, forget[i].poisoned, pad), 0.7, 0.4)
        if g == "forget"
        else ce_alone(model, retain[i].clean, pad)
        for g, i in DRAWS
    ]
    assert got.shape == (len(DRAWS),)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5), (got, expected)
    assert n_rows == len(DRAWS)  # one row per draw: no clean rows for the forget draws
    assert n_tok == sum(len((forget[i].poisoned if g == "forget" else retain[i].clean).input_ids) for g, i in DRAWS)
    # reference-free: no ref_logp needed, and the value moves with γ
    other = UnlearnConfig(simnpo_beta=0.7, simnpo_gamma=0.0, autocast="off")
    with torch.no_grad():
        got0, _, _ = step_losses(model, DRAWS, forget, retain, "simnpo", other, pad, CPU)
    f_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "forget"]
    assert (got0[f_pos] < got[f_pos]).all()  # a margin γ > 0 raises every forget loss


# ---------------------------------------------------------------- RMU


def test_rmu_direction_is_a_fixed_nonnegative_unit_vector():
    u = losses.rmu_direction(42, 32)
    assert u.shape == (32,) and u.dtype == torch.float32
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert (u >= 0).all()
    assert torch.equal(u, losses.rmu_direction(42, 32))
    assert not torch.equal(u, losses.rmu_direction(43, 32))
    raw = torch.rand(32, generator=torch.Generator().manual_seed(42))  # the authors: U[0, 1), then normalised
    assert torch.allclose(u, raw / raw.norm())


def slow_hidden(model, e, layer: int) -> torch.Tensor:
    """(T, d) hidden_states[layer] of one row, through the full CausalLM forward (no padding, no batching)."""
    ids = torch.tensor([e.input_ids])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[layer][0]


def slow_answer_mse(h: torch.Tensor, target: torch.Tensor, labels: list[int]) -> float:
    """Mean over answer positions (labels[t] != IGNORE) of ‖h_t − target_t‖²/d, with an explicit position loop."""
    d = h.shape[-1]
    terms = []
    for t, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        tgt = target if target.dim() == 1 else target[t]
        terms.append(sum((float(h[t, k]) - float(tgt[k])) ** 2 for k in range(d)) / d)
    return sum(terms) / len(terms)


@torch.no_grad()
def rmu_slow(model, start, draws, forget, retain, cfg) -> list[float]:
    """RMU per-draw losses, each row alone: forget rows against c·u, retain rows against the plain start model."""
    d = model.get_base_model().config.hidden_size
    raw = torch.rand(d, generator=torch.Generator().manual_seed(cfg.seed))
    target = cfg.rmu_steer * raw / raw.norm()
    out = []
    for g, i in draws:
        e = forget[i].poisoned if g == "forget" else retain[i].clean
        h = slow_hidden(model, e, cfg.rmu_layer)
        if g == "forget":
            out.append(slow_answer_mse(h, target, e.labels))
        else:
            out.append(cfg.rmu_alpha * slow_answer_mse(h, slow_hidden(start, e, cfg.rmu_layer), e.labels))
    return out


@pytest.mark.parametrize("layer", [1, 2])  # 2 = the last layer (after the final norm, as HF returns it)
def test_step_losses_rmu_equal_one_row_at_a_time(tiny_tok, layer):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, b_scale=0.3).eval()
    start = start_model(tiny_tok)
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(rmu_layer=layer, rmu_steer=3.0, rmu_alpha=7.0, seed=11, autocast="off")
    with torch.no_grad():
        got, n_rows, n_tok = step_losses(model, DRAWS, forget, retain, "rmu", cfg, pad, CPU)
    expected = rmu_slow(model, start, DRAWS, forget, retain, cfg)
    assert got.shape == (len(DRAWS),)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-4, atol=1e-6), (got, expected)
    r_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "retain"]
    assert (got[r_pos] > 1e-4).all()  # the adapter moved the states: the retain loss is not trivially 0
    assert n_rows == len(DRAWS)
    assert n_tok == sum(len((forget[i].poisoned if g == "forget" else retain[i].clean).input_ids) for g, i in DRAWS)
    # the frozen pass left the adapter on: a second call gives the same losses
    with torch.no_grad():
        again, _, _ = step_losses(model, DRAWS, forget, retain, "rmu", cfg, pad, CPU)
    assert torch.equal(again, got)


def test_rmu_loss_parameters_scale_as_the_formula_says(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, b_scale=0.3).eval()
    forget, retain = make_unlearn_items(tiny_tok)
    base = {"rmu_layer": 1, "rmu_steer": 3.0, "rmu_alpha": 2.0, "seed": 5, "autocast": "off"}
    with torch.no_grad():
        a, _, _ = step_losses(model, DRAWS, forget, retain, "rmu", UnlearnConfig(**base), pad, CPU)
        b, _, _ = step_losses(
            model, DRAWS, forget, retain, "rmu", UnlearnConfig(**{**base, "rmu_alpha": 6.0}), pad, CPU
        )
        c, _, _ = step_losses(
            model, DRAWS, forget, retain, "rmu", UnlearnConfig(**{**base, "rmu_steer": 9.0}), pad, CPU
        )
        s, _, _ = step_losses(model, DRAWS, forget, retain, "rmu", UnlearnConfig(**{**base, "seed": 6}), pad, CPU)
    f_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "forget"]
    r_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "retain"]
    assert torch.allclose(b[r_pos], 3.0 * a[r_pos]) and torch.equal(b[f_pos], a[f_pos])  # α scales retain only
    assert torch.equal(c[r_pos], a[r_pos]) and not torch.allclose(c[f_pos], a[f_pos])  # c moves forget only
    assert not torch.allclose(s[f_pos], a[f_pos])  # another seed, another direction u


def test_rmu_retain_loss_is_zero_at_a_fresh_adapter(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok, dropout=0.1)  # B = 0; train mode with LoRA dropout, as in the loop
    model.train()
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(rmu_layer=1, rmu_alpha=1000.0, autocast="off")
    got, _, _ = step_losses(model, DRAWS, forget, retain, "rmu", cfg, pad, CPU)
    r_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "retain"]
    f_pos = [k for k, (g, _) in enumerate(DRAWS) if g == "forget"]
    assert (got[r_pos] == 0).all(), got
    assert (got[f_pos] > 0).all()
    got.sum().backward()  # only the forget losses pull: the LoRA B matrices below layer L get a gradient
    below = [p.grad for n, p in model.named_parameters() if "lora_B" in n and ".layers.0." in n]
    above = [p.grad for n, p in model.named_parameters() if "lora_B" in n and ".layers.1." in n]
    assert len(below) == len(above) == 2
    assert all(g is not None and float(g.abs().sum()) > 0 for g in below)
    assert all(g is None for g in above)  # h_1 does not depend on the second layer's adapter
    # retain draws alone: zero loss and zero gradient
    model.zero_grad(set_to_none=True)
    only_retain = [d for d in DRAWS if d[0] == "retain"]
    lr_, _, _ = step_losses(model, only_retain, forget, retain, "rmu", cfg, pad, CPU)
    assert torch.equal(lr_, torch.zeros(len(only_retain)))


@pytest.mark.parametrize("layer", [0, 3, 40])
def test_rmu_bad_layer_is_a_clear_error(tiny_tok, layer):
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(rmu_layer=layer, autocast="off")
    with pytest.raises(RapidunError, match=rf"unlearn\.rmu_layer = {layer}: the model has 2 decoder layers"):
        step_losses(lora_model(tiny_tok), DRAWS, forget, retain, "rmu", cfg, tiny_tok.pad_token_id, CPU)


def test_rmu_retain_needs_the_adapter(tiny_tok):
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(rmu_layer=1, autocast="off")
    with pytest.raises(RapidunError, match="adapter"):
        step_losses(start_model(tiny_tok), DRAWS, forget, retain, "rmu", cfg, tiny_tok.pad_token_id, CPU)


# ---------------------------------------------------------------- config


def test_defaults_and_config_checks():
    u = UnlearnConfig()
    assert (u.simnpo_beta, u.simnpo_gamma) == (2.5, 0.0)
    assert (u.rmu_layer, u.rmu_steer, u.rmu_alpha) == (7, 6.5, 10.0)
    cfg = load_config(None, ["unlearn.simnpo_beta=1.5", "unlearn.rmu_layer=3", "unlearn.rmu_alpha=0"])
    assert cfg.unlearn.simnpo_beta == 1.5 and cfg.unlearn.rmu_layer == 3 and cfg.unlearn.rmu_alpha == 0.0


@pytest.mark.parametrize(
    "override",
    [
        "unlearn.simnpo_beta=0",
        "unlearn.simnpo_beta=-1",
        "unlearn.simnpo_gamma=-0.1",
        "unlearn.rmu_layer=0",
        "unlearn.rmu_steer=0",
        "unlearn.rmu_alpha=-1",
    ],
)
def test_bad_values_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(RapidunError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# ---------------------------------------------------------------- a few loop steps


@torch.no_grad()
def forget_losses(model, forget, retain, forget_loss, cfg, pad) -> torch.Tensor:
    """(N_f,) the forget loss of every forget sample (eval mode), and the model back in train mode."""
    model.eval()
    draws = [("forget", i) for i in range(len(forget))]
    out = step_losses(model, draws, forget, retain, forget_loss, cfg, pad, CPU)[0]
    model.train()
    return out


@pytest.mark.parametrize(
    ("forget_loss", "kw"),
    [("simnpo", {"simnpo_beta": 0.5, "simnpo_gamma": 0.2}), ("rmu", {"rmu_layer": 1, "rmu_steer": 6.5})],
)
def test_loop_steps_reduce_the_forget_loss(tiny_tok, forget_loss, kw):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok)
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(
        epochs=1, draws_per_epoch=16, batch_size=4, lr=1e-2, autocast="off", seed=3, mix_retain=1.0, **kw
    )
    before = forget_losses(model, forget, retain, forget_loss, cfg, pad)
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    stats = unlearn_loop(model, forget, retain, cfg, forget_loss, True, w_f, w_r, pad, CPU)
    after = forget_losses(model, forget, retain, forget_loss, cfg, pad)
    assert stats["steps"] == 4 and stats["retain_draws"] > 0 and stats["forget_draws"] > 0
    assert stats["rows"] == 16  # one row per draw for both methods
    assert all(math.isfinite(v) for v in stats["loss_curve"])
    assert any(not torch.equal(p, lora0[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert after.mean() < 0.97 * before.mean(), (before, after)  # 4 small steps: about -6% (rmu), -13% (simnpo)
    if forget_loss == "rmu":  # the retain loss was 0 at the start and is positive once the adapter moved
        r_draws = [("retain", i) for i in range(len(retain))]
        with torch.no_grad():
            model.eval()
            lr_ = step_losses(model, r_draws, forget, retain, "rmu", cfg, pad, CPU)[0]
        assert (lr_ > 0).all()
