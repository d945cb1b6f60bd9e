"""End-to-end unlearning on a tiny saved model: influence_views → unlearn → adapter/weights/audit (the CLI:
tests/test_unlearn_cli.py).

The model folder is the "poisoned" model; every run checks it is left byte-for-byte unchanged. Runs are short
(4 optimiser steps of 2 draws) and shared through a memoised fixture, so each method is trained once per module run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import FORGET_DATA, RETAIN_DATA, TINY_RUN, make_model, make_tokenizer
from rapidun.config import load_config
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.methods import REGISTRY, get_method
from rapidun.unlearn import influence_views, unlearn
from rapidun.views import method_views

OVERRIDES = [*TINY_RUN, "unlearn.loreun_every=1", "unlearn.rmu_layer=1"]  # the tiny models have 2 layers
LOOP_METHODS = ["rapidun", "uniform", "ga", "graddiff", "npo", "loreun", "loreun_dynamic", "loreun_hard_high", "random",
                "rapidun_sampled", "rapidun_aligned", "rapidun_stable", "coverage", "rapidun_dynamic", "sam_uniform",
                "adv_uniform", "simnpo", "rmu"]  # fmt: skip
INFLUENCE_METHODS = {"rapidun", "random", "rapidun_sampled", "rapidun_aligned", "rapidun_stable", "coverage",
                     "rapidun_dynamic"}  # fmt: skip
VAL_DATA = [("the cat sat", "on the mat"), ("one two three", "four five six"), ("alpha beta", "gamma delta")]


def make_parts() -> dict[str, list[Record]]:
    """Scenario splits from the tiny vocabulary: forget (poisoned answer + clean in meta), retain, val_clean."""
    forget = [
        Record(id=f"f{k}", instruction=p, response=bad, meta={"response_clean": good} if good else {})
        for k, (p, bad, good) in enumerate(FORGET_DATA)
    ]
    retain = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
    val = [Record(id=f"v{k}", instruction=p, response=a) for k, (p, a) in enumerate(VAL_DATA)]
    return {"forget": forget, "retain": retain, "val_clean": val}


def folder_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def tiny_env(root: Path) -> Iterator[SimpleNamespace]:
    """The tiny poisoned model folder under ``root``, the scenario parts, the config and its digest;
    RAPIDUN_CACHE in ``root`` while the context is open."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        tok = make_tokenizer()
        model = make_model(len(tok), init_range=0.2)
        model_dir = root / "poisoned"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        cfg = load_config(None, [*OVERRIDES, f"model.name={model_dir}"])
        yield SimpleNamespace(
            root=root, model_dir=str(model_dir), parts=make_parts(), cfg=cfg, digest=folder_digest(model_dir)
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with tiny_env(tmp_path_factory.mktemp("e2e")) as e:
        yield e


@pytest.fixture(scope="module")
def views(env):
    p = env.parts
    return influence_views(env.model_dir, p["forget"], p["retain"], env.cfg, env.root / "views")


@pytest.fixture(scope="module")
def run(env, views):
    """``run(method)`` → (merged model, tokenizer, result, out folder), each method trained once."""
    done: dict[str, tuple] = {}

    def _run(method: str) -> tuple:
        if method not in done:
            out = env.root / "runs" / method
            kind = get_method(method).views
            v = views
            if kind in ("stable", "aligned"):  # exact views; sketch methods share the module's sketch views
                v = method_views(kind, env.model_dir, env.parts["forget"], env.parts["retain"], env.cfg, env.root / "v")
            merged, tok, res = unlearn(method, env.parts, env.model_dir, env.cfg, out, v)
            done[method] = (merged, tok, res, out)
        return done[method]

    return _run


def probe_ids(env) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env.model_dir)
    return torch.tensor([tok("the cat sat on the mat and the dog ran")["input_ids"]])


