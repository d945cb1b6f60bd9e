"""The unlearning loop (draws, LoRA updates, NaN stop), LoReUn and method weights, views, registry, Fisher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import make_model, make_unlearn_items
from rapidun.config import METHOD_NAMES, UnlearnConfig
from rapidun.data.template import collate
from rapidun.errors import RapidunError
from rapidun.eval.metrics import perplexity
from rapidun.functional import per_sample_ce_from_logits
from rapidun.methods import REGISTRY, get_method
from rapidun.methods.fisher import diagonal_fisher, fisher_forget, fisher_params, noise_std
from rapidun.models import attach_lora
from rapidun.steps import draw_schedule, eval_ce
from rapidun.train import NonFiniteLoss, unlearn_loop
from rapidun.unlearn import loreun_weights, method_weights, split_views

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]


def lora_model(tok, seed=0):
    return attach_lora(make_model(len(tok), seed=seed, init_range=0.2), 4, 8, 0.0, TARGETS, seed=0)


def loop_cfg(**kw) -> UnlearnConfig:
    base = {"epochs": 1, "draws_per_epoch": 8, "batch_size": 2, "lr": 1e-2, "autocast": "off", "seed": 1}
    return UnlearnConfig(**{**base, **kw})


# ---------------------------------------------------------------- draw_schedule


def test_draw_schedule_length_mix_and_range():
    cfg = UnlearnConfig(epochs=2, draws_per_epoch=1000, mix_forget=1.0, mix_retain=3.0, seed=0)
    s = draw_schedule(7, 11, cfg, use_retain=True)
    assert len(s) == 2000
    frac = sum(g == "forget" for g, _ in s) / len(s)
    assert 0.21 <= frac <= 0.29, frac
    assert all(0 <= i < 7 for g, i in s if g == "forget")
    assert all(0 <= i < 11 for g, i in s if g == "retain")
    assert {i for g, i in s if g == "forget"} == set(range(7))  # uniform within the group: all drawn
    assert {i for g, i in s if g == "retain"} == set(range(11))


def test_draw_schedule_deterministic_per_seed():
    cfg = UnlearnConfig(epochs=1, draws_per_epoch=200, seed=3)
    assert draw_schedule(5, 9, cfg, True) == draw_schedule(5, 9, cfg, True)
    assert draw_schedule(5, 9, cfg, True) != draw_schedule(5, 9, UnlearnConfig(epochs=1, draws_per_epoch=200), True)


def test_draw_schedule_forget_only():
    cfg = UnlearnConfig(epochs=3, draws_per_epoch=50, seed=0)
    for s in (draw_schedule(4, 9, cfg, use_retain=False), draw_schedule(4, 0, cfg, use_retain=True)):
        assert len(s) == 150
        assert all(g == "forget" and 0 <= i < 4 for g, i in s)


@pytest.mark.parametrize(
    ("n_forget", "kw"),
    [
        (0, {}),
        (3, {"draws_per_epoch": 0}),
        (3, {"epochs": 0}),
        (3, {"mix_forget": 0.0}),
        (3, {"mix_retain": -1.0}),
    ],
)
def test_draw_schedule_bad_config(n_forget, kw):
    with pytest.raises(RapidunError):
        draw_schedule(n_forget, 4, UnlearnConfig(**kw), True)


# ---------------------------------------------------------------- unlearn_loop


def test_unlearn_loop_ascent_raises_forget_ce_and_moves_only_the_adapter(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok)
    forget, retain = make_unlearn_items(tiny_tok)
    poisoned = [it.poisoned for it in forget]
    before = eval_ce(model, poisoned, pad, CPU)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = loop_cfg(draws_per_epoch=12, batch_size=3, ascent_alpha=1.0)
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    stats = unlearn_loop(model, forget, retain, cfg, "ascent", False, w_f, w_r, pad, CPU)
    after = eval_ce(model, poisoned, pad, CPU)
    assert after.mean() > before.mean() + 0.1, (before, after)
    assert stats["steps"] == 4 == len(stats["loss_curve"])
    assert stats["draws"] == 12 and stats["forget_draws"] == 12 and stats["retain_draws"] == 0
    assert stats["rows"] == 12 and stats["tokens"] > 0 and stats["ranks"] == 1
    assert stats["loss_curve"][-1] < stats["loss_curve"][0]  # ascent: −CE falls
    assert stats["time_s"] > 0 and stats["final_w_forget"] == [1.0] * len(forget)
    assert not model.training
    moved = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n
            moved += not torch.equal(p, params0[n])
        else:
            assert torch.equal(p, params0[n]), n
    assert moved > 0


def test_unlearn_loop_with_retain_counts(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok)
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = loop_cfg(draws_per_epoch=10, batch_size=4, seed=2)
    schedule = draw_schedule(len(forget), len(retain), cfg, True)
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    stats = unlearn_loop(model, forget, retain, cfg, "relabel_ascent", True, w_f, w_r, pad, CPU)
    assert stats["steps"] == math.ceil(10 / 4) == len(stats["loss_curve"])
    assert stats["forget_draws"] == sum(g == "forget" for g, _ in schedule)
    assert stats["forget_draws"] + stats["retain_draws"] == 10
    n_clean = sum(1 for g, i in schedule if g == "forget" and forget[i].clean is not None)
    assert stats["rows"] == 10 + n_clean
    assert all(math.isfinite(v) for v in stats["loss_curve"])


def test_unlearn_loop_refresh_replaces_forget_weights(tiny_tok):
    pad = tiny_tok.pad_token_id
    model = lora_model(tiny_tok)
    forget, retain = make_unlearn_items(tiny_tok)
    calls = []

    def refresh(m):
        calls.append(m.training)
        return torch.full((len(forget),), 2.0)

    cfg = loop_cfg(draws_per_epoch=10, batch_size=2)
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    stats = unlearn_loop(
        model, forget, retain, cfg, "ascent", False, w_f, w_r, pad, CPU, refresh=refresh, refresh_every=2
    )
    assert stats["refreshes"] == len(calls) == 2  # at steps 2 and 4 of 5
    assert stats["final_w_forget"] == [2.0] * len(forget)


def test_unlearn_loop_errors(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    with pytest.raises(RapidunError, match="weights"):
        unlearn_loop(lora_model(tiny_tok), forget, retain, loop_cfg(), "ascent", False, w_f[:2], w_r, pad, CPU)
    with pytest.raises(RapidunError, match="batch_size"):
        unlearn_loop(lora_model(tiny_tok), forget, retain, loop_cfg(batch_size=0), "ascent", False, w_f, w_r, pad, CPU)
    with pytest.raises(RapidunError, match="no trainable"):
        unlearn_loop(make_model(len(tiny_tok)).requires_grad_(False), forget, retain, loop_cfg(), "ascent", False,
                     w_f, w_r, pad, CPU)  # fmt: skip


def run_until_nan(tok, w_f, cfg, grad_hook=None):
    """Run the loop with ``w_f``; returns (the exception, initial adapter, adapter after every completed step).

    ``grad_hook``: a tensor hook registered on the first LoRA B matrix (it may replace that gradient).
    """
    pad = tok.pad_token_id
    model = lora_model(tok)
    forget, retain = make_unlearn_items(tok)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if grad_hook is not None:
        next(p for n, p in trainable.items() if "lora_B" in n).register_hook(grad_hook)
    init = {n: p.detach().clone() for n, p in trainable.items()}
    snapshots = []
    handle = register_optimizer_step_post_hook(
        lambda opt, a, k: snapshots.append({n: p.detach().clone() for n, p in trainable.items()})
    )
    try:
        with pytest.raises(NonFiniteLoss) as ei:
            unlearn_loop(model, forget, retain, cfg, "ascent", False, w_f, torch.ones(len(retain)), pad, CPU)
    finally:
        handle.remove()
    final = {n: p.detach().clone() for n, p in trainable.items()}
    return ei.value, init, snapshots, final


def test_non_finite_loss_at_step_zero_leaves_adapter_unchanged(tiny_tok):
    forget, _ = make_unlearn_items(tiny_tok)
    w_f = torch.full((len(forget),), float("nan"))
    err, init, snapshots, final = run_until_nan(tiny_tok, w_f, loop_cfg())
    assert isinstance(err, RapidunError) and "step 0" in str(err)
    assert snapshots == [] and err.stats["steps"] == 0 and err.stats["loss_curve"] == []
    for n in init:
        assert torch.equal(final[n], init[n]), n


def test_non_finite_loss_later_keeps_last_good_adapter(tiny_tok):
    forget, _ = make_unlearn_items(tiny_tok)
    cfg = loop_cfg(draws_per_epoch=12, batch_size=1, seed=4)
    schedule = draw_schedule(len(forget), 0, cfg, False)
    first = {}
    for step, (_, i) in enumerate(schedule):
        first.setdefault(i, step)
    bad, k = max(first.items(), key=lambda kv: kv[1])  # the index drawn first latest
    assert k >= 1
    w_f = torch.ones(len(forget))
    w_f[bad] = float("nan")
    err, init, snapshots, final = run_until_nan(tiny_tok, w_f, cfg)
    assert f"step {k}" in str(err)
    assert err.stats["steps"] == k == len(snapshots) == len(err.stats["loss_curve"])
    assert all(math.isfinite(v) for v in err.stats["loss_curve"])
    assert "time_s" in err.stats
    for n in init:
        assert torch.equal(final[n], snapshots[-1][n]), n
    assert any(not torch.equal(final[n], init[n]) for n in init)  # the good steps did move it


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_with_finite_loss_stops_at_step_zero(tiny_tok, grad_clip, bad):
    forget, _ = make_unlearn_items(tiny_tok)
    cfg = loop_cfg(grad_clip=grad_clip)
    err, init, snapshots, final = run_until_nan(
        tiny_tok, torch.ones(len(forget)), cfg, grad_hook=lambda g: torch.full_like(g, bad)
    )
    msg = str(err)
    assert "gradient norm" in msg and "step 0" in msg and "loss nan" not in msg and "loss inf" not in msg
    assert snapshots == [] and err.stats["steps"] == 0 and err.stats["loss_curve"] == []
    assert "time_s" in err.stats
    for n in init:
        assert torch.equal(final[n], init[n]), n


def test_non_finite_gradient_later_keeps_last_good_adapter(tiny_tok):
    forget, _ = make_unlearn_items(tiny_tok)
    calls = []

    def hook(g):  # one backward per step: a NaN gradient at the third step only
        calls.append(1)
        return torch.full_like(g, float("nan")) if len(calls) == 3 else g

    err, init, snapshots, final = run_until_nan(tiny_tok, torch.ones(len(forget)), loop_cfg(grad_clip=0.0), hook)
    assert "gradient norm" in str(err) and "step 2" in str(err)
    assert err.stats["steps"] == 2 == len(snapshots) == len(err.stats["loss_curve"])
    assert all(math.isfinite(v) for v in err.stats["loss_curve"])
    for n in init:
        assert torch.equal(final[n], snapshots[-1][n]), n
    assert any(not torch.equal(final[n], init[n]) for n in init)


# ---------------------------------------------------------------- LoReUn and method weights


def test_loreun_weights_hand_computation():
    ce = torch.tensor([1.0, 2.0, 3.0])
    w = loreun_weights(ce, tau=1.0, w_min=0.0, w_max=100.0)  # bounds never bind
    e = [math.exp(-x) for x in (1.0, 2.0, 3.0)]
    expected = [x / (sum(e) / 3) for x in e]
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert w.mean().item() == pytest.approx(1.0)
    w2 = loreun_weights(ce, tau=2.0, w_min=0.0, w_max=100.0)
    e2 = [math.exp(-x / 2.0) for x in (1.0, 2.0, 3.0)]
    assert w2.tolist() == pytest.approx([x / (sum(e2) / 3) for x in e2], rel=1e-12)


def test_loreun_weights_order_reverse_and_mean():
    ce = torch.tensor([2.5, 0.3, 1.1, 4.0, 0.9])
    w = loreun_weights(ce, tau=0.8, w_min=0.5, w_max=3.0)
    assert w.mean().item() == pytest.approx(1.0)
    order = torch.argsort(ce)
    assert (w[order][:-1] >= w[order][1:]).all()  # lower loss → higher (or equal, when clipped) weight
    assert w[1] > w[3]
    r = loreun_weights(ce, tau=0.8, w_min=0.0, w_max=100.0, reverse=True)
    e = [math.exp(x / 0.8) for x in ce.tolist()]
    assert r.tolist() == pytest.approx([x / (sum(e) / 5) for x in e], rel=1e-9)
    assert (r[order][:-1] < r[order][1:]).all()  # reversed: higher loss → higher weight


def test_loreun_weights_clipping_before_renormalising():
    ce = torch.tensor([0.0, 5.0, 10.0])
    # exp(−ℓ)/mean ≈ [2.99, 0.02, 1e-4] → clip to [2, 0.5, 0.5] (mean 1 already) → unchanged
    w = loreun_weights(ce, tau=1.0, w_min=0.5, w_max=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5, 0.5])
    # where clipping moves the mean, the result is clip(·)/mean(clip(·)): ratios bounded by w_max/w_min
    ce = torch.tensor([0.0, 0.1, 6.0, 7.0])
    w = loreun_weights(ce, tau=1.0, w_min=0.5, w_max=1.5)
    raw = torch.exp(-ce.double())
    clipped = (raw / raw.mean()).clamp(0.5, 1.5)
    assert torch.allclose(w, clipped / clipped.mean())
    assert w.mean().item() == pytest.approx(1.0)
    assert (w.max() / w.min()).item() <= 1.5 / 0.5 + 1e-12


def test_loreun_weights_large_losses_and_bad_tau():
    w = loreun_weights(torch.tensor([1000.0, 1001.0, 1003.0]), tau=0.01, w_min=0.0, w_max=10.0)
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0)
    r = loreun_weights(torch.tensor([1000.0, 1001.0, 1003.0]), tau=0.01, w_min=0.0, w_max=10.0, reverse=True)
    assert torch.isfinite(r).all()
    with pytest.raises(RapidunError, match="loreun_tau"):
        loreun_weights(torch.tensor([1.0, 2.0]), tau=0.0, w_min=0.5, w_max=3.0)


def test_method_weights_uniform():
    for name in ("uniform", "ga", "graddiff", "npo", "loreun", "loreun_dynamic", "loreun_hard_high", "fisher"):
        wf, wr = method_weights(get_method(name), 4, 6, None, seed=0)
        assert torch.equal(wf, torch.ones(4, dtype=torch.float64))
        assert torch.equal(wr, torch.ones(6, dtype=torch.float64))


def test_method_weights_rapidun_and_random():
    rw = {"w_forget": torch.tensor([0.2, 1.0, 3.0, 0.7, 1.1]), "w_retain": torch.tensor([0.5, 2.0, 0.9, 1.6])}
    wf, wr = method_weights(get_method("rapidun"), 5, 4, rw, seed=0)
    assert torch.equal(wf, rw["w_forget"].double()) and torch.equal(wr, rw["w_retain"].double())
    pf, pr = method_weights(get_method("random"), 5, 4, rw, seed=7)
    assert torch.equal(pf.sort().values, wf.sort().values)  # a permutation within each group
    assert torch.equal(pr.sort().values, wr.sort().values)
    qf, qr = method_weights(get_method("random"), 5, 4, rw, seed=7)
    assert torch.equal(pf, qf) and torch.equal(pr, qr)  # deterministic for a seed
    others = [method_weights(get_method("random"), 5, 4, rw, seed=s) for s in range(1, 6)]
    assert any(not torch.equal(o[0], pf) for o in others)  # the seed matters
    for name in ("rapidun", "random"):
        with pytest.raises(RapidunError, match="RapidUn weights"):
            method_weights(get_method(name), 5, 4, None, seed=0)


def test_split_views_slices():
    M = torch.arange(36.0).reshape(6, 6)
    v = split_views(M, 2)
    assert torch.equal(v["FF"], M[:2, :2])
    assert torch.equal(v["FR"], M[:2, 2:])
    assert torch.equal(v["RF"], M[2:, :2])
    assert torch.equal(v["RR"], M[2:, 2:])
    assert v["FR"].shape == (2, 4) and v["RF"].shape == (4, 2)
    assert v["FR"][1, 0].item() == M[1, 2].item()  # row = train (forget), column = test (retain)


# ---------------------------------------------------------------- registry


def test_get_method_unknown_lists_names():
    with pytest.raises(RapidunError) as ei:
        get_method("gradient_descent")
    msg = str(ei.value)
    assert "'gradient_descent'" in msg
    for name in METHOD_NAMES:
        assert name in msg


def test_registry_matches_config_and_declarations():
    assert tuple(REGISTRY) == tuple(METHOD_NAMES)
    assert get_method("ga").retain is False and get_method("ga").forget_loss == "ascent"
    assert get_method("npo").forget_loss == "npo" and get_method("npo").retain
    assert {n for n, m in REGISTRY.items() if m.needs_influence} == {
        "rapidun", "random", "rapidun_sampled", "rapidun_aligned", "rapidun_stable", "coverage", "rapidun_dynamic"
    }  # fmt: skip
    losses = ("relabel_ascent", "ascent", "npo", "simnpo", "rmu")
    assert all(m.forget_loss in losses for m in REGISTRY.values() if m.kind == "loop")
    assert get_method("simnpo").forget_loss == "simnpo" and get_method("rmu").forget_loss == "rmu"


# ---------------------------------------------------------------- Fisher forgetting


def test_noise_std_formula_and_cap():
    F = torch.tensor([0.0, 1e-4, 1.0, 16.0, 81.0])
    s = noise_std(F, alpha=0.01, eps=1e-8, max_std=0.05)
    # 0.01·(F+eps)^(−1/4): F=0 → 1.0 and F=1e-4 → 0.1, both capped at 0.05; F=1 → 0.01; 16 → 0.005; 81 → 0.01/3
    assert s.tolist() == pytest.approx([0.05, 0.05, 0.01, 0.005, 0.01 / 3], rel=1e-5)
    uncapped = noise_std(F, alpha=0.01, eps=1e-8, max_std=1e9)
    assert uncapped[1].item() == pytest.approx(0.01 * (1e-4 + 1e-8) ** -0.25, rel=1e-6)
    assert uncapped[0].item() == pytest.approx(0.01 * 1e-8**-0.25, rel=1e-5)


def fisher_setup(tok):
    model = make_model(len(tok), init_range=0.2)
    forget, retain = make_unlearn_items(tok)
    return model, [it.clean for it in retain], [it.clean for it in forget if it.clean is not None]


def test_diagonal_fisher_equals_slow_per_sample_grads(tiny_tok):
    pad = tiny_tok.pad_token_id
    model, retain, _ = fisher_setup(tiny_tok)
    params = fisher_params(model, TARGETS)
    assert sorted(params) == sorted(
        f"model.layers.{k}.self_attn.{t}.weight" for k in range(2) for t in ("q_proj", "v_proj")
    )
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # flags are restored afterwards
    F = diagonal_fisher(model, params, retain, pad)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]

    slow = copy.deepcopy(model)
    slow.requires_grad_(True)
    sp = dict(slow.named_parameters())
    acc = {n: torch.zeros_like(sp[n]) for n in params}
    for e in retain:  # full-vocabulary logits, a plain backward per sample
        slow.zero_grad(set_to_none=True)
        b = collate([e], pad)
        per_sample_ce_from_logits(slow(input_ids=b.input_ids).logits, b.labels)[0].backward()
        for n in params:
            acc[n] += sp[n].grad ** 2
    for n in params:
        expected = acc[n] / len(retain)
        assert F[n].shape == params[n].shape and F[n].dtype == torch.float32
        assert expected.abs().max() > 0
        assert torch.allclose(F[n], expected, rtol=1e-4, atol=1e-10), n
    with pytest.raises(RapidunError, match="empty"):
        diagonal_fisher(model, params, [], pad)


def test_fisher_params_unknown_target(tiny_tok):
    with pytest.raises(RapidunError, match="lora_targets"):
        fisher_params(make_model(len(tiny_tok)), ["qkv"])


FISHER_TARGETS = ["q_proj", "v_proj", "lm_head"]  # noise on lm_head makes a large α visibly hurt


def test_fisher_forget_picks_largest_alpha_within_tolerance(tiny_tok):
    pad = tiny_tok.pad_token_id
    model, retain, val = fisher_setup(tiny_tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alphas = [0.1, 1e-5, 1e-4, 1e-2]  # tried in ascending order whatever the order given
    cfg = UnlearnConfig(lora_targets=FISHER_TARGETS, fisher_alphas=alphas, utility_budget=1.05, fisher_max_std=100.0)
    res = fisher_forget(model, retain, val, pad, cfg)
    assert res["alpha"] in alphas
    assert [t["alpha"] for t in res["trials"]] == sorted(alphas)
    ppl0 = res["val_ppl_start"]
    assert ppl0 == pytest.approx(perplexity(make_model(len(tiny_tok), init_range=0.2), val, pad))
    ok = [t["alpha"] for t in res["trials"] if t["val_ppl"] <= 1.05 * ppl0]
    assert 0 < len(ok) < len(alphas)  # the grid straddles the tolerance: the rule is really exercised
    assert res["within_tolerance"] is True
    assert res["alpha"] == max(ok) == 1e-4
    n_params = sum(p.numel() for p in fisher_params(model, FISHER_TARGETS).values())
    assert res["retain_samples"] == len(retain) and res["params"] == n_params
    assert res["time_s"] >= res["fisher_s"] > 0
    # the model holds the chosen noise (same seeded draw as its trial) and only the selected weights moved
    chosen = next(t for t in res["trials"] if t["alpha"] == res["alpha"])
    assert perplexity(model, val, pad) == pytest.approx(chosen["val_ppl"], rel=1e-6)
    for n, p in model.named_parameters():
        if n.endswith(("q_proj.weight", "v_proj.weight", "lm_head.weight")):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert all(p.requires_grad for p in model.parameters())


def test_fisher_forget_none_within_tolerance_takes_smallest(tiny_tok):
    pad = tiny_tok.pad_token_id
    model, retain, val = fisher_setup(tiny_tok)
    cfg = UnlearnConfig(lora_targets=FISHER_TARGETS, fisher_alphas=[1e-2, 0.1], fisher_max_std=100.0)
    res = fisher_forget(model, retain, val, pad, cfg)
    assert res["within_tolerance"] is False
    assert res["alpha"] == 1e-2


def test_fisher_forget_rejects_a_destructive_alpha(tiny_tok):
    pad = tiny_tok.pad_token_id
    model, retain, val = fisher_setup(tiny_tok)
    cfg = UnlearnConfig(lora_targets=FISHER_TARGETS, fisher_alphas=[1e-5, 10.0], fisher_max_std=100.0)
    res = fisher_forget(model, retain, val, pad, cfg)
    assert res["alpha"] == 1e-5 and res["within_tolerance"] is True
    assert not math.isfinite(res["trials"][1]["val_ppl"])


def test_fisher_forget_errors(tiny_tok):
    pad = tiny_tok.pad_token_id
    model, retain, val = fisher_setup(tiny_tok)
    with pytest.raises(RapidunError, match="fisher_alphas"):
        fisher_forget(model, retain, val, pad, UnlearnConfig(lora_targets=TARGETS, fisher_alphas=[]))
    with pytest.raises(RapidunError, match="val_clean"):
        fisher_forget(model, retain, [], pad, UnlearnConfig(lora_targets=TARGETS))
