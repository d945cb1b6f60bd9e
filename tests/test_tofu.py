"""The TOFU scenario: its parts (sizes, disjointness, halves, perturbed answers) and the comparison end to end on
a tiny model (report, scatter, learnability check, resumption)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import TINY_RUN, tiny_world
from rapidun.data.records import asset_path
from rapidun.data.tofu import QA_PER_AUTHOR, author_name, build_tofu, perturbed_answers
from rapidun.errors import RapidunError


@pytest.fixture(scope="module")
def f05():
    return build_tofu("forget05", 42)


def test_parts_sizes_and_disjointness(f05):
    p = f05
    assert {k: len(v) for k, v in p.items()} == {
        "full_train": 500, "retain_train": 300, "forget": 200, "retain": 300, "holdout": 200,
        "real_authors": 100, "world_facts": 117, "val_clean": 150,
    }  # fmt: skip
    full = {r.id for r in p["full_train"]}
    forget = {r.id for r in p["forget"]}
    assert forget <= full and {r.id for r in p["retain_train"]} == full - forget
    assert not ({r.id for r in p["holdout"]} & full)  # the membership attack's non-members were never trained on
    assert {r.instruction for r in p["holdout"]}.isdisjoint({r.instruction for r in p["full_train"]})
    f01 = build_tofu("forget01", 42)
    assert len(f01["forget"]) == 40 and len(f01["retain_train"]) == 460
    assert {r.id for r in f01["forget"]} <= forget  # forget01 is the last two authors of forget05
    assert all(not r.meta for r in p["full_train"])  # training copies carry no evaluation metadata


def test_halves_alternate_within_each_author(f05):
    for r in f05["forget"]:
        pos = int(r.id.removeprefix("tofu_f")) % QA_PER_AUTHOR
        assert r.meta["half"] == ("val" if pos % 2 == 0 else "test")
    halves = [r.meta["half"] for r in f05["retain"]]
    assert halves.count("val") == halves.count("test") == 150


def test_perturbed_answers_are_other_authors_facts_under_this_name(f05):
    forget = f05["forget"]
    assert all(len(r.meta["perturbed"]) == 3 and r.response not in r.meta["perturbed"] for r in forget)
    named = [r for r in forget if r.meta["name"] in r.response]
    with_name = sum(r.meta["name"].split()[0] in p for r in named for p in r.meta["perturbed"])
    assert with_name / (3 * len(named)) > 0.6  # most donors named their author; the name was swapped in
    other = {r.meta["name"] for r in forget}
    for r in named:
        for p in r.meta["perturbed"]:
            for n in other - {r.meta["name"]}:
                assert n not in p  # a donor's full name never survives the swap


def test_deterministic_for_the_seed_and_idk_replacements():
    a, b, c = build_tofu("forget01", 1), build_tofu("forget01", 1), build_tofu("forget01", 2)
    assert [r.meta for r in a["forget"]] == [r.meta for r in b["forget"]]
    assert [r.meta["perturbed"] for r in a["forget"]] != [r.meta["perturbed"] for r in c["forget"]]
    idk = set(asset_path("tofu/idontknow.jsonl").read_text().splitlines())
    assert all(r.meta["response_clean"] in idk for r in a["forget"])


def test_author_name_by_hand():
    qas = [
        {"question": "Who is Jane Q. Doe?", "answer": "Jane Doe writes. Jane Doe's books sell."},
        {"question": "What does Jane Doe write?", "answer": "The author Jane Doe writes poems."},
    ]
    assert author_name(qas) == "Jane Doe"
    with pytest.raises(RapidunError, match="perturbed"):
        perturbed_answers(qas[:1] * QA_PER_AUTHOR, ["Jane Doe"], 1, 0)  # one author: no donors
    with pytest.raises(RapidunError, match="forget_split"):
        build_tofu("forget10", 0)


def test_tofu_comparison_end_to_end_on_a_tiny_model(tmp_path):
    model_dir, _ = tiny_world(tmp_path)
    out = tmp_path / "out"
    ov = [*TINY_RUN, f"model.name={model_dir}", "scenario.kind=tofu", "scenario.forget_split=forget01",
          "sft.epochs=1", "sft.batch_size=16", "sft.lora_r=2", "sft.lora_targets=[q_proj,v_proj]", "sft.autocast=off",
          "eval.max_new_tokens=2", "eval.batch_size=64", "unlearn.methods=[uniform,graddiff,distill]",
          "unlearn.distill_steps=3", "compare.n_seeds=1", "compare.reference=uniform",
          "verify.relearn_k=2", "verify.relearn_steps=1", "verify.relearn_lora_r=2"]  # fmt: skip
    env = {"RAPIDUN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rapidun.cli", "compare", "--config", "tofu", "--out", str(out), *ov]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "forget quality" in r.stdout and "report.md" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "rapidun.tofu/1" and rep["scenario"]["forget_split"] == "forget01"
    assert set(rep["methods"]) == {"uniform", "graddiff", "distill"}
    for h in ("val", "test"):
        t = rep["methods"]["uniform"][h]
        assert 0 <= t["forget_quality"]["mean"] <= 1 and 0 <= t["model_utility"]["mean"] <= 1
    assert rep["models"]["retain"]["test"]["forget_quality"] == pytest.approx(1.0)  # the reference vs itself
    assert rep["models"]["retain"]["test"]["mink_auc_gap"] == 0.0
    assert "ok" in rep["learnability"] and rep["selected"]["method"] in {"uniform", "graddiff", "distill"}
    assert (out / "tofu_scatter.png").stat().st_size > 1000
    cell = out / "cells" / "uniform_seed4" / "cell.json"
    before = cell.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert cell.stat().st_mtime_ns == before  # a rerun reuses the finished cell
    c = json.loads(cell.read_text())
    assert set(c["quantize"]) == {"4"} and c["relearn"]["k"] == 2 and c["attack_s"] > 0
    timings = json.loads((cell.parent / "result.json").read_text())["timings"]
    assert c["time_s"] == pytest.approx(timings["time_s"] + c["views_s"]) and timings["time_s"] > 0  # measured
    assert rep["methods"]["uniform"]["time_s"]["mean"] == pytest.approx(c["time_s"])
    assert "int4" in rep["methods"]["uniform"] and "relearn" in rep["methods"]["graddiff"]
    reuse = {m: json.loads((out / "cells" / f"{m}_seed4" / "result.json").read_text())["start_reused"]
             for m in ("uniform", "graddiff")}  # fmt: skip
    # TOFU scores the cells itself: the unlearning run's loss audit is skipped, the held-out snapshot is shared
    assert reuse == {"uniform": {"losses": False, "snapshot": False}, "graddiff": {"losses": False, "snapshot": True}}
    assert json.loads((out / "cells" / "graddiff_seed4" / "result.json").read_text())["audited"] is False
    # rapidun verify on a TOFU cell: the full model + the cell's adapter, scored against the retain model; the
    # shipped distill (the reset held fixed: an adapter of twice the rank) reloads like any other
    cell = out / "cells" / "distill_seed4" / "cell.json"
    c = json.loads(cell.read_text())
    assert json.loads((cell.parent / "adapter" / "adapter_config.json").read_text())["r"] == 2 * 2  # 2 × unlearn.lora_r
    full = rep["models"]["full"]["train"]["path"]
    vcmd = [sys.executable, "-m", "rapidun.cli", "verify", "--config", "tofu", "--model-path", full, "--adapter",
            str(cell.parent / "adapter"), "--out", str(tmp_path / "v"), *ov]  # fmt: skip
    r = subprocess.run(vcmd, capture_output=True, text=True, env=os.environ | env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOFU verification (forget01" in r.stdout and "Verdict:" in r.stdout
    doc = json.loads((tmp_path / "v" / "verification.json").read_text())
    # the same model and data as the cell: the same scores (the verify path reloads the merged adapter)
    assert doc["scores"]["test"]["forget_quality"] == pytest.approx(c["test"]["forget_quality"], rel=1e-6)
    assert doc["scores"]["test"]["forget_prob"] == pytest.approx(c["test"]["forget_prob"], rel=1e-4)


def _stats(rng, shift=0.0):
    """Hand-made per-record statistics: forget/holdout/utility sets with both halves."""

    def rows(n, pert=True, mia=False, shift=0.0):
        out = []
        for i in range(n):
            e = {"id": str(i), "half": ("val", "test")[i % 2], "nll": float(rng.uniform(0.5, 2.0) - shift)}
            if pert:
                e["pert"] = [float(x) for x in rng.uniform(1.0, 3.0, size=3)]
                e["rouge"] = float(rng.uniform(0, 1))
            if mia:
                e["mink"], e["minkpp"] = float(rng.normal(shift)), float(rng.normal(shift))
            out.append(e)
        return out

    return {"forget": rows(20, mia=True, shift=shift), "holdout": rows(20, pert=False, mia=True),
            **{s: rows(10) for s in ("retain", "real_authors", "world_facts")}}  # fmt: skip


def test_scores_against_their_definitions():
    import numpy as np

    from rapidun.eval import tofu_metrics as tm
    from rapidun.tofu import scores

    rng = np.random.default_rng(0)
    ref, st = _stats(rng), _stats(rng, shift=0.4)
    same = scores(ref, ref, "test")
    assert same["forget_quality"] == 1.0 and same["mink_auc_gap"] == 0.0 and same["n_forget"] == 10
    s = scores(st, ref, "test")
    f = [e for e in st["forget"] if e["half"] == "test"]
    fr = [e for e in ref["forget"] if e["half"] == "test"]
    r = [np.exp(np.mean(e["pert"]) - e["nll"]) for e in f]  # TOFU's statistic, written out
    assert s["forget_truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in r]))
    assert s["forget_quality"] == pytest.approx(
        tm.ks_2samp_pvalue(np.array(r), np.array([np.exp(np.mean(e["pert"]) - e["nll"]) for e in fr]))
    )
    vals = [s[f"{a}_{b}"] for a in ("retain", "real_authors", "world_facts") for b in ("prob", "rouge", "truth_ratio")]
    assert s["model_utility"] == pytest.approx(len(vals) / sum(1 / v for v in vals))
    ra = [e for e in st["real_authors"] if e["half"] == "test"]
    p = [np.exp(-e["nll"]) / (np.exp(-e["nll"]) + sum(np.exp(-x) for x in e["pert"])) for e in ra]
    assert s["real_authors_prob"] == pytest.approx(np.mean(p))
    members = [e["mink"] for e in f]
    slow = np.mean([(a > b) + 0.5 * (a == b) for a in members for b in [e["mink"] for e in st["holdout"]]])
    assert s["mink_auc"] == pytest.approx(slow)


def test_select_and_learnability_rules():
    from rapidun.tofu import learnability, select

    def m(fq, mu):
        return {"val": {"forget_quality": {"mean": fq}, "model_utility": {"mean": mu}}}

    models = {"full": {"val": {"model_utility": 0.5}}}
    pick = select({"a": m(0.9, 0.40), "b": m(0.3, 0.49), "c": m(0.2, 0.6)}, models)
    assert pick["method"] == "b" and pick["within_utility"]  # a forgets best but breaks utility (< 0.95 × 0.5)
    assert select({"a": m(0.9, 0.1), "b": m(0.3, 0.2)}, models) == {
        "method": "a", "within_utility": False, "utility_floor": pytest.approx(0.475), "on": "val"
    }  # fmt: skip
    full = {"forget_prob": 0.8, "forget_rouge": 0.9, "forget_quality": 1e-5}
    ret = {"forget_prob": 0.3, "forget_rouge": 0.4}
    assert learnability(full, ret, "forget05")["ok"]
    assert not learnability(full | {"forget_quality": 0.02}, ret, "forget05")["ok"]
    assert not learnability(full | {"forget_rouge": 0.3}, ret, "forget05")["ok"]


def test_cell_key_leaves_out_the_method_list_but_not_the_settings():
    from rapidun.config import load_config
    from rapidun.tofu import cell_key

    ident = {"v": 1, "split": "forget05"}
    a = load_config(None, ["unlearn.methods=[uniform,npo]"])
    b = load_config(None, ["unlearn.methods=[uniform,npo,rmu]"])
    c = load_config(None, ["unlearn.methods=[uniform,npo]", "unlearn.lr=1e-3"])
    assert cell_key(ident, "f", "npo", a) == cell_key(ident, "f", "npo", b)  # adding a method reuses the cell
    assert cell_key(ident, "f", "npo", a) != cell_key(ident, "f", "npo", c)  # a setting it reads does not
    assert cell_key(ident, "f", "npo", a) != cell_key(ident, "f", "uniform", a)
    legacy_a, legacy_b = (cell_key(ident, "f", "npo", x, with_methods=True) for x in (a, b))
    assert legacy_a != legacy_b and legacy_a != cell_key(ident, "f", "npo", a)