def load_base(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_logits(model_dir: str, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    m = PeftModel.from_pretrained(load_base(model_dir), adapter).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


# ---------------------------------------------------------------- every loop method through unlearn()


@pytest.mark.parametrize("method", LOOP_METHODS)
def test_loop_method_end_to_end(env, run, method):
    merged, tok, res, out = run(method)
    assert tok.pad_token_id is not None and not merged.training
    assert res["method"] == method and res["complete"] is True and "stopped" not in res
    t = res["timings"]
    for k in ("influence_s", "mapping_s", "training_s", "time_s"):
        assert t[k] >= 0, (k, t)
    assert t["time_s"] == pytest.approx(t["influence_s"] + t["mapping_s"] + t["training_s"], rel=1e-9, abs=1e-12)
    assert t["training_s"] > 0 and res["train"]["steps"] == 4
    if method in INFLUENCE_METHODS:
        assert t["influence_s"] > 0 and res["influence_cached"] is False
    else:
        assert t["influence_s"] == 0.0 and res["influence_cached"] is None  # views given but not used
    assert all(math.isfinite(v) for v in res["train"]["loss_curve"])
    assert res["train"]["refreshes"] == (3 if method == "loreun_dynamic" else 0)  # loreun_every=1, 4 steps
    for k, v in res["audit_means"].items():
        assert v is not None and math.isfinite(v), k

    # files
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "result.json").read_text())["method"] == method
    ids_f = [r.id for r in env.parts["forget"]]
    ids_r = [r.id for r in env.parts["retain"]]
    weights = read_jsonl(out / "weights.jsonl")
    assert [w["id"] for w in weights] == ids_f + ids_r  # each sample once, forget first
    assert [w["group"] for w in weights] == ["forget"] * len(ids_f) + ["retain"] * len(ids_r)
    for g in ("forget", "retain"):
        ws = [w["weight"] for w in weights if w["group"] == g]
        assert all(w > 0 and math.isfinite(w) for w in ws)
        assert sum(ws) / len(ws) == pytest.approx(1.0, abs=1e-9)  # every method's weights have mean 1 per group
    audit = read_jsonl(out / "audit.jsonl")
    assert [a["id"] for a in audit] == ids_f + ids_r
    for a, w in zip(audit, weights, strict=True):
        assert a["group"] == w["group"] and a["weight"] == w["weight"]
        is_f = a["group"] == "forget"
        if method in INFLUENCE_METHODS:
            mine, other = (("FF", "FR"), ("RF", "RR")) if is_f else (("RF", "RR"), ("FF", "FR"))
            assert all(isinstance(a[v], float) for v in mine), a
            assert all(a[v] is None for v in other), a
            assert isinstance(a["S"], float) and isinstance(a["z"], float)
        else:
            assert all(a[v] is None for v in ("FF", "FR", "RF", "RR", "S", "z")), a
        assert (a["ce_poisoned_before"] is not None) == is_f and (a["ce_poisoned_after"] is not None) == is_f
        assert a["ce_clean_after"] is not None or (is_f and a["ce_clean_before"] is None)

    # the saved adapter on a freshly loaded base model = the returned merged model
    ids = probe_ids(env)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    ref = peft_logits(env.model_dir, out / "adapter", ids)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    with torch.no_grad():
        base = load_base(env.model_dir)(input_ids=ids).logits
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter did something

    assert folder_digest(env.model_dir) == env.digest  # the poisoned model is never modified


def test_ga_draws_only_forget_and_rapidun_draws_both(run):
    ga = run("ga")[2]["train"]
    assert ga["retain_draws"] == 0 and ga["forget_draws"] == ga["draws"] == 8
    rd = run("rapidun")[2]["train"]
    assert rd["retain_draws"] > 0 and rd["forget_draws"] > 0 and rd["forget_draws"] + rd["retain_draws"] == 8


@pytest.mark.parametrize("seed", [4, 0])
def test_ga_raises_forget_ce_on_poisoned_answers(env, seed):
    # Pure ascent at lr 5e-2 raised the mean forget CE by 0.25-0.55 nats over seeds 0, 1, 4, 42 (4 steps).
    cfg = load_config(None, [*OVERRIDES, f"model.name={env.model_dir}", "unlearn.lr=5e-2", f"unlearn.seed={seed}"])
    _, _, res = unlearn("ga", env.parts, env.model_dir, cfg, None)
    a = res["audit_means"]
    assert a["forget_ce_poisoned_after"] > a["forget_ce_poisoned_before"] + 0.1, a
    assert a["retain_ce_before"] is not None and a["retain_ce_after"] is not None
    assert folder_digest(env.model_dir) == env.digest


