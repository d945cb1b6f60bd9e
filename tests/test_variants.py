"""The method variants: exact/aligned influence, coverage weights, importance sampling, doses, diagnostics, registry.

Every vectorised computation is checked against the obvious slow version (a batch-size-1 autograd loop, a per-row
per-block loop, a double loop); sampling against its expected frequencies; the end-to-end runs use a tiny model
saved in a temporary folder (no downloads).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_model, make_unlearn_items
from rapidun.config import METHOD_NAMES, UnlearnConfig, WeightingConfig
from rapidun.data.records import Record
from rapidun.diagnostics import cell_diagnostics, seed_stability
from rapidun.errors import RapidunError
from rapidun.functional import per_sample_ce
from rapidun.influence.exact import gram, normalize_blocks, objective_grads, raw_grads
from rapidun.influence.grads import select_params
from rapidun.methods import REGISTRY, get_method
from rapidun.models import attach_lora
from rapidun.steps import draw_schedule
from rapidun.train import NonFiniteLoss, unlearn_loop
from rapidun.unlearn import method_weights
from rapidun.weighting import coverage_scores, coverage_weights, effective_sample_size

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# ---------------------------------------------------------------- slow references


def slow_normalize(g: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """One row, one block at a time: v / ‖v‖ (a zero block stays zero)."""
    out = torch.zeros_like(g, dtype=torch.float32)
    for n in range(g.shape[0]):
        off = 0
        for s in sizes:
            v = g[n, off : off + s].float()
            nrm = math.sqrt(sum(float(x) ** 2 for x in v))
            out[n, off : off + s] = v / nrm if nrm > 0 else v
            off += s
    return out


def grad_of(model, pset, loss: torch.Tensor) -> torch.Tensor:
    """(D,) gradient of a scalar w.r.t. the parameter set, flattened in pset order."""
    gs = torch.autograd.grad(loss, pset.params, allow_unused=True)
    return torch.cat(
        [(torch.zeros(p.numel()) if g is None else g.reshape(-1)) for p, g in zip(pset.params, gs, strict=True)]
    )


def ce_one(model, e) -> torch.Tensor:
    """Mean answer CE of one unpadded sample (the functional per-sample CE with batch 1)."""
    ids = torch.tensor([e.input_ids])  # (1, L)
    labels = torch.tensor([e.labels])  # (1, L)
    return per_sample_ce(model, ids, torch.ones_like(ids), labels)[0]


def grad_model(tok):
    """Tiny Llama + LoRA with random B (so A's blocks get gradient too), in eval mode."""
    model = attach_lora(make_model(len(tok), init_range=0.2), 4, 8, 0.0, TARGETS, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ---------------------------------------------------------------- objective_grads vs an autograd loop


@pytest.mark.parametrize("normalize", [True, False])
def test_objective_grads_aligned_equals_autograd_loop(tiny_tok, normalize):
    model = grad_model(tiny_tok)
    pset = select_params(model, "lora")
    forget, retain = make_unlearn_items(tiny_tok)
    assert any(it.clean is None for it in forget) and any(it.clean is not None for it in forget)
    alpha, beta = 0.7, 0.3
    G, norms = objective_grads(
        model, pset, [it.poisoned for it in forget], [it.clean for it in forget], [it.clean for it in retain],
        tiny_tok.pad_token_id, "aligned", alpha, beta, normalize=normalize, batch_size=4,
    )  # fmt: skip
    rows = []
    for it in forget:
        loss = -alpha * ce_one(model, it.poisoned)
        if it.clean is not None:
            loss = loss + beta * ce_one(model, it.clean)
        rows.append(grad_of(model, pset, loss))
    rows += [grad_of(model, pset, ce_one(model, it.clean)) for it in retain]
    raw = torch.stack(rows)  # (N, D)
    assert G.shape == raw.shape == (len(forget) + len(retain), pset.dim) and G.dtype == torch.float32
    torch.testing.assert_close(norms, raw.norm(dim=1), **TOL)
    expected = slow_normalize(raw, pset.sizes) if normalize else raw
    torch.testing.assert_close(G, expected, **TOL)
    if normalize:  # the combined gradient is normalised, not its parts (the comparison can tell them apart)
        k = next(i for i, it in enumerate(forget) if it.clean is not None)
        g_p = grad_of(model, pset, ce_one(model, forget[k].poisoned))[None]  # (1, D)
        g_c = grad_of(model, pset, ce_one(model, forget[k].clean))[None]  # (1, D)
        parts = slow_normalize(-alpha * g_p, pset.sizes) + slow_normalize(beta * g_c, pset.sizes)  # (1, D)
        assert not torch.allclose(G[k], parts[0], atol=1e-3)


def test_objective_grads_pure_ascent_and_sft(tiny_tok):
    model = grad_model(tiny_tok)
    pset = select_params(model, "lora")
    forget, retain = make_unlearn_items(tiny_tok)
    pad = tiny_tok.pad_token_id
    poisoned = [it.poisoned for it in forget]
    clean_r = [it.clean for it in retain]
    g_poison = torch.stack([grad_of(model, pset, ce_one(model, e)) for e in poisoned])  # (N_f, D)
    g_retain = torch.stack([grad_of(model, pset, ce_one(model, e)) for e in clean_r])  # (N_r, D)

    # no clean answers: pure ascent −α·∇CE(poisoned)
    G, _ = objective_grads(model, pset, poisoned, [None] * len(forget), clean_r, pad, "aligned", 2.0, 0.5,
                               normalize=False, batch_size=3)  # fmt: skip
    torch.testing.assert_close(G, torch.cat([-2.0 * g_poison, g_retain]), **TOL)
    # β_d = 0 with clean answers: the same
    G0, _ = objective_grads(model, pset, poisoned, [it.clean for it in forget], clean_r, pad, "aligned", 2.0, 0.0,
                            normalize=False)  # fmt: skip
    torch.testing.assert_close(G0, G, **TOL)
    # sft: the per-sample gradient of the poisoned CE, whatever the clean answers and the loss coefficients
    S, s_norms = objective_grads(model, pset, poisoned, [it.clean for it in forget], clean_r, pad, "sft", 2.0, 0.5,
                                 normalize=True, batch_size=2)  # fmt: skip
    raw = torch.cat([g_poison, g_retain])
    torch.testing.assert_close(S, slow_normalize(raw, pset.sizes), **TOL)
    torch.testing.assert_close(s_norms, raw.norm(dim=1), **TOL)
    torch.testing.assert_close(raw_grads(model, pset, poisoned, pad, 5), g_poison, **TOL)
    assert raw_grads(model, pset, [], pad, 4).shape == (0, pset.dim)


def test_objective_grads_errors(tiny_tok):
    model = grad_model(tiny_tok)
    pset = select_params(model, "lora")
    forget, retain = make_unlearn_items(tiny_tok, 2, 2)
    pad = tiny_tok.pad_token_id
    p, r = [it.poisoned for it in forget], [it.clean for it in retain]
    with pytest.raises(RapidunError, match="sft, aligned"):
        objective_grads(model, pset, p, [None, None], r, pad, "npo")
    with pytest.raises(RapidunError, match="1 clean answers for 2"):
        objective_grads(model, pset, p, [None], r, pad, "aligned")


# ---------------------------------------------------------------- normalize_blocks, gram vs loops


def test_normalize_blocks_equals_loop():
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 1, 5, 2]
    G = torch.randn(6, sum(sizes), generator=gen, dtype=torch.float64)
    G[2, 4:9] = 0  # a zero block stays zero (no NaN)
    G[5] = 0  # a zero row
    out = normalize_blocks(G, sizes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, slow_normalize(G, sizes), atol=1e-6, rtol=1e-5)
    assert (out[2, 4:9] == 0).all() and (out[5] == 0).all()
    for blk in torch.split(out[[0, 1, 3, 4]], sizes, dim=1):
        torch.testing.assert_close(blk.norm(dim=1), torch.ones(4))
    with pytest.raises(RapidunError, match="sum to 10"):
        normalize_blocks(G, [3, 1, 5, 1])


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_gram_equals_double_loop(mode):
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(5, 7, generator=gen)
    G[3] = 0  # a zero row: cosine gives 0, not NaN
    M = gram(G, mode)
    assert M.dtype == torch.float64 and M.shape == (5, 5)
    slow = torch.zeros(5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            a, b = G[i].double(), G[j].double()
            d = float((a * b).sum())
            if mode == "cosine":
                den = float(a.norm() * b.norm())
                d = d / den if den > 0 else 0.0
            slow[i, j] = d
    torch.testing.assert_close(M, slow, atol=1e-12, rtol=1e-10)
    if mode == "cosine":
        torch.testing.assert_close(M.diagonal()[[0, 1, 2, 4]], torch.ones(4, dtype=torch.float64))
    with pytest.raises(RapidunError, match="'dot' or 'cosine'"):
        gram(G, "euclid")


# ---------------------------------------------------------------- coverage, effective sample size


def test_coverage_scores_hand_computed():
    FF = torch.tensor(
        [  # [train i, test j]
            [9.0, 1.0, 5.0, -2.0],
            [3.0, 9.0, 2.0, 4.0],
            [-1.0, 7.0, 9.0, 0.5],
            [2.0, -3.0, 6.0, 9.0],
        ]
    )
    # column j without the diagonal: j0 {3,−1,2} → 2; j1 {1,7,−3} → 1; j2 {5,2,6} → 5; j3 {−2,4,0.5} → 0.5
    S = coverage_scores(FF, top_k=50)
    assert S.dtype == torch.float64
    assert S.tolist() == pytest.approx([-2.0, -1.0, -5.0, -0.5])
    # top_k = 1: one kept value per column, the two others count as 0 → median 0 where the max is positive
    assert coverage_scores(FF, top_k=1).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    # top_k = 2: j0 {3,2,0} → 2; j1 {1,7,0} → 1; j2 {5,6,0} → 5; j3 {0,4,0.5} → 0.5
    assert coverage_scores(FF, top_k=2).tolist() == pytest.approx([-2.0, -1.0, -5.0, -0.5])
    # with self-pairs: j0 {9,3,−1,2} → 2.5; j1 {1,9,7,−3} → 4; j2 {5,2,9,6} → 5.5; j3 {−2,4,0.5,9} → 2.25
    S_self = coverage_scores(FF, top_k=50, include_self=True)
    assert S_self.tolist() == pytest.approx([-2.5, -4.0, -5.5, -2.25])

    cw = coverage_weights(FF, WeightingConfig(top_k=50))
    w = cw["w_forget"]
    assert w.shape == (4,) and float(w.mean()) == pytest.approx(1.0)
    torch.testing.assert_close(cw["S_forget"], S)
    # weights are monotone in S: the sample the others explain least (j3, S = −0.5) weighs most
    assert torch.argsort(w).tolist() == torch.argsort(S).tolist()
    assert int(w.argmax()) == 3 and int(w.argmin()) == 2
    assert {"z_forget", "center_forget", "scale_forget", "sat_low_forget", "sat_high_forget"} <= set(cw)


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(7)) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([2.5, 2.5, 2.5])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([1.0, 3.0])) == pytest.approx(16 / (2 * 10))
    assert effective_sample_size(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    w = [0.3, 1.2, 2.0, 0.5]
    assert effective_sample_size(torch.tensor(w)) == pytest.approx(sum(w) ** 2 / (len(w) * sum(x * x for x in w)))
    assert math.isnan(effective_sample_size(torch.zeros(0)))
    assert math.isnan(effective_sample_size(torch.zeros(2)))


# ---------------------------------------------------------------- draw_schedule with importance sampling


def within_sigma(counts: np.ndarray, p: np.ndarray, n: int, k: float = 5.0) -> bool:
    sigma = np.sqrt(p * (1 - p) / n)
    return bool(np.all(np.abs(counts / n - p) <= k * sigma + 1e-12))


def test_draw_schedule_importance_frequencies():
    cfg = UnlearnConfig(epochs=1, draws_per_epoch=20000, mix_forget=9.0, mix_retain=1.0, seed=5)
    raw_f = torch.tensor([1.0, 2.0, 0.0, 4.0, 3.0])  # unnormalised; a zero is never drawn
    raw_r = torch.tensor([0.1, 0.7, 0.2])
    s = draw_schedule(5, 3, cfg, True, raw_f, raw_r)
    assert len(s) == 20000
    f = np.array([i for g, i in s if g == "forget"])
    r = np.array([i for g, i in s if g == "retain"])
    assert 0.88 <= len(f) / len(s) <= 0.92
    assert (f != 2).all()
    pf, pr = (raw_f / raw_f.sum()).numpy(), (raw_r / raw_r.sum()).numpy()
    assert within_sigma(np.bincount(f, minlength=5), pf, len(f))
    assert within_sigma(np.bincount(r, minlength=3), pr, len(r))
    # the group flags come first in the stream: the same with or without probabilities
    flags = [g for g, _ in draw_schedule(5, 3, cfg, True)]
    assert flags == [g for g, _ in s]
    # and the frequencies are not uniform's (the test can tell them apart)
    assert not within_sigma(np.bincount(f, minlength=5), np.full(5, 0.2), len(f))


def test_draw_schedule_uniform_stream_unchanged():
    cfg = UnlearnConfig(epochs=2, draws_per_epoch=300, mix_forget=1.0, mix_retain=3.0, seed=11)
    total = 600
    gen = torch.Generator().manual_seed(11)
    is_forget = (torch.rand(total, generator=gen) < 0.25).tolist()
    fi = torch.randint(6, (total,), generator=gen).tolist()
    ri = torch.randint(4, (total,), generator=gen).tolist()
    expected = [("forget", f) if flag else ("retain", r) for flag, f, r in zip(is_forget, fi, ri, strict=True)]
    assert draw_schedule(6, 4, cfg, True) == expected
    assert draw_schedule(6, 4, cfg, True, None, None) == expected
    # without retain samples a p_retain is ignored (nothing to draw from)
    assert draw_schedule(6, 0, cfg, True, None, torch.tensor([1.0])) == draw_schedule(6, 0, cfg, True)


@pytest.mark.parametrize(
    ("pf", "pr"),
    [
        (torch.tensor([0.5, -0.1, 0.6]), None),
        (torch.tensor([0.5, 0.5]), None),
        (torch.zeros(3), None),
        (torch.tensor([1.0, float("nan"), 1.0]), None),
        (torch.tensor([1.0, float("inf"), 1.0]), None),
        (torch.ones(3, 1), None),
        (None, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])),
        (None, torch.tensor([1.0, -1.0, 1.0, 1.0])),
        (None, torch.zeros(4)),
    ],
)
def test_draw_schedule_bad_probabilities(pf, pr):
    cfg = UnlearnConfig(epochs=1, draws_per_epoch=10, seed=0)
    name, n = ("p_forget", 3) if pf is not None else ("p_retain", 4)
    with pytest.raises(RapidunError, match=rf"{name} must be {n} finite non-negative probabilities"):
        draw_schedule(3, 4, cfg, True, pf, pr)


