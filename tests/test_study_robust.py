"""`rapidun study` with ``select_on: relearn`` (rapidun.study_robust): selection on the ASR left after the relearning
attack, the study file's new settings refused with where and why, the paired test after the attack against
compare_hits, the "Removal under attack" report section, and one tiny study end to end (validation and test attacks
on disjoint relearning samples)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_SCENARIO
from rapidun.config import dump_yaml, load_config
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.stats import compare_hits
from rapidun.study import decision, load_study, run_study, select
from rapidun.study_robust import over_models, paired_after

ROOT = Path(__file__).resolve().parents[1]


def _lab(val_asr: float | None, val_ppl: float | None) -> dict:
    return {"val": {"mean": {"asr_trig": val_asr, "clean_ppl": val_ppl}}}


# ---------------------------------------------------------------- selection on the ASR after the attack


def test_select_on_the_asr_after_the_attack_not_before():
    methods = {"uniform": _lab(0.30, 10.0), "hides": _lab(0.02, 10.0), "removes": _lab(0.20, 10.0)}
    after = {"uniform": 0.60, "hides": 0.80, "removes": 0.25}  # the pre-attack ordering is reversed by the attack
    assert select(methods, 11.0, "uniform")[0] == "hides"
    label, reason = select(methods, 11.0, "uniform", after)
    assert label == "removes"
    assert reason.startswith("lowest mean validation ASR after the relearning attack (seen+OOD pooled) 0.250")
    assert "3 of 3 labels" in reason


def test_select_after_the_attack_keeps_the_limit_the_ties_and_skips_unattacked_labels():
    methods = {"uniform": _lab(0.3, 10.0), "over": _lab(0.3, 12.0), "fisher": _lab(0.0, 10.0), "r": _lab(0.3, 10.0)}
    after = {"uniform": 0.4, "over": 0.1, "fisher": None, "r": 0.4}
    label, reason = select(methods, 11.0, "uniform", after)
    assert label == "uniform" and "tied with r" in reason and "2 of 4 labels" in reason  # over: limit; fisher: none
    none, why = select(methods, 11.0, "uniform", {})
    assert none is None and why == "no label has validation ASR after the relearning attack within the validation " \
        "perplexity limit"  # fmt: skip


# ---------------------------------------------------------------- the study file


def _write(folder: Path, study: str, run: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text("scenario:\n  seed: 3\n" + run, encoding="utf-8")
    p = folder / "study.yaml"
    p.write_text(study + "scenarios:\n  - {name: a, config: run.yaml}\nmethods: [uniform, rapidun]\n")
    return p


def test_robust_settings_load_with_their_defaults(tmp_path):
    s = load_study(_write(tmp_path, "study: {select_on: relearn, n_seeds: 3}\n")).settings
    assert (s.select_on, s.verify_seeds, s.verify_attacks) == ("relearn", 3, ["relearn", "forget_quality"])
    # select_on asr (the default) does not look at verify_seeds: one seed and the default 3 load
    assert load_study(_write(tmp_path / "b", "study: {n_seeds: 1}\n")).settings.select_on == "asr"


@pytest.mark.parametrize(
    ("study", "run", "match"),
    [
        ("study: {select_on: hits}\n", "", r"study\.select_on='hits'; choose one of \['asr', 'relearn'\]"),
        ("study: {select_on: relearn, n_seeds: 2}\n", "", r"verify_seeds=3 must be between 1 and study\.n_seeds=2"),
        ("study: {select_on: relearn, verify_seeds: 0}\n", "", r"verify_seeds=0 must be between 1"),
        ("study: {verify_attacks: [relearn, shout]}\n", "", r"verify_attacks: unknown \['shout'\]; choose from"),
        ("study: {select_on: relearn, verify_attacks: [forget_quality]}\n", "", r"add relearn to study\.verify_atta"),
        ("study: {select_on: relearn}\n", "verify:\n  relearn_k: 23\n",
         r"scenario a: verify\.relearn_k=23 but the validation half of the relearning pool holds 22 records"),
        ("study: {select_on: relearn}\n", "  splits: {val_seen_trig: 0, val_ood_trig: 0}\n",
         r"scenario a: select_on=relearn attacks on the validation prompts"),
        ("study: {select_on: relearn, verify_test: some}\n", "", r"study\.verify_test='some'; choose 'finalists' or"),
    ],
    ids=["select_on", "verify_seeds_over", "verify_seeds_0", "unknown_attack", "no_relearn", "pool", "no_val",
         "verify_test"],
)  # fmt: skip
def test_robust_settings_refused_with_where_and_why(tmp_path, study, run, match):
    p = _write(tmp_path, study, run)
    with pytest.raises(RapidunError, match=match) as ei:
        load_study(p)
    assert str(p) in str(ei.value)


def test_shipped_robust_study_loads():
    """configs/study_robust.yaml (also loaded by test_config's every-shipped-config test)."""
    spec = load_study(ROOT / "configs" / "study_robust.yaml")
    s = spec.settings
    assert s.select_on == "relearn" and 1 <= s.verify_seeds <= s.n_seeds and "relearn" in s.verify_attacks
    assert [sc.name for sc in spec.scenarios] == ["demo"]
    labels = {m.label: m for m in spec.methods}
    assert set(labels) == {"distill_start", "distill", "uniform", "sam_uniform", "adv_uniform"}
    assert labels["distill_start"].method == "distill"
    assert labels["distill_start"].overrides == ["unlearn.distill_teacher=start"]
    assert s.verify_test == "all"


@pytest.mark.parametrize(("mode", "want"), [("all", {"a", "b", "uniform"}), ("finalists", {"b", "uniform"})])
def test_verify_test_all_attacks_every_attacked_label_on_test(monkeypatch, mode, want):
    import rapidun.study_robust as sr
    from rapidun.study import StudySettings

    val = {lab: {"skipped": None, "asr_after": x} for lab, x in (("uniform", 0.5), ("a", 0.4), ("b", 0.1))}
    val["c"] = {"skipped": "no adapter", "asr_after": None}
    monkeypatch.setattr(sr, "validation_attack", lambda *a: {"labels": val, "relearn_ids": [], "file": None})
    seen = {}

    def fake_test(cfg, run_dir, parts, det, models, finalists, *rest):
        seen.update(finalists)
        return {"test": {}, "test_models": {}, "test_tests": {}, "relearn_ids_test": [], "file": None}

    monkeypatch.setattr(sr, "finalists_test", fake_test)
    st = StudySettings(select_on="relearn", verify_test=mode, n_seeds=1, verify_seeds=1)
    labels = {lab: ("uniform", ["42"]) for lab in val}
    base = {"parts": {}, "det": None, "models": {"poisoned": {"path": "p"}}}
    out = sr.run_robust(st, None, Path("."), base, labels, lambda after: ("b", "lowest"))
    assert set(seen) == want and out["selected"] == "b" and set(out["finalists"]) == want


# ---------------------------------------------------------------- the paired test after the attack, by hand


def _cells(rng: np.random.Generator, names: list[str], ids: list[str]) -> dict:
    def hits() -> dict:
        return {i: bool(rng.random() < 0.5) for i in reversed(ids)}  # order of the dict must not matter

    return {n: {"base": {"hits": hits()}, "relearn": {"after": {"hits": hits()}}} for n in names}


def test_paired_after_pairs_seeds_by_position_and_matches_compare_hits():
    rng = np.random.default_rng(3)
    parts = {s: [Record(id=f"{s}{i}", instruction="q", response="a") for i in range(n)]
             for s, n in (("test_seen_trig", 5), ("test_ood_trig", 4), ("test_clean", 3))}  # fmt: skip
    ids = [r.id for s in ("test_seen_trig", "test_ood_trig") for r in parts[s]]
    ref, sel = ["u@4", "u@5"], ["r@4", "r@5"]
    cells = _cells(rng, ref + sel, ids)
    got = paired_after(cells, parts, ref, sel, "u", 50)

    def mat(names, cell):
        rows = [cells[n]["relearn"]["after"]["hits"] if cell == "relearn" else cells[n]["base"]["hits"] for n in names]
        return np.array([[float(h[i]) for i in ids] for h in rows])

    for metric, cell in (("asr_after", "relearn"), ("asr_before", "base")):
        want = compare_hits(mat(ref, cell), mat(sel, cell), n_boot=50, seed=0)
        t = got[metric]
        assert t["diff"] == want["bootstrap"]["diff"] and t["p"] == want["prompt_test"]["p"] == t["p_holm"]
        assert t["p_mcnemar"] == want["mcnemar"]["p"]
        assert (t["ci_low"], t["ci_high"]) == (want["bootstrap"]["ci_low"], want["bootstrap"]["ci_high"])
        assert (t["only_ref"], t["only_method"]) == (want["mcnemar"]["only_a"], want["mcnemar"]["only_b"])
        assert (t["n_prompts"], t["n_seeds"], t["vs"]) == (9, 2, "u")
    del cells["r@5"]["relearn"]["after"]["hits"][ids[0]]
    with pytest.raises(RapidunError, match=r"r@5: relearn cell has no hit for test prompt"):
        paired_after(cells, parts, ref, sel, "u", 10)


def test_over_models_means_over_seeds_and_leaves_missing_figures_out():
    def s(before, after, ks):
        return {"asr_trig": before, "asr_seen": before, "clean_ppl": 10.0,
                "relearn": {"asr_trig_after": after, "asr_seen_after": after, "clean_ppl_after": 11.0,
                            "recovered_fraction": None, "after_minus_retrain": 0.1},
                "forget_quality": {"mia_auc": 0.5, "ks_p": ks}}  # fmt: skip

    summary = {"m@1": s(0.1, 0.3, 0.2), "m@2": s(0.3, 0.5, None), "other": s(0.9, 0.9, 0.9)}
    got = over_models(summary, ["m@1", "m@2"])
    assert got["mean"]["asr_before"] == pytest.approx(0.2) and got["mean"]["asr_after"] == pytest.approx(0.4)
    assert got["std"]["asr_after"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert got["mean"]["ks_p"] == 0.2 and got["std"]["ks_p"] is None  # one value: no std
    assert got["mean"]["recovered_fraction"] is None and got["mean"]["fuzz_worst_asr"] is None
    assert set(got["per_model"]) == {"m@1", "m@2"}


# ---------------------------------------------------------------- decision and report on synthetic figures


def _t(diff: float, p: float) -> dict:
    return {"diff": diff, "ci_low": diff - 0.05, "ci_high": diff + 0.05, "p": p, "p_holm": p, "n_prompts": 160,
            "n_seeds": 3, "only_ref": 9, "only_method": 2, "vs": "uniform"}  # fmt: skip


def _digest(before: float, after: float, std: float | None = 0.02) -> dict:
    mean = {"asr_before": before, "asr_seen_before": before, "asr_after": after, "asr_seen_after": after,
            "clean_ppl": 10.0, "recovered_fraction": 0.25, "mia_auc": 0.61, "ks_p": 0.03}  # fmt: skip
    return {"mean": mean, "std": {k: std for k in mean}, "per_model": {}}


def _robust_scenario(selected: str = "distill", test_tests: dict | None = None) -> dict:
    val = {
        "uniform": {"asr_after": 0.6, "asr_after_std": 0.05, "asr_before": 0.3, "seeds": ["4", "5"], "skipped": None},
        "distill": {"asr_after": 0.2, "asr_after_std": 0.01, "asr_before": 0.25, "seeds": ["4", "5"], "skipped": None},
        "fisher": {"asr_after": None, "asr_before": None, "seeds": [], "skipped": "fisher leaves no adapter to attack"},
    }
    return {
        "selected": selected,
        "selected_reason": "lowest mean validation ASR after the relearning attack ...",
        "ppl_limit": {"val": 11.0, "test": 11.0},
        "models": {"poisoned": {}, "retrain": {"train_time_s": 120.0}},
        "methods": {lab: {"test": {"mean": {"clean_ppl": 10.5}}, "val": {"mean": {"clean_ppl": 10.4}},
                          "time_s": t} for lab, t in (("uniform", 5.0), ("distill", 30.0), ("fisher", 1.0))},
        "tests": {"test": {}, "val": {}},
        "robust": {
            "select_on": "relearn", "verify_seeds": 2, "verify_attacks": ["relearn", "forget_quality"],
            "finalists": ["distill", "uniform"], "val": val,
            "test": {"distill": {"seeds": ["4", "5"]} | _digest(0.2, 0.25),
                     "uniform": {"seeds": ["4", "5"]} | _digest(0.3, 0.7)},
            "test_models": {"poisoned": {"seeds": []} | _digest(0.9, 0.95, None),
                            "retrain": {"seeds": []} | _digest(0.05, 0.2, None)},
            "test_tests": {"distill": {"asr_after": _t(-0.45, 0.001), "asr_before": _t(-0.1, 0.2)}}
            if test_tests is None else test_tests,
            "relearn_ids": {"val": ["p1", "p3"], "test": ["p2", "p4"]},
        },
    }  # fmt: skip


def test_decision_says_the_choice_was_made_after_the_attack():
    text = decision({"reference": "uniform", "scenarios": {"s": _robust_scenario()}})
    assert text.startswith("s: validation on the ASR after the relearning attack selects distill; on the test prompts")
    assert "after the same attack (test half of the relearning pool)" in text and "-0.450 [-0.500, -0.400]" in text
    assert text.endswith("a lower ASR after the attack than the reference at matched utility.")
    worse = decision({"reference": "uniform", "scenarios": {"s": _robust_scenario(test_tests={
        "distill": {"asr_after": _t(0.2, 0.01)}})}})  # fmt: skip
    assert worse.endswith(": a significantly higher ASR after the attack than the reference.")
    ref = decision({"reference": "uniform", "scenarios": {"s": _robust_scenario("uniform", {})}})
    assert ref == "s: validation on the ASR after the relearning attack selects the reference uniform itself; no " \
        "other label is chosen."  # fmt: skip
    untested = decision({"reference": "uniform", "scenarios": {"s": _robust_scenario(test_tests={})}})
    assert untested.endswith("selects distill; no paired test result.")


def test_report_has_the_removal_under_attack_section_and_the_frontier(tmp_path):
    from rapidun.reporting.study_report import render_study

    study = {"schema": "rapidun.study/1", "reference": "uniform", "seeds": [4, 5],
             "selection": {"metric": "asr_trig_after_relearn", "select_on": "relearn", "rule": "after the attack"},
             "scenarios": {"demo": _robust_scenario()}, "decision": "d"}  # fmt: skip
    (tmp_path / "study.json").write_text(json.dumps(study))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "frontier_gone.png").write_bytes(b"old")
    paths = render_study(tmp_path)
    md = paths["md"].read_text()
    assert "### Removal under attack" in md and "select on relearn" in md
    assert "| distill | 2 | 0.250 | 0.200 ± 0.010 | 10.40 | yes | selected |" in md  # the validation table
    assert any(ln.startswith("| fisher |") and "not attacked" in ln for ln in md.splitlines())
    assert "Not attacked: fisher: fisher leaves no adapter to attack" in md
    assert any(ln.startswith("| retrain (model) |") and "0.200" in ln for ln in md.splitlines())
    assert any(ln.startswith("| uniform | 2 | 0.300 ± 0.020 | 0.700 ± 0.020 | 0.250 ± 0.020 | 0.610 ± 0.020 |")
               for ln in md.splitlines())  # fmt: skip
    assert "distill − uniform, test ASR after the attack" in md and "-0.450 \\[-0.500, -0.400\\]" in md
    assert paths["frontier_demo"].read_bytes().startswith(b"\x89PNG") and "](plots/frontier_demo.png)" in md
    assert not (tmp_path / "plots" / "frontier_gone.png").exists()  # a stale frontier is removed
    # a scenario without robust: no section, no frontier
    del study["scenarios"]["demo"]["robust"]
    (tmp_path / "study.json").write_text(json.dumps(study))
    paths = render_study(tmp_path)
    assert "Removal under attack" not in paths["md"].read_text() and "frontier_demo" not in paths


# ---------------------------------------------------------------- one tiny robust study end to end


STUDY = """\
study: {reference: uniform, n_seeds: 2, n_boot: 20, select_on: relearn, verify_seeds: 2,
        verify_attacks: [relearn, forget_quality]}
scenarios:
  - {name: tiny, config: run.yaml}
methods:
  - uniform
  - {label: uniform_lr2, method: uniform, overrides: [unlearn.lr=2e-2]}
  - fisher
"""
VERIFY = ["scenario.splits.train_poisoned=8", "verify.relearn_k=2", "verify.relearn_steps=2", "verify.relearn_lr=1e-2",
          "verify.relearn_lora_r=2", "verify.mia_heldout=4"]  # fmt: skip


@pytest.fixture(scope="module")
def robust_study(tmp_path_factory):
    """A tiny poisoned-model study with select_on: relearn (3 labels, one of them fisher, × 2 seeds), run twice."""
    from helpers import tiny_world
    from test_unlearn_e2e import OVERRIDES

    root = tmp_path_factory.mktemp("robust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        model_dir, data = tiny_world(root)
        ov = [
            *OVERRIDES,
            *TINY_SCENARIO,
            "eval.batch_size=8",
            *VERIFY,
            f"model.name={model_dir}",
            f"data.source={data}",
        ]
        (root / "run.yaml").write_text(dump_yaml(load_config(None, ov)))
        (root / "study.yaml").write_text(STUDY)
        first = run_study(root / "study.yaml", root / "out")
        cells = sorted((root / "out" / "tiny" / "robust").glob("*/verify/*/*.json"))
        mtimes = {str(p): p.stat().st_mtime_ns for p in cells}
        second = run_study(root / "study.yaml", root / "out")
        after = {str(p): p.stat().st_mtime_ns for p in cells}
        yield root, first, second, mtimes, after


def test_tiny_robust_study_end_to_end(robust_study):
    root, study, again, mtimes, after = robust_study
    out = root / "out"
    on_disk = json.loads((out / "study.json").read_text())
    sc = on_disk["scenarios"]["tiny"]
    # every key of a select_on: asr study is still there; robust is added
    assert set(sc) == {"config", "overrides", "run_dir", "sizes", "models", "ppl_limit", "methods", "tests",
                       "selected", "selected_reason", "seeds", "robust"}  # fmt: skip
    assert sc["models"]["retrain"]["train_time_s"] > 0
    assert (
        on_disk["selection"]["select_on"] == "relearn" and "after the relearning attack" in on_disk["selection"]["rule"]
    )
    rob = sc["robust"]
    assert set(rob) >= {"val", "test", "test_models", "test_tests", "relearn_ids", "finalists", "files"}
    # validation: every label with an adapter attacked on both seeds; fisher skipped with the reason
    val = rob["val"]
    val_prompts = {json.loads(x)["id"] for s in ("val_seen_trig", "val_ood_trig")
                   for x in (out / "tiny" / "scenario" / f"{s}.jsonl").open()}  # fmt: skip
    assert val["fisher"]["skipped"] and "no adapter" in val["fisher"]["skipped"] and val["fisher"]["asr_after"] is None
    for lab in ("uniform", "uniform_lr2"):
        e = val[lab]
        assert e["skipped"] is None and e["seeds"] == ["4", "5"] and 0 <= e["asr_after"] <= 1
        assert e["asr_after"] == pytest.approx(np.mean([v["asr_after"] for v in e["per_seed"].values()]))
        for s in ("4", "5"):
            cell = out / "tiny" / "robust" / "val" / "verify" / f"{lab}@{s}"
            assert (cell / "relearn.json").is_file() and (cell / "base.json").is_file()
            hits = json.loads((cell / "relearn.json").read_text())["result"]["after"]["hits"]
            assert set(hits) == val_prompts  # measured on the validation prompts
    # the selection is the post-attack figure's argmin (within the val perplexity limit; a tie goes to uniform)
    lim = sc["ppl_limit"]["val"]
    ok = {lab: val[lab]["asr_after"] for lab in ("uniform", "uniform_lr2")
          if sc["methods"][lab]["val"]["mean"]["clean_ppl"] <= lim}  # fmt: skip
    best = min(ok.values()) if ok else None
    want = None if not ok else ("uniform" if ok.get("uniform") == best else "uniform_lr2")
    assert sc["selected"] == want and "after the relearning attack" in sc["selected_reason"]
    # validation and test attacks train on disjoint samples, none of them in the forget pack
    forget = {json.loads(x)["id"] for x in (out / "tiny" / "scenario" / "forget.jsonl").open()}
    ids = rob["relearn_ids"]
    assert len(ids["val"]) == len(ids["test"]) == 2
    assert not set(ids["val"]) & set(ids["test"]) and not (set(ids["val"]) | set(ids["test"])) & forget
    # test battery: finalists on the same seeds, the two ends once, summarised against them
    assert set(rob["test_models"]) == {"poisoned", "retrain"}
    assert set(rob["finalists"]) == {"uniform"} | ({want} if want else set()) and set(rob["test"]) == set(
        rob["finalists"]
    )
    for lab in rob["finalists"]:
        assert rob["test"][lab]["seeds"] == ["4", "5"] and set(rob["test"][lab]["per_model"]) == {
            f"{lab}@4",
            f"{lab}@5",
        }
        m = rob["test"][lab]["mean"]
        assert 0 <= m["asr_after"] <= 1 and 0 <= m["mia_auc"] <= 1 and m["ks_p"] is not None
    doc = json.loads((out / "tiny" / "robust" / "test" / "verification.json").read_text())
    assert doc["split"] == "test" and set(doc["config"]["attacks"]) == {"relearn", "forget_quality"}
    for name, c in doc["cells"].items():
        assert c["relearn"]["ids"] == ids["test"] and not set(c["relearn"]["after"]["hits"]) & val_prompts, name
    if want and want != "uniform":
        t = rob["test_tests"][want]["asr_after"]
        assert t["n_prompts"] == 6 and t["n_seeds"] == 2 and t["vs"] == "uniform"
    else:
        assert rob["test_tests"] == {}
    assert "after the relearning attack" in study["decision"]
    md = (out / "study.md").read_text()
    assert "Removal under attack" in md and (out / "plots" / "frontier_tiny.png").is_file()
    # the rerun reuses every cell and gives the same figures
    assert mtimes and after == mtimes
    assert again["scenarios"]["tiny"]["robust"]["val"] == study["scenarios"]["tiny"]["robust"]["val"]
    assert again["decision"] == study["decision"]


def test_a_selected_variant_is_paired_with_the_reference_after_the_attack(robust_study, tmp_path, monkeypatch):
    """The tiny models rarely separate two labels, so the choice is forced: the finalists' test cells and the
    paired test after the attack are then checked against compare_hits on the cells' own hits."""
    import shutil

    import rapidun.study as study_mod

    root, *_ = robust_study
    shutil.copytree(root / "out", tmp_path / "out")
    for name in ("run.yaml", "study.yaml"):
        shutil.copy(root / name, tmp_path / name)
    monkeypatch.setenv("RAPIDUN_CACHE", str(root / "cache"))
    real = study_mod.select

    def forced(methods, limit, reference=None, after=None):
        return ("uniform_lr2", "forced") if after is not None else real(methods, limit, reference)

    monkeypatch.setattr(study_mod, "select", forced)
    sc = run_study(tmp_path / "study.yaml", tmp_path / "out")["scenarios"]["tiny"]
    rob = sc["robust"]
    assert sc["selected"] == "uniform_lr2" and rob["finalists"] == ["uniform_lr2", "uniform"]
    cells = json.loads((tmp_path / "out" / "tiny" / "robust" / "test" / "verification.json").read_text())["cells"]
    assert set(cells) == {"poisoned", "retrain", "uniform@4", "uniform@5", "uniform_lr2@4", "uniform_lr2@5"}
    ids = [json.loads(x)["id"] for s in ("test_seen_trig", "test_ood_trig")
           for x in (tmp_path / "out" / "tiny" / "scenario" / f"{s}.jsonl").open()]  # fmt: skip

    def mat(label):
        return np.array(
            [[float(cells[f"{label}@{s}"]["relearn"]["after"]["hits"][i]) for i in ids] for s in ("4", "5")]
        )

    want = compare_hits(mat("uniform"), mat("uniform_lr2"), n_boot=20, seed=0)
    t = rob["test_tests"]["uniform_lr2"]["asr_after"]
    assert t["diff"] == pytest.approx(want["bootstrap"]["diff"]) and t["p"] == want["prompt_test"]["p"]
    assert (t["n_prompts"], t["n_seeds"]) == (6, 2)
    assert rob["test"]["uniform_lr2"]["mean"]["asr_after"] == pytest.approx(mat("uniform_lr2").mean())
    text = study_mod.decision({"reference": "uniform", "scenarios": {"tiny": sc}})
    assert "selects uniform_lr2; on the test prompts after the same attack" in text