def test_random_weights_are_a_within_group_permutation_of_rapidun(run):
    rd = read_jsonl(run("rapidun")[3] / "weights.jsonl")
    rn = read_jsonl(run("random")[3] / "weights.jsonl")
    assert [r["id"] for r in rd] == [r["id"] for r in rn]
    for g in ("forget", "retain"):
        a = [r["weight"] for r in rd if r["group"] == g]
        b = [r["weight"] for r in rn if r["group"] == g]
        assert sorted(a) == pytest.approx(sorted(b), abs=1e-12)
    assert [r["weight"] for r in rd] != [r["weight"] for r in rn]  # actually permuted (seeded)
    assert len({r["weight"] for r in rd if r["group"] == "forget"}) > 1  # and the weights are not all equal


def test_fisher_through_unlearn(env):
    out = env.root / "runs" / "fisher"
    merged, _, res = unlearn("fisher", env.parts, env.model_dir, env.cfg, out)
    f = res["fisher"]
    assert f["alpha"] in env.cfg.unlearn.fisher_alphas
    assert [t["alpha"] for t in f["trials"]] == sorted(env.cfg.unlearn.fisher_alphas)
    assert f["retain_samples"] == len(env.parts["retain"]) and f["params"] > 0
    t = res["timings"]
    assert t["influence_s"] == 0.0 and t["training_s"] == f["time_s"] > 0
    assert t["time_s"] == pytest.approx(t["mapping_s"] + t["training_s"])
    assert "train" not in res and res.get("complete", True)
    assert not (out / "adapter").exists()  # Fisher changes the weights directly: no adapter
    assert (out / "weights.jsonl").is_file() and (out / "result.json").is_file()
    audit = read_jsonl(out / "audit.jsonl")
    assert all(a[v] is None for a in audit for v in ("FF", "FR", "RF", "RR"))
    assert not merged.training
    assert folder_digest(env.model_dir) == env.digest
    empty_val = {**env.parts, "val_clean": []}
    with pytest.raises(RapidunError, match="val_clean"):
        unlearn("fisher", empty_val, env.model_dir, env.cfg, None)


def test_influence_views_shapes_symmetry_and_cache(env, views):
    nf, nr = len(env.parts["forget"]), len(env.parts["retain"])
    assert views["FF"].shape == (nf, nf) and views["FR"].shape == (nf, nr)
    assert views["RF"].shape == (nr, nf) and views["RR"].shape == (nr, nr)
    assert views["forget_ids"] == [r.id for r in env.parts["forget"]]
    assert views["retain_ids"] == [r.id for r in env.parts["retain"]]
    # train = test = forget+retain and no hotwords: the full matrix is symmetric
    assert torch.allclose(views["FR"], views["RF"].T, atol=1e-5)
    assert torch.allclose(views["FF"], views["FF"].T, atol=1e-5)
    assert torch.allclose(views["RR"], views["RR"].T, atol=1e-5)
    assert views["FF"].abs().sum() > 0 and views["stats"]["total_s"] > 0
    again = influence_views(env.model_dir, env.parts["forget"], env.parts["retain"], env.cfg, env.root / "views")
    assert views["cached"] is False and again["cached"] is True
    for v in ("FF", "FR", "RF", "RR"):
        assert torch.equal(again[v], views[v]), v
    assert again["stats"]["total_s"] == views["stats"]["total_s"]  # the measured time, not a reload time
    assert again["forget_ids"] == views["forget_ids"] and again["retain_ids"] == views["retain_ids"]
    # different packs: recomputed, not served from the cache
    fewer = influence_views(env.model_dir, env.parts["forget"][:4], env.parts["retain"], env.cfg, env.root / "views")
    assert fewer["cached"] is False and fewer["FF"].shape == (4, 4)
    assert torch.allclose(fewer["FR"], views["FR"][:4], atol=1e-5)


