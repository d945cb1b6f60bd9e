"""The method variants end to end: exact/aligned/stable views and ``unlearn()`` with each variant on a tiny model
saved in a temporary folder (no downloads). The pieces against their slow versions: test_variants.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from helpers import FORGET_DATA, RETAIN_DATA, TINY_RUN, make_model, make_tokenizer
from rapidun.config import load_config
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.unlearn import unlearn
from rapidun.views import ADAPTER_STRIDE, exact_views, method_views, split_views
from rapidun.weighting import coverage_weights, effective_sample_size, rapidun_weights

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# ---------------------------------------------------------------- views and unlearn() on a tiny saved model

OVERRIDES = [*TINY_RUN, "influence.seed=7", "unlearn.dynamic_every=1"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved model folder (the "poisoned" model), the scenario parts and a config; cache in tmp."""
    root = tmp_path_factory.mktemp("variants")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        tok = make_tokenizer()
        model_dir = root / "poisoned"
        make_model(len(tok), init_range=0.2).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        forget = [
            Record(id=f"f{k}", instruction=p, response=bad, meta={"response_clean": good} if good else {})
            for k, (p, bad, good) in enumerate(FORGET_DATA)
        ]
        retain = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
        cfg = load_config(None, [*OVERRIDES, f"model.name={model_dir}"])
        yield SimpleNamespace(root=root, model_dir=str(model_dir), forget=forget, retain=retain, cfg=cfg)


def with_unlearn(cfg, **kw):
    return dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, **kw))


def with_influence(cfg, **kw):
    return dataclasses.replace(cfg, influence=dataclasses.replace(cfg.influence, **kw))


def test_aligned_views_with_zero_beta_equal_sft_views(saved, tmp_path):
    s = saved
    nf = len(s.forget)
    cfg = with_unlearn(s.cfg, descent_beta=0.0, ascent_alpha=1.5)
    seed = cfg.influence.seed
    sft = exact_views(s.model_dir, s.forget, s.retain, cfg, "sft", seed, tmp_path / "a")
    assert sft["cached"] is False and sft["M"].dtype == torch.float64 and sft["M"].shape == (nf + 5, nf + 5)
    ref = split_views(sft["M"], nf)
    assert ref["FR"].abs().max() > 0 and ref["FF"].abs().max() > 0
    al = exact_views(s.model_dir, s.forget, s.retain, cfg, "aligned", seed, tmp_path / "a")
    raw = split_views(al["M"], nf)  # raw Gram matrix: FR/RF of the ascent gradients are −SFT's
    torch.testing.assert_close(raw["FR"], -ref["FR"])
    torch.testing.assert_close(raw["FF"], ref["FF"])
    torch.testing.assert_close(al["grad_norm"][:nf], 1.5 * sft["grad_norm"][:nf])
    torch.testing.assert_close(al["grad_norm"][nf:], sft["grad_norm"][nf:])

    v = method_views("aligned", s.model_dir, s.forget, s.retain, cfg, tmp_path / "m")
    for k in ("FF", "FR", "RF", "RR"):
        torch.testing.assert_close(v[k], ref[k], msg=k)
    assert v["forget_ids"] == [r.id for r in s.forget] and v["retain_ids"] == [r.id for r in s.retain]
    assert v["stats"]["exact"] is True and v["stats"]["kind"] == "aligned" and v["stats"]["total_s"] > 0
    assert len(v["grad_norm"]) == nf + 5 and v["cached"] is False
    again = method_views("aligned", s.model_dir, s.forget, s.retain, cfg, tmp_path / "m")
    assert again["cached"] is True and torch.equal(again["FR"], v["FR"])

    # β_d ≠ 0 changes the forget rows that have a clean answer, so the equality above is not vacuous
    v_beta = method_views("aligned", s.model_dir, s.forget, s.retain, with_unlearn(cfg, descent_beta=0.5), None)
    assert not torch.allclose(v_beta["FF"], ref["FF"], atol=1e-4)
    torch.testing.assert_close(v_beta["RR"], ref["RR"])


def test_stable_and_sketch_views(saved, tmp_path):
    s = saved
    nf = len(s.forget)
    cfg = with_influence(s.cfg, stable_adapters=2)
    seed = cfg.influence.seed
    v = method_views("stable", s.model_dir, s.forget, s.retain, cfg, tmp_path)
    runs = [exact_views(s.model_dir, s.forget, s.retain, cfg, "sft", seed + ADAPTER_STRIDE * k, None) for k in (0, 1)]
    assert not torch.allclose(runs[0]["M"], runs[1]["M"])  # two different adapters
    mean = split_views((runs[0]["M"] + runs[1]["M"]) / 2, nf)
    for k in ("FF", "FR", "RF", "RR"):
        torch.testing.assert_close(v[k], mean[k], msg=k)
    assert v["diag"]["adapters"] == 2 and "adapter_S_forget_spearman" in v["diag"]
    assert v["stats"]["kind"] == "stable"

    sk = method_views("sketch", s.model_dir, s.forget, s.retain, s.cfg, tmp_path / "sk")
    assert set(sk["diag"]) >= {"offdiag_pearson", "offdiag_rel_rmse", "S_forget_spearman", "exact_s"}
    assert len(sk["grad_norm"]) == nf + 5
    assert sk["diag"]["offdiag_pearson"] > 0.5  # the sketch (K=256) estimates the exact SFT inner products

    with pytest.raises(RapidunError, match="sketch, stable, aligned"):
        method_views("exact", s.model_dir, s.forget, s.retain, s.cfg, None)


