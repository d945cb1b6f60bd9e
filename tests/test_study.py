"""`rapidun study`: tests regrouped by split with Holm, validation-only selection, the decision text, the comparison
helpers it relies on, and one tiny study end to end (a tiny local model, seconds). The study file's validation:
test_study_load.py."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY_SCENARIO
from rapidun.compare import aggregate, hit_matrix, mean_diagnostics, paired_tests
from rapidun.config import dump_yaml, load_config
from rapidun.data.records import Record
from rapidun.diagnostics import seed_stability
from rapidun.errors import RapidunError
from rapidun.stats import compare_hits, holm
from rapidun.study import (
    METRICS,
    decision,
    run_study,
    select,
)
from rapidun.study import tests_by_split as regroup  # (not collected as a test)


def _r(diff: float, p: float, only_a: int = 3, only_b: int = 1, n_prompts: int = 20) -> dict:
    """One ``compare_hits``-shaped result."""
    return {
        "bootstrap": {"diff": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1, "n_prompts": n_prompts, "n_seeds": 2},
        "prompt_test": {"p": p, "n_prompts": n_prompts, "n_seeds": 2},
        "mcnemar": {"p": p / 4, "only_a": only_a, "only_b": only_b, "n_pairs": 40},
    }


RAW = {
    "a": {"vs": "ref", "asr_trig": _r(-0.2, 0.01), "asr_seen": _r(-0.1, 0.2), "asr_ood": _r(-0.3, 0.001),
          "false_trigger": _r(0.0, 1.0), "val_asr_trig": _r(-0.05, 0.5), "val_asr_seen": _r(0.0, 0.3),
          "val_asr_ood": _r(0.1, 0.04)},
    "b": {"vs": "ref", "asr_trig": _r(-0.1, 0.04), "asr_seen": _r(0.1, 0.3), "asr_ood": _r(0.0, 0.9),
          "val_asr_trig": _r(-0.3, 0.01), "val_asr_ood": _r(0.2, 0.01)},
    "c": {"vs": "ref", "asr_trig": _r(0.05, 0.03), "asr_seen": _r(0.0, 0.4), "asr_ood": _r(0.0, 0.05),
          "val_asr_trig": _r(-0.2, 0.02), "val_asr_seen": _r(-0.1, 0.06), "val_asr_ood": _r(0.0, 0.9)},
}  # fmt: skip


def test_tests_by_split_regroups_and_copies_the_fields():
    t = regroup(RAW)
    assert set(t) == {"val", "test"} and set(t["val"]) == set(t["test"]) == {"a", "b", "c"}
    assert set(t["test"]["a"]) == set(METRICS) == {"asr_trig", "asr_seen", "asr_ood"}  # false_trigger not paired
    assert set(t["val"]["b"]) == {"asr_trig", "asr_ood"}  # b has no val_asr_seen
    for split, prefix in (("val", "val_"), ("test", "")):
        for label, ms in t[split].items():
            for metric, r in ms.items():
                src = RAW[label][prefix + metric]
                assert r["diff"] == src["bootstrap"]["diff"] and r["p"] == src["prompt_test"]["p"]
                assert r["p_mcnemar"] == src["mcnemar"]["p"]
                assert (r["ci_low"], r["ci_high"]) == (src["bootstrap"]["ci_low"], src["bootstrap"]["ci_high"])
                assert (r["only_ref"], r["only_method"]) == (src["mcnemar"]["only_a"], src["mcnemar"]["only_b"])
                assert (r["n_prompts"], r["n_seeds"]) == (20, 2)


def test_tests_by_split_holm_over_labels_per_split_and_metric():
    t = regroup(RAW)
    # test asr_trig: p = .01, .04, .03 over a, b, c  →  .03, .06, .06 (by hand)
    assert [t["test"][lab]["asr_trig"]["p_holm"] for lab in "abc"] == pytest.approx([0.03, 0.06, 0.06])
    # val asr_seen: only a (.3) and c (.06) are in the family  →  m = 2: .12, max(.12, .3) = .3
    assert t["val"]["a"]["asr_seen"]["p_holm"] == pytest.approx(0.3)
    assert t["val"]["c"]["asr_seen"]["p_holm"] == pytest.approx(0.12)
    for split, prefix in (("val", "val_"), ("test", "")):
        for metric in METRICS:
            labels = [lab for lab in "abc" if prefix + metric in RAW[lab]]
            want = holm([RAW[lab][prefix + metric]["prompt_test"]["p"] for lab in labels])
            assert [t[split][lab][metric]["p_holm"] for lab in labels] == pytest.approx(want)
    # the families are separate: changing a val p moves no test p_holm
    other = json.loads(json.dumps(RAW))
    other["b"]["val_asr_trig"]["prompt_test"]["p"] = 0.9
    t2 = regroup(other)
    assert t2["test"] == t["test"] and t2["val"]["a"]["asr_trig"]["p_holm"] != t["val"]["a"]["asr_trig"]["p_holm"]
    assert regroup({}) == {"val": {}, "test": {}}


def _lab(val_asr, val_ppl, test_asr=0.5, test_ppl=10.0) -> dict:
    return {
        "val": {"mean": {"asr_trig": val_asr, "clean_ppl": val_ppl}},
        "test": {"mean": {"asr_trig": test_asr, "clean_ppl": test_ppl}},
    }


def test_select_lowest_validation_asr_within_the_limit():
    methods = {
        "uniform": _lab(0.30, 10.0, test_asr=0.0),  # the best test ASR: must not matter
        "over": _lab(0.05, 11.5),  # the lowest val ASR, over the limit
        "good": _lab(0.10, 10.9),
        "edge": _lab(0.20, 11.0),  # exactly at the limit: allowed
        "no_ppl": _lab(0.01, None),
        "no_asr": _lab(None, 9.0),
    }
    label, reason = select(methods, 11.0)
    assert label == "good"
    assert "0.100" in reason and "3 of 6 labels" in reason
    assert select({k: methods[k] for k in ("uniform", "edge")}, 11.0)[0] == "edge"
    # no limit (the poisoned model's perplexity unknown): the lowest val ASR wins, a missing ppl too
    assert select(methods, None)[0] == "no_ppl"


def test_select_none_when_no_label_qualifies():
    label, reason = select({"a": _lab(0.1, 20.0), "b": _lab(None, 1.0), "c": _lab(0.0, None)}, 11.0)
    assert label is None and "no label" in reason and "perplexity limit" in reason
    assert select({}, 11.0)[0] is None


def test_select_ties_go_to_the_reference_and_are_reported():
    methods = {"zeta": _lab(0.1, 10.0), "alpha": _lab(0.1, 10.0), "mid": _lab(0.2, 10.0)}
    # the reference (listed second) wins a tie: a variant must do strictly better to be chosen over it
    label, reason = select(methods, 11.0, "alpha")
    assert label == "alpha" and "tied with zeta" in reason and "mid" not in reason
    # the reference not among the tied labels (or none given): the first listed of them
    for ref in ("mid", "other", None):
        label, reason = select(methods, 11.0, ref)
        assert label == "zeta" and "tied with alpha" in reason and "mid" not in reason, ref
    # a strictly lower validation ASR beats the reference
    assert select({"uniform": _lab(0.2, 10.0), "r": _lab(0.19, 10.0)}, 11.0, "uniform")[0] == "r"
    # the reference over the limit cannot win a tie
    tied = {"uniform": _lab(0.1, 12.0), "r": _lab(0.1, 10.0), "s": _lab(0.1, 10.0)}
    assert select(tied, 11.0, "uniform") == ("r", select(tied, 11.0, None)[1])


def test_select_skips_a_nan_perplexity():
    label, reason = select({"diverged": _lab(0.0, math.nan), "ok": _lab(0.2, 10.0)}, 11.0)
    assert label == "ok" and "1 of 2 labels" in reason
    assert select({"diverged": _lab(0.0, math.nan)}, 11.0)[0] is None


def _t(diff: float, p_holm: float | None) -> dict:
    return {"diff": diff, "ci_low": diff - 0.05, "ci_high": diff + 0.05, "p": p_holm, "p_holm": p_holm}


def _sc(selected, test: dict | None = None, ppl: float = 10.0, lim: float | None = 11.0, reason: str = "why") -> dict:
    labels = {"uniform", *([selected] if selected else [])}
    return {
        "selected": selected,
        "selected_reason": reason,
        "ppl_limit": {"val": 11.0, "test": lim},
        "methods": {lab: {"test": {"mean": {"clean_ppl": ppl}}} for lab in labels},
        "tests": {"test": {selected: {"asr_trig": test}} if test else {}},
    }


def test_decision_text_for_every_case():
    study = {
        "reference": "uniform",
        "scenarios": {
            "s_win": _sc("rapidun_t2", _t(-0.25, 0.004)),
            "s_ns": _sc("coverage", _t(-0.05, 0.4)),
            "s_worse": _sc("rapidun", _t(0.1, 0.01)),
            "s_none": _sc(None, reason="no label has validation ASR within the validation perplexity limit"),
            "s_ref": _sc("uniform"),
            "s_untested": _sc("ga"),
        },
    }
    text = decision(study)
    assert "better" not in text.lower()
    lines = {k: next(s for s in text.split(". ") if s.startswith(k + ":")) for k in study["scenarios"]}
    assert "validation selects rapidun_t2" in lines["s_win"] and "-0.250 [-0.300, -0.200]" in lines["s_win"]
    assert (
        "Holm-adjusted p 0.004 (prompt-level sign-flip)" in lines["s_win"] and "10.00 (limit 11.00)" in lines["s_win"]
    )
    assert "lower ASR than the reference at matched utility" in lines["s_win"]
    assert "selects coverage" in lines["s_ns"] and lines["s_ns"].endswith(
        "not a significant difference from the reference"
    )
    # a significantly higher ASR is said as such (it was once reported as "not a significant difference")
    assert "selects rapidun" in lines["s_worse"] and "+0.100" in lines["s_worse"]
    assert "a significantly higher ASR than the reference" in lines["s_worse"]
    assert "nothing selected (no label has validation ASR" in lines["s_none"]
    assert "over the perplexity limit" not in text
    assert "selects the reference uniform itself" in lines["s_ref"]
    assert "selects ga; no paired test result" in lines["s_untested"]
    assert text.index("s_win:") < text.index("s_ns:") < text.index("s_untested:")  # scenario order kept


def test_decision_needs_utility_for_a_win():
    study = {"reference": "uniform", "scenarios": {"s": _sc("r", _t(-0.3, 0.001), ppl=12.0, lim=11.0)}}
    assert "matched utility" not in decision(study)


def test_decision_says_why_an_over_limit_win_is_not_one():
    text = decision({"reference": "uniform", "scenarios": {"s": _sc("r", _t(-0.3, 0.001), ppl=12.0, lim=11.0)}})
    assert text.endswith("12.00 (limit 11.00): a lower ASR, but over the perplexity limit.")
    assert "not a significant" not in text and "matched utility" not in text
    # not significant after Holm, over the limit: no claim of a lower ASR
    ns = decision({"reference": "uniform", "scenarios": {"s": _sc("r", _t(-0.3, 0.2), ppl=12.0, lim=11.0)}})
    assert ns.endswith(": not a significant difference from the reference.") and "lower ASR" not in ns


def test_decision_without_a_test_perplexity_limit():
    text = decision({"reference": "uniform", "scenarios": {"s": _sc("r", _t(-0.3, 0.001), lim=None)}})
    assert "selects r" in text and "test clean perplexity 10.00 (limit none)" in text
    assert text.endswith(": a lower ASR; utility not checked (no perplexity limit).")
    ns = decision({"reference": "uniform", "scenarios": {"s": _sc("r", _t(-0.3, 0.3), lim=None)}})
    assert "(limit none)" in ns and ns.endswith(": not a significant difference from the reference.")


# ---------------------------------------------------------------- compare helpers the study relies on


def test_mean_diagnostics_nested_and_non_numeric():
    per_seed = [
        {"ess": 2.0, "flag": True, "name": "x", "fam": {"a": 1.0, "b": 3.0}, "corr": None, "n": 4},
        None,
        {"ess": 4.0, "flag": False, "name": "y", "fam": {"a": 3.0, "c": 5.0}, "corr": 0.5, "n": 6},
        {},
    ]
    got = mean_diagnostics(per_seed)
    assert list(got) == ["ess", "flag", "name", "fam", "corr", "n"]  # first-seen order
    assert got["ess"] == 3.0 and got["n"] == 5.0 and got["corr"] == 0.5  # None values left out of the mean
    assert got["flag"] is None and got["name"] is None  # booleans and text are not averaged
    assert got["fam"] == {"a": 2.0, "b": 3.0, "c": 5.0}
    assert mean_diagnostics([None, {}]) is None and mean_diagnostics([]) is None
    deep = mean_diagnostics([{"v": {"x": {"y": 1.0}}}, {"v": {"x": {"y": 3.0}}}])
    assert deep == {"v": {"x": {"y": 2.0}}}
    assert mean_diagnostics([{"k": "a"}, {"k": 2}]) == {"k": 2.0}


def _agg_cell(rng: np.random.Generator, vectors: bool = True, diagnostics: bool = True) -> dict:
    from rapidun.compare import SCALARS

    c = {k: float(rng.random()) for k in SCALARS}
    c |= {"asr_seen_by_family": {}, "asr_ood_by_family": {}, "timings": {}, "cached": True}
    c["diagnostics"] = {"ess_forget": float(rng.random()), "fam": {"a": float(rng.random())}} if diagnostics else None
    if vectors:
        c["weight_vectors"] = {"forget": rng.random(6).tolist(), "retain": rng.random(5).tolist()}
    return c


def test_aggregate_diagnostics_and_weight_stability():
    rng = np.random.default_rng(0)
    cells = {s: _agg_cell(rng) for s in ("1", "2", "3")}
    vecs = [c["weight_vectors"] for c in cells.values()]
    ds = [c["diagnostics"] for c in cells.values()]
    agg = aggregate(cells, "x")
    d = agg["diagnostics"]
    assert d["ess_forget"] == pytest.approx(statistics.mean(x["ess_forget"] for x in ds))
    assert d["fam"]["a"] == pytest.approx(statistics.mean(x["fam"]["a"] for x in ds))
    for g in ("forget", "retain"):
        want = seed_stability([v[g] for v in vecs])
        assert d["weight_stability_spearman"][g] == pytest.approx(want)
    assert all("weight_vectors" not in c for c in agg["per_seed"].values())  # not carried into the report
    # one seed, or a seed without vectors, or no diagnostics: no stability figure
    assert "weight_stability_spearman" not in aggregate({"1": _agg_cell(rng)}, "x")["diagnostics"]
    two = {"1": _agg_cell(rng), "2": _agg_cell(rng, vectors=False)}
    assert "weight_stability_spearman" not in aggregate(two, "x")["diagnostics"]
    assert (
        aggregate({"1": _agg_cell(rng, diagnostics=False), "2": _agg_cell(rng, diagnostics=False)}, "x")["diagnostics"]
        is None
    )


def _gen(path: Path, rows: list[tuple[str, str, bool]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "split": s, "hit": h}) + "\n" for i, s, h in rows))
    return path


def test_hit_matrix_pools_two_splits_in_id_order(tmp_path):
    rows = [("s0", "test_seen_trig", True), ("s1", "test_seen_trig", False), ("o0", "test_ood_trig", True),
            ("c0", "test_clean", True)]  # fmt: skip
    f1 = _gen(tmp_path / "1.jsonl", rows)
    f2 = _gen(tmp_path / "2.jsonl", [(i, s, not h) for i, s, h in reversed(rows)])
    splits = ("test_seen_trig", "test_ood_trig")
    m = hit_matrix([f1, f2], splits, ["o0", "s1", "s0"])
    assert m.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    with pytest.raises(RapidunError, match=r"1\.jsonl.*c0"):
        hit_matrix([f1], splits, ["s0", "c0"])  # c0 is a test_clean prompt: not part of the pooled splits
    assert hit_matrix([f1], "test_clean", ["c0"]).tolist() == [[1.0]]


def _rows_of(hits: dict[str, np.ndarray]) -> list[tuple[str, str, bool]]:
    return [(f"{s}{i}", s, bool(h)) for s, hs in hits.items() for i, h in enumerate(hs)]


def test_paired_tests_metrics_and_val_splits_then_tests_by_split(tmp_path):
    rng = np.random.default_rng(2)
    sizes = {"test_seen_trig": 7, "test_ood_trig": 5, "test_clean": 4, "val_seen_trig": 6, "val_ood_trig": 3}
    parts = {s: [Record(id=f"{s}{i}", instruction="q", response="a") for i in range(n)] for s, n in sizes.items()}
    hits = {m: [{s: rng.random(n) < 0.5 for s, n in sizes.items()} for _ in range(2)] for m in ("ref", "x", "y")}
    files = {m: [_gen(tmp_path / m / f"{k}.jsonl", _rows_of(d)) for k, d in enumerate(ds)] for m, ds in hits.items()}
    metrics = ("asr_trig", "val_asr_trig", "val_asr_seen")
    raw = paired_tests(parts, files, "ref", 50, metrics)
    assert set(raw) == {"x", "y"} and set(raw["x"]) == {"vs", *metrics}

    def mat(m, splits):
        return np.array([[float(h) for s in splits for h in d[s]] for d in hits[m]])

    for m in ("x", "y"):
        for metric, splits in (("asr_trig", ("test_seen_trig", "test_ood_trig")),
                               ("val_asr_trig", ("val_seen_trig", "val_ood_trig"))):  # fmt: skip
            want = compare_hits(mat("ref", splits), mat(m, splits), n_boot=50, seed=0)
            assert raw[m][metric] == want
            assert want["bootstrap"]["n_prompts"] == sum(sizes[s] for s in splits)
    # a scenario without validation splits: the val metrics are just absent
    no_val = {k: v for k, v in parts.items() if not k.startswith("val_")}
    assert set(paired_tests(no_val, files, "ref", 20, metrics)["x"]) == {"vs", "asr_trig"}
    t = regroup(raw)
    assert set(t["val"]["x"]) == {"asr_trig", "asr_seen"} and set(t["test"]["x"]) == {"asr_trig"}
    ps = [raw[m]["val_asr_seen"]["prompt_test"]["p"] for m in ("x", "y")]
    assert [t["val"][m]["asr_seen"]["p_holm"] for m in ("x", "y")] == pytest.approx(holm(ps))


# ---------------------------------------------------------------- one tiny study end to end


TINY = [*TINY_SCENARIO, "eval.batch_size=8"]
STUDY = """\
study: {reference: uniform, n_seeds: 2, n_boot: 20}
scenarios:
  - {name: tiny, config: run.yaml}