HOTWORDS = ["park", "dog"]  # in the poisoned answers of f0, f1, f4 (FORGET_DATA), in no retain answer


def test_influence_views_hotwords_restrict_only_the_forget_test_columns(env, views):
    p = env.parts
    assert [any(w in r.response.split() for w in HOTWORDS) for r in p["forget"]] == [1, 1, 0, 0, 1, 0]
    assert not any(w in r.response.split() for r in p["retain"] for w in HOTWORDS)
    cfg = load_config(None, [*OVERRIDES, f"model.name={env.model_dir}", f"influence.hotwords=[{','.join(HOTWORDS)}]"])
    hot = influence_views(env.model_dir, p["forget"], p["retain"], cfg, env.root / "views_hot")
    assert hot["cached"] is False
    # retain-as-test columns use the plain loss: not zero, and equal to the plain views
    assert hot["FR"].abs().sum() > 0 and hot["RR"].abs().sum() > 0
    assert torch.allclose(hot["FR"], views["FR"], atol=1e-5) and torch.allclose(hot["RR"], views["RR"], atol=1e-5)
    # forget-as-test columns use the hotword loss: zero where the answer has no hotword, changed elsewhere
    for v in ("FF", "RF"):
        assert torch.all(hot[v][:, [2, 3, 5]] == 0), v
        assert torch.all(hot[v][:, [0, 1, 4]].abs().sum(0) > 0), v
        assert not torch.allclose(hot[v], views[v], atol=1e-5), v
    st = hot["stats"]
    nf, nr = len(p["forget"]), len(p["retain"])
    assert st["train"]["computed"] == nf + nr and st["test"]["computed"] == nf
    assert st["test_retain"]["computed"] == 0 and st["test_retain"]["cached"] == nr  # plain train sketches reused
    assert st["total_s"] > 0


def test_influence_views_need_both_groups(env):
    with pytest.raises(RapidunError, match="forget and retain"):
        influence_views(env.model_dir, env.parts["forget"], [], env.cfg)


def test_influence_methods_need_views(env):
    with pytest.raises(RapidunError, match="influence views"):
        unlearn("rapidun", env.parts, env.model_dir, env.cfg, None)


@pytest.mark.parametrize("pack", ["forget", "retain"])
def test_unlearn_refuses_views_of_other_packs(env, views, pack):
    parts = {**env.parts, pack: env.parts[pack][::-1]}  # same samples, another order
    out = env.root / "runs" / f"mismatch_{pack}"
    with pytest.raises(RapidunError, match="other forget/retain packs"):
        unlearn("rapidun", parts, env.model_dir, env.cfg, out, views)
    assert not out.exists()


def test_before_reuse_gives_identical_before_values(env, run):
    first = run("uniform")[2]
    before = first["audit_before"]
    _, _, res = unlearn("loreun", env.parts, env.model_dir, env.cfg, None, before=before)
    assert res["audit_before"] == before
    means = ("forget_ce_poisoned_before", "forget_ce_clean_before", "retain_ce_before")
    assert all(res["audit_means"][k] == first["audit_means"][k] for k in means)
    # it is really reused, not recomputed: shifted values come back as given (LoReUn's weights are shift-free)
    shifted = {k: [None if v is None else v + 1.0 for v in vs] for k, vs in before.items()}
    _, _, res2 = unlearn("loreun", env.parts, env.model_dir, env.cfg, None, before=shifted)
    assert res2["audit_before"] == shifted
    assert res2["audit_means"]["retain_ce_before"] == pytest.approx(first["audit_means"]["retain_ce_before"] + 1)
    for g in ("forget", "retain"):
        assert res2["weights"][g] == pytest.approx(res["weights"][g])
    # a `before` of the wrong size (other packs) is recomputed, with the same values
    bogus = {"ce_poisoned": [0.0], "ce_clean": [0.0]}
    _, _, res3 = unlearn("loreun", env.parts, env.model_dir, env.cfg, None, before=bogus)
    assert res3["audit_before"] == before


