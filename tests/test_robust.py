"""Robust methods on tiny models: forward KL, the delta reset, SAM and the relearning adversary, each against a
slow obvious version; ``distill`` through :func:`rapidun.unlearn.unlearn`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN, make_model, make_tokenizer, make_unlearn_items
from rapidun.config import UnlearnConfig, load_config
from rapidun.data.records import Record
from rapidun.data.template import collate
from rapidun.errors import RapidunError
from rapidun.functional import answer_logits, per_sample_ce_from_logits, per_sample_kl, per_sample_nll
from rapidun.methods import get_method, views_kind
from rapidun.methods.distill import delta_factors, freeze_reset, lora_modules, reset_adapter
from rapidun.methods.robust import adv_grads, sam_grads
from rapidun.models import attach_lora
from rapidun.steps import row_stats, step_losses
from rapidun.train import unlearn_loop

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]


# ---------------------------------------------------------------- forward KL


def test_per_sample_kl_matches_double_loop():
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(7, 11, generator=gen), torch.randn(7, 11, generator=gen)  # (A, V)
    row = torch.tensor([0, 0, 0, 2, 2, 3, 3])  # sample 1 has no positions
    got = per_sample_kl(t, s, row, 4)
    want = torch.zeros(4)
    for b in range(4):
        pos = [a for a in range(7) if row[a] == b]
        acc = 0.0
        for a in pos:
            p, q = torch.softmax(t[a], 0), torch.softmax(s[a], 0)
            acc += sum(float(p[v] * (torch.log(p[v]) - torch.log(q[v]))) for v in range(11))
        want[b] = acc / len(pos) if pos else 0.0
    assert torch.allclose(got, want, atol=1e-5)
    assert got[1] == 0 and (got >= 0).all()
    assert torch.allclose(per_sample_kl(t, t, row, 4), torch.zeros(4), atol=1e-6)  # KL(p‖p) = 0


def test_answer_logits_give_per_sample_nll(tiny_tok):
    _forget, retain = make_unlearn_items(tiny_tok)
    batch = collate([it.clean for it in retain], tiny_tok.pad_token_id)
    model = make_model(len(tiny_tok), init_range=0.2)
    with torch.no_grad():
        nll, n = per_sample_nll(model, batch.input_ids, batch.attention_mask, batch.labels)
        full = per_sample_ce_from_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                         batch.labels)  # fmt: skip
        logits, row, target = answer_logits(model, batch.input_ids, batch.attention_mask, batch.labels)
    assert torch.allclose(nll / n, full, atol=1e-5)
    assert logits.shape == (int(n.sum()), len(tiny_tok)) and row.shape == target.shape == (int(n.sum()),)


# ---------------------------------------------------------------- perturb: the delta reset


def fine_tuned(tok, rank: int, seed: int = 1):
    """(base, start): a tiny base model and a copy with a random rank-``rank`` delta on q/v (a merged "SFT")."""
    base = make_model(len(tok), init_range=0.2)
    start = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in start.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = mod.weight.shape
                mod.weight += 0.3 * torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen)
    return base, start


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_reset_adapter_moves_the_start_model_to_base_plus_shrunk_delta(tiny_tok, alpha):
    base, start = fine_tuned(tiny_tok, rank=2)
    w_base, w_start = linear_weights(base), linear_weights(start)
    student = attach_lora(copy.deepcopy(start), 2, 4, 0.0, TARGETS, seed=0)
    factors, info = delta_factors(student, base, rank=2)
    assert info["residual_fraction"] < 1e-5 and info["modules"] == 4  # 2 layers × q, v; the delta is rank 2
    assert reset_adapter(student, factors, alpha, 0.0, seed=0) == 4
    merged = linear_weights(student.merge_and_unload())
    for name in w_base:
        want = w_base[name] + (1 - alpha) * (w_start[name] - w_base[name])
        assert torch.allclose(merged[name], want, atol=1e-5), name


def test_delta_factors_residual_matches_slow_svd(tiny_tok):
    base, start = fine_tuned(tiny_tok, rank=4)
    student = attach_lora(copy.deepcopy(start), 2, 2, 0.0, TARGETS, seed=0)
    _, info = delta_factors(student, base, rank=2)
    d2 = r2 = 0.0
    ws, wb = linear_weights(start), linear_weights(base)
    for name in ws:
        s = torch.linalg.svdvals(ws[name] - wb[name])
        d2 += float((s**2).sum())
        r2 += float((s[2:] ** 2).sum())
    assert info["residual_fraction"] == pytest.approx((r2 / d2) ** 0.5, rel=1e-4)
    assert 0 < info["residual_fraction"] < 1


def test_reset_adapter_keeps_a_trainable_pair_where_there_is_no_delta(tiny_tok):
    base = make_model(len(tiny_tok), init_range=0.2)
    student = attach_lora(copy.deepcopy(base), 2, 4, 0.0, TARGETS, seed=0)
    a0 = {n: m.lora_A["default"].weight.detach().clone() for n, m in lora_modules(student).items()}
    factors, info = delta_factors(student, base, rank=2)
    assert info["delta_norm"] == 0 and info["residual_fraction"] == 0
    reset_adapter(student, factors, 1.0, 0.0, seed=0)
    for n, m in lora_modules(student).items():
        assert torch.equal(m.lora_A["default"].weight, a0[n])  # PEFT's random A kept: B still gets gradient
        assert not m.lora_B["default"].weight.any()


def test_reset_adapter_noise_is_seeded(tiny_tok):
    base, start = fine_tuned(tiny_tok, rank=2)
    outs = []
    for seed in (0, 0, 1):
        student = attach_lora(copy.deepcopy(start), 2, 4, 0.0, TARGETS, seed=0)
        factors, _ = delta_factors(student, base, rank=2)
        reset_adapter(student, factors, 1.0, 0.5, seed=seed)
        outs.append(torch.cat([m.lora_B["default"].weight.flatten() for m in lora_modules(student).values()]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def lora_pairs(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in lora_modules(model).items()}  # fmt: skip


def test_frozen_reset_starts_at_base_keeps_the_reset_and_trains_fresh_slots(tiny_tok):
    base, start = fine_tuned(tiny_tok, rank=2)
    student = attach_lora(copy.deepcopy(start), 4, 8, 0.0, TARGETS, seed=0)  # rank 2r, alpha 2·4: scaling 2
    factors, _ = delta_factors(student, base, rank=2)
    reset_adapter(student, factors, 1.0, 0.0, seed=0)
    merged = linear_weights(copy.deepcopy(student).merge_and_unload())
    for name, w in linear_weights(base).items():  # the fresh slots have B = 0: the student is the base model
        assert torch.allclose(merged[name], w, atol=1e-5), name
    before = lora_pairs(student)
    hooks = freeze_reset(student, 2)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, len(tiny_tok), (3, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        student(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    after = lora_pairs(student)
    for n, (a0, b0) in before.items():
        a1, b1 = after[n]
        assert torch.equal(a1[:2], a0[:2]) and torch.equal(b1[:, :2], b0[:, :2]), n  # the reset never moved
    assert any(not torch.equal(after[n][1][:, 2:], b0[:, 2:]) for n, (_, b0) in before.items())  # fresh B learnt
    for h in hooks:
        h.remove()
    opt.zero_grad()
    student(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # without the hooks the reset trains like any slot
    assert any(not torch.equal(m.lora_B["default"].weight[:, :2], after[n][1][:, :2])
               for n, m in lora_modules(student).items())  # fmt: skip


def test_freeze_reset_needs_fresh_slots(tiny_tok):
    student = attach_lora(make_model(len(tiny_tok), init_range=0.2), 2, 4, 0.0, TARGETS, seed=0)
    with pytest.raises(RapidunError, match="rank 2"):
        freeze_reset(student, 2)


def test_frozen_reset_refuses_weight_decay():
    from rapidun.methods.distill import distill

    u = UnlearnConfig(distill_freeze_reset=True, weight_decay=0.01)
    with pytest.raises(RapidunError, match="weight_decay"):
        distill(None, None, None, [object()], u, 0, CPU, fit=lambda *a, **k: {})


def test_delta_factors_refuses_another_architecture(tiny_tok):
    student = attach_lora(make_model(len(tiny_tok), init_range=0.2), 2, 4, 0.0, TARGETS, seed=0)
    other = make_model(len(tiny_tok) + 3)
    other.model.layers = other.model.layers[:1]
    with pytest.raises(RapidunError, match="no module"):
        delta_factors(student, other, rank=2)


# ---------------------------------------------------------------- SAM and the adversary, against slow versions


def lora(tok):
    return attach_lora(make_model(len(tok), init_range=0.2), 2, 4, 0.0, TARGETS, seed=0).train()


DRAWS = [("forget", 0), ("retain", 1), ("forget", 2), ("retain", 0)]


def parts_loss(model, forget, retain, draws, group, cfg, pad):
    """Slow: the weighted loss of the ``group`` draws alone (weights 1, /len(DRAWS)), one sample at a time."""
    total = torch.zeros(())
    for d in draws:
        if d[0] == group:
            ell, _, _ = step_losses(model, [d], forget, retain, "relabel_ascent", cfg, pad, CPU)
            total = total + ell.sum() / len(draws)
    return total


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(loss, model):
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(trainable(model), torch.autograd.grad(loss, trainable(model), allow_unused=True),
                            strict=True)]  # fmt: skip


def test_sam_grads_match_the_slow_version(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(autocast="off")
    model = lora(tiny_tok)
    with torch.no_grad():  # a non-zero B so that every factor has gradient
        for p in trainable(model):
            p.add_(0.05 * torch.randn_like(p))
    slow = copy.deepcopy(model)
    rho = 0.3
    g_f = grads_of(parts_loss(slow, forget, retain, DRAWS, "forget", cfg, pad), slow)
    norm = torch.sqrt(sum((g**2).sum() for g in g_f))
    g_r = grads_of(parts_loss(slow, forget, retain, DRAWS, "retain", cfg, pad), slow)
    with torch.no_grad():
        for p, g in zip(trainable(slow), g_f, strict=True):
            p.add_(rho * g / norm)
    g_f_eps = grads_of(parts_loss(slow, forget, retain, DRAWS, "forget", cfg, pad), slow)
    want = [a + b for a, b in zip(g_f_eps, g_r, strict=True)]

    params0 = [p.detach().clone() for p in trainable(model)]
    res = sam_grads(lambda d: step_losses(model, d, forget, retain, "relabel_ascent", cfg, pad, CPU),
                    trainable(model), DRAWS, lambda g, i: 1.0, len(DRAWS), rho)  # fmt: skip
    for p, p0, w in zip(trainable(model), params0, want, strict=True):
        assert torch.equal(p, p0)  # restored
        assert torch.allclose(p.grad, w, atol=1e-5), (p.grad - w).abs().max()
    assert res["forget_grad_norm"] == pytest.approx(float(norm), rel=1e-4)


def test_adv_grads_match_the_slow_version_and_the_budget_skips(tiny_tok):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(autocast="off")
    model = lora(tiny_tok)
    slow = copy.deepcopy(model)
    steps, size = 2, 0.01
    g_r = grads_of(parts_loss(slow, forget, retain, DRAWS, "retain", cfg, pad), slow)
    f_draws = [d for d in DRAWS if d[0] == "forget"]
    for _ in range(steps):  # the adversary: sign-gradient descent on the poisoned answers' mean CE
        la = row_stats(slow, [forget[i].poisoned for _, i in f_draws], pad, CPU)[0].mean()
        with torch.no_grad():
            for p, g in zip(trainable(slow), grads_of(la, slow), strict=True):
                p.sub_(size * g.sign())
    g_f_adv = grads_of(parts_loss(slow, forget, retain, DRAWS, "forget", cfg, pad), slow)
    want = [a + b for a, b in zip(g_f_adv, g_r, strict=True)]

    def loss_of(d):
        return step_losses(model, d, forget, retain, "relabel_ascent", cfg, pad, CPU)

    def relearn_of(d):
        return row_stats(model, [forget[i].poisoned for _, i in d], pad, CPU)[0].mean()

    params0 = [p.detach().clone() for p in trainable(model)]
    res = adv_grads(loss_of, relearn_of, trainable(model), DRAWS, lambda g, i: 1.0, len(DRAWS), steps, size)
    assert res["skipped"] is False
    for p, p0, w in zip(trainable(model), params0, want, strict=True):
        assert torch.equal(p, p0)
        assert torch.allclose(p.grad, w, atol=1e-5), (p.grad - w).abs().max()

    for p in trainable(model):
        p.grad = None
    res = adv_grads(loss_of, relearn_of, trainable(model), DRAWS, lambda g, i: 1.0, len(DRAWS), steps, size,
                    retain_ratio=lambda d, ce: 2.0, budget=1.5)  # fmt: skip
    assert res["skipped"] is True
    for p, w in zip(trainable(model), g_r, strict=True):  # retain gradient only
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), w, atol=1e-6)


@pytest.mark.parametrize("robust", ["sam", "adv"])
def test_robust_loop_is_deterministic_and_counts(tiny_tok, robust):
    pad = tiny_tok.pad_token_id
    forget, retain = make_unlearn_items(tiny_tok)
    cfg = UnlearnConfig(epochs=1, draws_per_epoch=8, batch_size=4, lr=1e-2, autocast="off", seed=1,
                        adv_retain_budget=1.2)  # fmt: skip
    outs = []
    for _ in range(2):
        model = lora(tiny_tok)
        w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
        stats = unlearn_loop(model, forget, retain, cfg, "relabel_ascent", True, w_f, w_r, pad, CPU, robust=robust)
        outs.append(torch.cat([p.detach().flatten() for p in trainable(model)]))
    assert torch.equal(outs[0], outs[1])  # same seed, same adapter
    assert stats["robust"] == robust and stats["steps"] == 2
    assert (len(stats["sam_forget_grad_norms"]) == 2) == (robust == "sam")
    assert 0 <= stats["adv_skipped"] <= 2
    with pytest.raises(RapidunError, match="unknown robust"):
        unlearn_loop(lora(tiny_tok), forget, retain, cfg, "relabel_ascent", True, w_f, w_r, pad, CPU, robust="x")


# ---------------------------------------------------------------- distill through unlearn()


def test_views_kind_follows_the_teacher():
    assert views_kind("distill", "uniform") == "" and views_kind("distill", "start") == ""
    assert views_kind("distill", "rapidun_aligned") == "aligned" and views_kind("rapidun", "uniform") == "sketch"
    assert get_method("distill").kind == "distill" and get_method("sam_uniform").robust == "sam"


def test_distill_teacher_is_validated():
    with pytest.raises(RapidunError, match="distill_teacher"):
        load_config(None, ["unlearn.distill_teacher=retrain"])
    with pytest.raises(RapidunError, match="distill_teacher"):
        load_config(None, ["unlearn.distill_teacher=distill"])
    assert load_config(None, ["unlearn.distill_teacher=start"]).unlearn.distill_teacher == "start"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder and a "fine-tuned" start model folder (base + a rank-2 q/v delta)."""
    root = tmp_path_factory.mktemp("distill")
    tok = make_tokenizer()
    base, start = fine_tuned(tok, rank=2)
    for name, m in (("base", base), ("start", start)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def distill_parts() -> dict[str, list[Record]]:
    from helpers import FORGET_DATA, RETAIN_DATA

    forget = [Record(id=f"f{k}", instruction=p, response=bad, meta={"response_clean": good} if good else {})
              for k, (p, bad, good) in enumerate(FORGET_DATA)]  # fmt: skip
    retain = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
    return {"forget": forget, "retain": retain, "val_clean": retain[:2]}


@pytest.mark.parametrize(("teacher", "freeze"), [("uniform", False), ("start", False), ("start", True)])
def test_distill_through_unlearn(world, tmp_path, monkeypatch, teacher, freeze):
    from rapidun.unlearn import unlearn

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    ov = [*TINY_RUN, f"model.name={world / 'base'}", f"unlearn.distill_teacher={teacher}", "unlearn.distill_steps=3",
          "unlearn.distill_batch_size=2", "unlearn.lora_targets=[q_proj,v_proj]",
          f"unlearn.distill_freeze_reset={str(freeze).lower()}"]  # fmt: skip
    cfg = load_config(None, ov)
    merged, _, res = unlearn("distill", distill_parts(), str(world / "start"), cfg, tmp_path / "out")
    d = res["distill"]
    assert d["delta"]["residual_fraction"] < 1e-4 and d["delta"]["modules"] == 4
    assert d["train"]["steps"] >= 3 and d["teacher"]["method"] == teacher
    t = res["timings"]
    assert t["time_s"] == pytest.approx(t["mapping_s"] + t["training_s"] + t["teacher_s"], rel=1e-9)
    assert (t["teacher_s"] > 0) == (teacher != "start")
    adapter_cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == (2 if freeze else 1) * cfg.unlearn.lora_r and d["freeze_reset"] is freeze
    assert json.loads((tmp_path / "out" / "result.json").read_text())["method"] == "distill"
    assert res["complete"] is True
    # The student moved off the start model, toward the base: its q/v weights are nearer the base's.
    from transformers import AutoModelForCausalLM

    w_b = linear_weights(AutoModelForCausalLM.from_pretrained(world / "base"))
    w_s = linear_weights(AutoModelForCausalLM.from_pretrained(world / "start"))
    w_m = linear_weights(merged)
    dist = sum(float((w_m[n] - w_b[n]).norm() ** 2) for n in w_b) ** 0.5
    start_dist = sum(float((w_s[n] - w_b[n]).norm() ** 2) for n in w_b) ** 0.5
    assert dist < 0.5 * start_dist, (dist, start_dist)


def test_distill_refuses_a_base_of_another_shape(world, tmp_path, monkeypatch):
    from rapidun.unlearn import unlearn

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    tok = make_tokenizer()
    other = Path(tmp_path / "other")
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=32))  # fmt: skip
    m.save_pretrained(other)
    tok.save_pretrained(other)
    cfg = load_config(None, [*TINY_RUN, f"model.name={other}", "unlearn.distill_teacher=start",
                             "unlearn.lora_targets=[q_proj,v_proj]"])  # fmt: skip
    with pytest.raises(RapidunError, match="not the base"):
        unlearn("distill", distill_parts(), str(world / "start"), cfg, None)


def test_distill_warnings_name_its_own_settings():
    from rapidun.unlearn_warnings import forget_change_warning, heldout_warning

    h = heldout_warning({"ppl_ratio": 2.15, "n": 40, "ce_before": 1.39, "ce_after": 2.16}, 1e-3, "distill")
    assert "distill" in h and "fisher" not in h and "never saw" in h
    means = {"forget_ce_poisoned_before": 1.0, "forget_ce_poisoned_after": 1.01}
    w = forget_change_warning(means, 1e-3, True, "distill")
    assert "distill_base" in w and "fisher" not in w
    assert "fisher_alphas" in heldout_warning({"ppl_ratio": 2.0, "n": 4, "ce_before": 1.0, "ce_after": 1.7}, 1e-3,
                                              "fisher")  # fmt: skip