methods:
  - uniform
  - rapidun
  - {label: uniform_lr2, method: uniform, overrides: [unlearn.lr=2e-2]}
"""


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A tiny poisoned-model study (tiny local Llama, 30 records, 3 labels × 2 seeds), run twice; the second run
    must reuse everything. Returns (root, first study, second study, cells run per call, metrics.json mtimes)."""
    import rapidun.study as study_mod
    from helpers import tiny_world
    from test_unlearn_e2e import OVERRIDES

    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        model_dir, data = tiny_world(root)
        cfg = load_config(None, [*OVERRIDES, *TINY, f"model.name={model_dir}", f"data.source={data}"])
        (root / "run.yaml").write_text(dump_yaml(cfg))
        (root / "study.yaml").write_text(STUDY)
        calls: list[list[tuple[str, str, bool]]] = []
        real = study_mod.run_cell

        def spy(*args, **kw):
            entry = real(*args, **kw)
            calls[-1].append((kw["label"], str(args[3]), entry["cached"]))
            return entry

        mp.setattr(study_mod, "run_cell", spy)
        out = root / "out"
        calls.append([])
        first = run_study(root / "study.yaml", out)
        mtimes = {str(p): p.stat().st_mtime_ns for p in sorted(out.rglob("metrics.json"))}
        calls.append([])
        second = run_study(root / "study.yaml", out, only=["tiny"])
        after = {str(p): p.stat().st_mtime_ns for p in sorted(out.rglob("metrics.json"))}
        yield root, first, second, calls, (mtimes, after)