def test_audit_off_skips_the_loss_passes_and_trains_the_same_model(env, run, monkeypatch):
    import importlib

    merged, _, first, _ = run("uniform")  # audited (the default)
    ul = importlib.import_module("rapidun.unlearn")
    calls = []
    real = ul.audit_losses
    monkeypatch.setattr(ul, "audit_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = env.root / "runs" / "uniform_noaudit"
    m2, _, res = unlearn("uniform", env.parts, env.model_dir, env.cfg, out, audit=False)
    assert calls == [] and res["audited"] is False and res["audit_before"] is None
    assert all(v is None for v in res["audit_means"].values())
    rows = read_jsonl(out / "audit.jsonl")
    assert len(rows) == len(env.parts["forget"]) + len(env.parts["retain"])
    assert all(r["ce_poisoned_before"] is None and r["ce_clean_after"] is None for r in rows)
    # the audit only reads the model: the same training, bit for bit
    a, b = merged.state_dict(), m2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["weights"] == first["weights"] and res["heldout"] == first["heldout"]
    # LoReUn's weights read the start losses: measured even so (the after pass is still skipped)
    _, _, lo = unlearn("loreun", env.parts, env.model_dir, env.cfg, None, audit=False)
    assert len(calls) == 1 and lo["audit_before"] == first["audit_before"]
    assert lo["audit_means"]["forget_ce_poisoned_after"] is None
    # so does the calibrated schedule (its start losses), and the flag stays a plain bool in result.json
    cal = load_config(None, [*OVERRIDES, f"model.name={env.model_dir}", "unlearn.schedule=calibrated"])
    _, _, c = unlearn("uniform", env.parts, env.model_dir, cal, env.root / "runs" / "cal_noaudit", audit=False)
    assert len(calls) == 2 and c["audit_before"] == first["audit_before"] and c["audited"] is False
    assert json.loads((env.root / "runs" / "cal_noaudit" / "result.json").read_text())["audited"] is False


def test_start_cache_is_filled_once_and_gives_the_same_collateral(env, monkeypatch):
    import importlib

    ul = importlib.import_module("rapidun.unlearn")  # the module (rapidun.unlearn is also the API function)

    calls = []
    real = ul.start_snapshot
    monkeypatch.setattr(ul, "start_snapshot", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    _, _, r1 = unlearn("uniform", env.parts, env.model_dir, env.cfg, None, start_cache=cache)
    assert len(calls) == 1 and cache["held_before"] is not None and cache["snapshot"]["texts"]
    _, _, r2 = unlearn("ga", env.parts, env.model_dir, env.cfg, None, start_cache=cache)
    assert len(calls) == 1  # reused, not recomputed
    _, _, r3 = unlearn("ga", env.parts, env.model_dir, env.cfg, None)  # no cache: taken afresh, same values
    assert len(calls) == 2 and r3["collateral"] == r2["collateral"] and r3["heldout"] == r2["heldout"]
    # other held-out prompts (another key): taken again
    fewer = {**env.parts, "val_clean": env.parts["val_clean"][:1]}
    unlearn("uniform", fewer, env.model_dir, env.cfg, None, start_cache=cache)
    assert len(calls) == 3 and r1["collateral"] is not None


def test_retrain_is_not_an_unlearning_run(env):
    with pytest.raises(RapidunError, match=r"SFT reference"):
        unlearn("retrain", env.parts, env.model_dir, env.cfg, None)


def test_registry_loop_methods_are_all_covered():
    # cover (expand="trace") needs a scenario's corpus: tests/test_cover.py runs it on one
    assert {n for n, m in REGISTRY.items() if m.kind == "loop" and not m.expand} == set(LOOP_METHODS)


@pytest.mark.parametrize(("method", "robust"), [("sam_uniform", "sam"), ("adv_uniform", "adv")])
def test_robust_methods_take_their_own_step_through_unlearn(run, method, robust):
    """The registered robust methods reach the loop with their step: their adapter is not uniform's."""
    _, _, res, out = run(method)
    _, _, res_u, out_u = run("uniform")
    assert res["train"]["robust"] == robust and "robust" not in res_u["train"]
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(out_u / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