# ---------------------------------------------------------------- unlearn_loop doses and gradient norms


def lora_model(tok, seed=0):
    return attach_lora(make_model(len(tok), seed=seed, init_range=0.2), 4, 8, 0.0, TARGETS, seed=0)


def loop_cfg(**kw) -> UnlearnConfig:
    base = {"epochs": 1, "draws_per_epoch": 10, "batch_size": 3, "lr": 1e-2, "autocast": "off", "seed": 2}
    return UnlearnConfig(**{**base, **kw})


@pytest.mark.parametrize("importance", [False, True])
def test_unlearn_loop_dose_and_grad_norms(tiny_tok, importance):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    gen = torch.Generator().manual_seed(3)
    w_f = 0.2 + 2 * torch.rand(len(forget), generator=gen, dtype=torch.float64)
    w_r = 0.2 + 2 * torch.rand(len(retain), generator=gen, dtype=torch.float64)
    p_f = p_r = None
    if importance:
        p_f, p_r = w_f / w_f.sum(), w_r / w_r.sum()
    cfg = loop_cfg(mix_forget=1.0, mix_retain=1.0, grad_clip=1e-6)  # a tiny clip: the recorded norm is pre-clip
    schedule = draw_schedule(len(forget), len(retain), cfg, True, p_f, p_r)
    stats = unlearn_loop(lora_model(tiny_tok), forget, retain, cfg, "relabel_ascent", True, w_f, w_r, pad, CPU,
                         p_forget=p_f, p_retain=p_r)  # fmt: skip
    wf32, wr32 = w_f.float(), w_r.float()  # the loop holds float32 weights
    dose_f = sum(float(wf32[i]) for g, i in schedule if g == "forget")
    dose_r = sum(float(wr32[i]) for g, i in schedule if g == "retain")
    assert stats["forget_draws"] == sum(g == "forget" for g, _ in schedule) > 0
    assert stats["retain_draws"] > 0
    assert stats["forget_dose"] == pytest.approx(dose_f, rel=1e-9)
    assert stats["retain_dose"] == pytest.approx(dose_r, rel=1e-9)
    assert stats["steps"] == math.ceil(10 / 3) == len(stats["grad_norms"]) == len(stats["loss_curve"])
    assert all(math.isfinite(v) and v > 1e-4 for v in stats["grad_norms"])