def test_tiny_study_end_to_end_and_rerun_reuses_every_cell(tiny_study):
    root, study, again, calls, (mtimes, after) = tiny_study
    out = root / "out"
    for name in ("study.json", "study.md", "study.html"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "study.json").read_text())  # strict JSON
    assert on_disk["schema"] == "rapidun.study/1" and on_disk["reference"] == "uniform"
    assert on_disk["seeds"] == [4, 5] and list(on_disk["scenarios"]) == ["tiny"]
    sc = study["scenarios"]["tiny"]
    assert sc["sizes"]["val_seen_trig"] == 3 and sc["sizes"]["test_ood_trig"] == 3
    assert list(sc["methods"]) == ["uniform", "rapidun", "uniform_lr2"]
    for label, m in sc["methods"].items():
        assert m["n_seeds"] == 2
        for split in ("val", "test"):
            mu = m[split]["mean"]
            assert 0 <= mu["asr_trig"] <= 1 and 0 <= mu["asr_seen"] <= 1 and mu["clean_ppl"] > 1, (label, split)
        for s in ("4", "5"):
            cell = out / "tiny" / "seeds" / s / "methods" / label
            assert (cell / "metrics.json").is_file() and (cell / "weights.jsonl").is_file()
            gens = (out / "tiny" / "seeds" / s / "eval" / f"{label}.generations.jsonl").read_text().splitlines()
            assert {json.loads(g)["split"] for g in gens} >= {"val_seen_trig", "val_ood_trig", "test_seen_trig"}
    assert sc["methods"]["uniform_lr2"]["overrides"] == ["unlearn.lr=2e-2"]
    assert sc["methods"]["rapidun"]["diagnostics"]["ess_forget"] > 0
    assert set(sc["methods"]["rapidun"]["diagnostics"]["weight_stability_spearman"]) == {"forget", "retain"}
    assert sc["models"]["poisoned"]["val"]["clean_ppl"] > 1
    assert sc["ppl_limit"]["val"] == pytest.approx(1.10 * sc["models"]["poisoned"]["val"]["clean_ppl"])
    # paired tests: every label but the reference, on both splits, Holm over the two labels
    for split in ("val", "test"):
        assert set(sc["tests"][split]) == {"rapidun", "uniform_lr2"}
        for metric in ("asr_trig", "asr_seen", "asr_ood"):
            ps = [sc["tests"][split][lab][metric]["p"] for lab in ("rapidun", "uniform_lr2")]
            got = [sc["tests"][split][lab][metric]["p_holm"] for lab in ("rapidun", "uniform_lr2")]
            assert got == pytest.approx(holm(ps))
    t = sc["tests"]["test"]["rapidun"]["asr_trig"]
    assert t["p_holm"] is not None and t["n_prompts"] == 6 and t["n_seeds"] == 2
    assert sc["selected"] in sc["methods"] and sc["selected"] in study["decision"]
    assert "better" not in study["decision"].lower()
    # the rerun: every (label, seed) cell reused, nothing rewritten, the same figures
    assert sorted(calls[0]) == sorted((lab, s, False) for lab in sc["methods"] for s in ("4", "5"))
    assert sorted(calls[1]) == sorted((lab, s, True) for lab in sc["methods"] for s in ("4", "5"))
    assert len(mtimes) == 6 and after == mtimes
    assert again["only"] == ["tiny"]
    assert again["scenarios"]["tiny"]["methods"] == sc["methods"]
    assert again["scenarios"]["tiny"]["tests"] == sc["tests"]
    assert again["decision"] == study["decision"]


def test_adding_a_label_to_a_finished_study_reuses_its_cells(tiny_study, tmp_path):
    root, study, _, _, _ = tiny_study
    shutil.copytree(root / "out", tmp_path / "out")
    shutil.copy(root / "run.yaml", tmp_path / "run.yaml")
    text = STUDY.replace("  - rapidun\n", "  - rapidun\n  - ga\n").replace("  - uniform\n", "", 1) + "  - uniform\n"
    (tmp_path / "study.yaml").write_text(text)
    assert yaml.safe_load(text)["methods"][-1] == "uniform"  # reordered and extended
    more = run_study(tmp_path / "study.yaml", tmp_path / "out")
    assert set(more["scenarios"]["tiny"]["methods"]) == {"uniform", "rapidun", "ga", "uniform_lr2"}
    assert more["scenarios"]["tiny"]["methods"]["rapidun"] == study["scenarios"]["tiny"]["methods"]["rapidun"]