@pytest.fixture(scope="module")
def hand_views(saved):
    """A hand-made views dict for the saved model's packs (no influence pass)."""
    gen = torch.Generator().manual_seed(0)
    nf, nr = len(saved.forget), len(saved.retain)
    M = torch.randn(nf + nr, nf + nr, generator=gen)
    return {
        **split_views(M, nf),
        "forget_ids": [r.id for r in saved.forget],
        "retain_ids": [r.id for r in saved.retain],
        "stats": {"total_s": 0.0},
        "grad_norm": (1 + torch.rand(nf + nr, generator=gen)).tolist(),
    }


DIAG_KEYS = {"ess_forget", "ess_retain", "family_mean_weight", "forget_dose", "retain_dose", "clipped_frac",
             "grad_norm_mean", "forget_dose_uniform", "corr_weight_grad_norm_forget"}  # fmt: skip


def test_unlearn_rapidun_sampled(saved, hand_views):
    s = saved
    parts = {"forget": s.forget, "retain": s.retain}
    _, _, res = unlearn("rapidun_sampled", parts, s.model_dir, s.cfg, None, hand_views)
    assert res["complete"] is True and res["train"]["steps"] == 4
    w = res["weights"]
    assert w["forget"]["min"] == w["forget"]["max"] == 1.0 and w["retain"]["min"] == w["retain"]["max"] == 1.0
    assert w["sampling"]["forget"]["mean"] == pytest.approx(1.0) and w["sampling"]["retain"]["mean"] == pytest.approx(1)
    rw = rapidun_weights(hand_views["FF"], hand_views["FR"], hand_views["RF"], hand_views["RR"], s.cfg.weighting)
    assert res["weight_vectors"]["forget"] == pytest.approx(rw["w_forget"].tolist())
    assert res["weight_vectors"]["retain"] == pytest.approx(rw["w_retain"].tolist())
    assert w["sampling"]["forget"]["max"] == pytest.approx(float(rw["w_forget"].max()))
    d = res["diagnostics"]
    assert DIAG_KEYS <= set(d)
    assert d["forget_dose"] == pytest.approx(res["train"]["forget_draws"])  # loss weights 1: dose = draws
    assert d["ess_forget"] == pytest.approx(effective_sample_size(rw["w_forget"]))


def test_unlearn_coverage(saved, hand_views):
    s = saved
    parts = {"forget": s.forget, "retain": s.retain}
    _, _, res = unlearn("coverage", parts, s.model_dir, s.cfg, None, hand_views)
    cw = coverage_weights(hand_views["FF"], s.cfg.weighting)["w_forget"]
    assert res["weight_vectors"]["forget"] == pytest.approx(cw.tolist())
    assert res["weight_vectors"]["retain"] == [1.0] * len(s.retain)
    assert res["weights"]["retain"]["min"] == res["weights"]["retain"]["max"] == 1.0
    assert res["weights"]["forget"]["mean"] == pytest.approx(1.0)
    assert "sampling" not in res["weights"]
    assert DIAG_KEYS <= set(res["diagnostics"]) and res["diagnostics"]["ess_retain"] == pytest.approx(1.0)


def test_unlearn_rapidun_dynamic(saved, hand_views):
    s = saved
    parts = {"forget": s.forget, "retain": s.retain}
    _, _, res = unlearn("rapidun_dynamic", parts, s.model_dir, s.cfg, None, hand_views)
    t = res["train"]
    assert res["complete"] is True and t["steps"] == 4 and t["refreshes"] == 3  # dynamic_every=1: steps 1, 2, 3
    rw = rapidun_weights(hand_views["FF"], hand_views["FR"], hand_views["RF"], hand_views["RR"], s.cfg.weighting)
    assert res["weight_vectors"]["forget"] == pytest.approx(rw["w_forget"].tolist())  # the starting weights
    final = torch.tensor(t["final_w_forget"])
    assert final.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(final, rw["w_forget"].float(), atol=1e-3)  # refreshed from the adapter's gradients
    assert DIAG_KEYS <= set(res["diagnostics"])