def test_unlearn_loop_dose_follows_refreshed_weights(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = loop_cfg(draws_per_epoch=10, batch_size=2, seed=4)
    schedule = draw_schedule(len(forget), 0, cfg, False)
    w_f = torch.ones(len(forget))
    stats = unlearn_loop(lora_model(tiny_tok), forget, retain, cfg, "ascent", False, w_f, torch.ones(len(retain)),
                         pad, CPU, refresh=lambda m: torch.full((len(forget),), 2.0), refresh_every=2)  # fmt: skip
    # steps 0–1 (4 draws) at weight 1, steps 2–4 (6 draws) at weight 2 after the first refresh
    assert len(schedule) == 10 and stats["refreshes"] == 2
    assert stats["forget_dose"] == pytest.approx(4 * 1.0 + 6 * 2.0)
    assert stats["retain_dose"] == 0.0 and stats["retain_draws"] == 0


def test_unlearn_loop_dose_counts_only_the_steps_taken(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = loop_cfg(draws_per_epoch=10, batch_size=2, seed=4)
    nan = torch.full((len(forget),), math.nan)
    with pytest.raises(NonFiniteLoss, match="at step 2") as ei:  # NaN weights from the first refresh on
        unlearn_loop(lora_model(tiny_tok), forget, retain, cfg, "ascent", False, torch.ones(len(forget)),
                     torch.ones(len(retain)), pad, CPU, refresh=lambda m: nan, refresh_every=2)  # fmt: skip
    st = ei.value.stats
    # steps 0–1 (4 draws at weight 1) were taken; step 2 was refused before the optimiser step: not in the dose
    assert st["steps"] == 2 and len(st["loss_curve"]) == len(st["grad_norms"]) == 2
    assert st["forget_dose"] == pytest.approx(4.0) and st["retain_dose"] == 0.0


# ---------------------------------------------------------------- diagnostics


def test_cell_diagnostics_hand_made():
    fams = ["a", "b", "a", None]
    records = [
        Record(id=f"f{k}", instruction="x", response="y", meta={"trigger_family": f} if f else {})
        for k, f in enumerate(fams)
    ]
    lens = [1, 4, 2, 3]
    items = [SimpleNamespace(poisoned=SimpleNamespace(labels=[-100, -100] + [7] * n)) for n in lens]
    w_f = torch.tensor([1.0, 3.0, 2.0, 2.0])
    w_r = torch.tensor([1.0, 1.0, 4.0])
    train = {"grad_norms": [0.5, 2.0, 1.0, 3.0], "forget_dose": 7.5, "retain_dose": 2.0,
             "forget_draws": 5, "retain_draws": 3}  # fmt: skip
    grad_norm = [0.1, 0.4, 0.2, 0.3, 5.0, 4.0, 1.0]  # forget ranks = lens ranks; retain reversed
    d = cell_diagnostics(records, items, w_f, w_r, train, 1.0, grad_norm, {"offdiag_pearson": 0.9})
    assert d["ess_forget"] == pytest.approx(64 / (4 * 18))
    assert d["ess_retain"] == pytest.approx(36 / (3 * 18))
    assert d["family_mean_weight"] == {"a": 1.5, "b": 3.0, "none": 2.0}
    # Spearman of w_f (ranks 1, 4, 2.5, 2.5) with the answer lengths (ranks 1, 4, 2, 3)
    rho = float(np.corrcoef([1, 4, 2.5, 2.5], [1, 4, 2, 3])[0, 1])
    assert d["corr_weight_answer_len"] == pytest.approx(rho)
    assert d["corr_weight_grad_norm_forget"] == pytest.approx(rho)
    rho_r = float(np.corrcoef([1.5, 1.5, 3], [3, 2, 1])[0, 1])
    assert d["corr_weight_grad_norm_retain"] == pytest.approx(rho_r)
    assert d["views_offdiag_pearson"] == 0.9
    assert d["grad_norm_mean"] == pytest.approx(1.625) and d["grad_norm_max"] == 3.0
    assert d["clipped_frac"] == pytest.approx(0.5)  # 2.0 and 3.0 exceed the clip; 1.0 does not
    assert d["forget_dose"] == 7.5 and d["retain_dose"] == 2.0
    assert d["forget_dose_uniform"] == 5 and d["retain_dose_uniform"] == 3

    off = cell_diagnostics(records, items, w_f, w_r, train, 0.0)  # clip off; no grad norms, no view diag
    assert off["clipped_frac"] == 0.0
    assert off["corr_weight_grad_norm_forget"] is None and off["corr_weight_grad_norm_retain"] is None
    assert not any(k.startswith("views_") for k in off)
    bare = cell_diagnostics(records, items, w_f, torch.zeros(0), None, 1.0, grad_norm[:3])  # wrong length: ignored
    assert bare["ess_retain"] is None and bare["corr_weight_grad_norm_forget"] is None
    assert "forget_dose" not in bare and "clipped_frac" not in bare


def test_seed_stability():
    a = [0.1, 0.3, 0.9, 1.2, 2.0]  # increasing: reversed, its ranks are reversed
    assert seed_stability([a, a]) == pytest.approx(1.0)
    assert seed_stability([a, a[::-1]]) == pytest.approx(-1.0)
    assert seed_stability([a, a, a[::-1]]) == pytest.approx((1 - 1 - 1) / 3)
    assert seed_stability([a]) is None and seed_stability([]) is None
    assert seed_stability([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]) is None  # constant weights: undefined


# ---------------------------------------------------------------- registry and method_weights


def test_registry_new_methods():
    expect = {
        "rapidun_sampled": ("sketch", "weighted", False, "rapidun"),
        "rapidun_aligned": ("aligned", "uniform", False, "rapidun"),
        "rapidun_stable": ("stable", "uniform", False, "rapidun"),
        "coverage": ("sketch", "uniform", False, "coverage"),
        "rapidun_dynamic": ("sketch", "uniform", True, "rapidun"),
    }
    for name, (views, sampling, dynamic, weights) in expect.items():
        m = get_method(name)
        assert (m.views, m.sampling, m.dynamic, m.weights) == (views, sampling, dynamic, weights), name
        assert m.kind == "loop" and m.forget_loss == "relabel_ascent" and m.retain and m.needs_influence
    assert tuple(REGISTRY) == METHOD_NAMES
    assert {n for n, m in REGISTRY.items() if m.needs_influence} == {"rapidun", "random", *expect}
    assert all(m.views in ("", "sketch", "stable", "aligned") for m in REGISTRY.values())
    assert all(m.sampling in ("uniform", "weighted") for m in REGISTRY.values())
    assert [n for n, m in REGISTRY.items() if m.dynamic] == ["rapidun_dynamic"]
    with pytest.raises(RapidunError, match="unknown unlearning method 'rapidun_fast'") as ei:
        get_method("rapidun_fast")
    assert all(n in str(ei.value) for n in METHOD_NAMES)


def test_method_weights_coverage_keeps_retain_at_one():
    rw = {"w_forget": torch.tensor([0.5, 2.0, 0.5]), "w_retain": torch.tensor([3.0, 0.2])}
    wf, wr = method_weights(get_method("coverage"), 3, 2, rw, 0)
    assert wf.tolist() == [0.5, 2.0, 0.5] and wr.tolist() == [1.0, 1.0] and wf.dtype == torch.float64
    wf, wr = method_weights(get_method("rapidun_sampled"), 3, 2, rw, 0)
    assert wf.tolist() == [0.5, 2.0, 0.5] and wr.tolist() == pytest.approx([3.0, 0.2])
    with pytest.raises(RapidunError, match="needs the RapidUn weights"):
        method_weights(get_method("coverage"), 3, 2, None, 0)
