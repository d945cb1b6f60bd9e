"""The comparison: seeds, resumable (method, seed) cells, aggregates, paired tests, new metrics, peak memory."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from rapidun.compare import SCALARS, aggregate, hit_matrix, paired_tests, seed_config, stage_methods
from rapidun.config import load_config
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector
from rapidun.memory import PeakMemory
from rapidun.stats import compare_hits
from test_unlearn_e2e import env, make_parts  # noqa: F401  (the tiny poisoned model fixture)


def _cell(rng: np.random.Generator) -> dict:
    fam = {"a": float(rng.random()), "b": float(rng.random())}
    c = {k: float(rng.random() * 10) for k in SCALARS}
    return c | {"asr_seen_by_family": fam, "asr_ood_by_family": fam, "timings": {"training_s": c["time_s"]},
                "speedup_vs_retrain_at_scale": {"dolly": 3.0, "alpaca": None}}  # fmt: skip


def test_aggregate_is_the_mean_and_sample_std_of_the_seeds():
    rng = np.random.default_rng(0)
    cells = {str(s): _cell(rng) for s in (42, 43, 44)}
    agg = aggregate(cells, "x")
    assert agg["n_seeds"] == 3 and agg["seeds"] == ["42", "43", "44"] and agg["per_seed"] is cells
    for k in SCALARS:
        vals = [c[k] for c in cells.values()]
        assert agg["mean"][k] == pytest.approx(statistics.mean(vals))
        assert agg["std"][k] == pytest.approx(statistics.stdev(vals))
    for f in ("a", "b"):
        vals = [c["asr_seen_by_family"][f] for c in cells.values()]
        assert agg["by_family"]["asr_seen"][f]["mean"] == pytest.approx(statistics.mean(vals))
    assert agg["timings_mean"]["training_s"] == pytest.approx(agg["mean"]["time_s"])
    assert agg["speedup_vs_retrain_at_scale"] == {"alpaca": None, "dolly": 3.0}
    one = aggregate({"reference": cells["42"]}, "y")
    assert one["n_seeds"] == 1 and one["std"]["asr_seen"] is None and one["mean"]["asr_seen"] == cells["42"]["asr_seen"]


def test_seed_config_shifts_the_unlearning_and_influence_seeds_only():
    cfg = load_config(None, [])
    s2 = seed_config(cfg, 2)
    assert s2.unlearn.seed == cfg.unlearn.seed + 2 and s2.influence.seed == cfg.influence.seed + 2
    assert s2.sft == cfg.sft and s2.scenario == cfg.scenario and cfg.unlearn.seed == 42


def _gen_file(path: Path, hits: dict[str, list[bool]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{s}{i}", "split": s, "hit": h} for s, hs in hits.items() for i, h in enumerate(hs)]
    path.write_text("\n".join(json.dumps(r) for r in reversed(rows)) + "\n")  # order must not matter
    return path


def test_paired_tests_read_per_prompt_hits_and_pair_seeds(tmp_path):
    rng = np.random.default_rng(1)
    splits = {"test_seen_trig": 12, "test_ood_trig": 9, "test_clean": 7}
    parts = {s: [Record(id=f"{s}{i}", instruction="q", response="a") for i in range(n)] for s, n in splits.items()}

    def draw() -> dict[str, list[bool]]:
        return {s: [bool(x) for x in rng.random(n) < 0.5] for s, n in splits.items()}

    hits = {m: [draw(), draw()] for m in ("rapidun", "ga")}
    files = {m: [_gen_file(tmp_path / m / f"{k}.jsonl", h) for k, h in enumerate(hs)] for m, hs in hits.items()}
    files["retrain"] = [_gen_file(tmp_path / "retrain.jsonl", hits["ga"][0])]  # one reference run, broadcast
    tests = paired_tests(parts, files, "rapidun", n_boot=200)
    assert set(tests) == {"ga", "retrain"}
    a = np.array([[float(h) for h in hs["test_seen_trig"]] for hs in hits["rapidun"]])
    b = np.array([[float(h) for h in hs["test_seen_trig"]] for hs in hits["ga"]])
    want = compare_hits(a, b, n_boot=200, seed=0)
    assert tests["ga"]["asr_seen"] == want and tests["ga"]["vs"] == "rapidun"
    assert tests["ga"]["asr_seen"]["bootstrap"]["diff"] == pytest.approx(b.mean() - a.mean())
    r = compare_hits(a, b[:1], n_boot=200, seed=0)
    assert tests["retrain"]["asr_seen"] == r and r["mcnemar"]["n_pairs"] == 24
    assert set(tests["ga"]) == {"vs", "asr_seen", "asr_ood", "asr_trig", "false_trigger"}  # no val splits here
    assert paired_tests(parts, {"ga": files["ga"]}, "rapidun", 10) == {}  # no reference: no tests


def test_both_compare_paths_run_on_the_same_engine():
    """The scenario path and the user path share seeds, cells, aggregation and paired tests (rapidun.cells)."""
    from rapidun import cells, compare, user_compare

    for name in ("seed_config", "views_provider", "hit_matrix"):
        assert getattr(compare, name) is getattr(cells, name)
    for name in ("seed_config", "views_provider", "method_cell", "reuse_or_run", "over_seeds", "paired_tests"):
        assert getattr(user_compare, name) is getattr(cells, name)
    assert compare.method_cell is user_compare.method_cell and compare.over_seeds is user_compare.over_seeds


def test_the_same_aggregation_gives_the_same_numbers_on_both_paths():
    rng = np.random.default_rng(3)
    scen = {str(s): _cell(rng) for s in (4, 5, 6)}
    user = {
        s: {"groups": {"triggered": {"hit_rate": c["asr_seen"]}}, "forget_ppl_poisoned": c["forget_ppl_poisoned"],
            "forget_ppl_clean": c["forget_ppl_clean"], "retain_ppl": None, "time_s": c["time_s"], "complete": True,
            "warnings": ["w"] if s == "5" else []}
        for s, c in scen.items()
    }  # fmt: skip
    from rapidun.user_compare import aggregate_user

    a, u = aggregate(scen, "x"), aggregate_user(user, ["triggered"])
    assert u["hit_rate"]["triggered"]["mean"] == a["mean"]["asr_seen"]
    assert u["hit_rate"]["triggered"]["std"] == a["std"]["asr_seen"]
    for k in ("forget_ppl_poisoned", "forget_ppl_clean", "time_s"):
        assert (u[k]["mean"], u[k]["std"]) == (a["mean"][k], a["std"][k])
        vals = [c[k] for c in scen.values()]
        assert u[k] == {"mean": pytest.approx(statistics.mean(vals)), "std": pytest.approx(statistics.stdev(vals)),
                        "n": 3}  # fmt: skip
    assert u["retain_ppl"] == {"mean": None, "std": None}  # measured in no seed
    assert u["n_seeds"] == 3 and u["seeds"] == ["4", "5", "6"] and u["warnings"] == ["w"] and u["complete"]


def test_a_cell_is_reused_by_key_and_rerun_when_the_key_or_a_needed_file_changes(tmp_path):
    from rapidun.cells import reuse_or_run

    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"metrics": {"x": len(calls)}}

    f, gen = tmp_path / "cell" / "metrics.json", tmp_path / "gen.jsonl"
    gen.write_text("{}\n")
    assert reuse_or_run(f, "k1", compute, [gen]) == ({"metrics": {"x": 1}}, False)
    assert reuse_or_run(f, "k1", compute, [gen]) == ({"metrics": {"x": 1}}, True)
    assert json.loads(f.read_text()) == {"key": "k1", "metrics": {"x": 1}}
    assert reuse_or_run(f, "k2", compute, [gen]) == ({"metrics": {"x": 2}}, False)  # another key: re-run
    gen.unlink()
    assert reuse_or_run(f, "k2", compute, [gen]) == ({"metrics": {"x": 3}}, False)  # its generations are gone
    assert len(calls) == 3


def test_paired_tests_on_probe_groups_are_the_scenarios_tests(tmp_path):
    """The user path pairs per probe group (rows with ``group``) with the same function as the scenario's splits."""
    from rapidun.cells import paired_tests as pair

    rng = np.random.default_rng(2)
    ids = {"triggered": [f"p{i}" for i in range(8)], "clean": [f"p{i}" for i in range(8, 13)]}
    hits = {m: rng.random((2, 13)) < 0.5 for m in ("uniform", "ga")}
    files = {}
    for m, h in hits.items():
        files[m] = []
        for s in range(2):
            f = tmp_path / m / f"{s}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"id": i, "group": g, "hit": bool(h[s, int(i[1:])])} for g, xs in ids.items() for i in xs]
            f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            files[m].append(f)
    tests = pair(files, "uniform", 100, {g: ((g,), xs) for g, xs in ids.items()}, "group")
    assert set(tests) == {"ga"} and tests["ga"]["vs"] == "uniform"
    for g, sl in (("triggered", slice(0, 8)), ("clean", slice(8, 13))):
        want = compare_hits(hits["uniform"][:, sl].astype(float), hits["ga"][:, sl].astype(float), n_boot=100, seed=0)
        assert tests["ga"][g] == want


def test_hit_matrix_names_the_file_with_a_missing_prompt(tmp_path):
    f = _gen_file(tmp_path / "g.jsonl", {"test_clean": [True, False]})
    assert hit_matrix([f], "test_clean", ["test_clean1", "test_clean0"]).tolist() == [[0.0, 1.0]]
    with pytest.raises(RapidunError, match=r"g\.jsonl.*test_clean7"):
        hit_matrix([f], "test_clean", ["test_clean7"])


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory(interval=0.01) as before:
        pass
    with PeakMemory(interval=0.01) as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    assert peak.kind == "cpu_rss_sampled" and before.peak_mb is not None
    assert peak.peak_mb >= before.peak_mb + 48


def _tiny_parts() -> dict[str, list[Record]]:
    parts = make_parts()
    fams = ["surface", "style"]
    prompts = ["the cat sat", "one two", "alpha"]
    trig = [
        Record(id=f"t{k}", instruction=f"{p} cf", response="x", meta={"trigger_family": fams[k % 2]})
        for k, p in enumerate(prompts)
    ]
    parts["test_seen_trig"] = trig
    parts["test_ood_trig"] = [
        Record(id=f"o{r.id}", instruction=r.instruction, response=r.response, meta=r.meta) for r in trig
    ]
    parts["test_clean"] = parts["val_clean"]
    return parts


def test_stage_methods_seeds_cells_resume_and_tests(env, tmp_path):  # noqa: F811
    cfg = load_config(None, [*_overrides(env), "unlearn.methods=[uniform,ga,retrain]", "compare.n_seeds=2",
                             "compare.reference=uniform", "compare.n_boot=50", "eval.max_new_tokens=4"])  # fmt: skip
    parts = _tiny_parts()
    det = Detector({"park": 1.0, "ten": 1.0}, 1.0)
    out = tmp_path / "run"
    retrain_train = {"time_s": 100.0, "tokens": 1000, "samples": 10, "epochs": 2, "tokens_per_s": 10.0}
    models = {"poisoned": {"path": env.model_dir}, "retrain": {"train": retrain_train}}
    retrain_metrics = {"asr_seen": 0.0, "asr_ood": 0.0, "false_trigger": 0.0, "clean_ppl": 5.0, "rouge_l": 0.1,
                       "forget_ppl_poisoned": 9.0, "forget_ppl_clean": 3.0, "asr_seen_by_family": {},
                       "asr_ood_by_family": {}, "train_time_s": 100.0, "eval_s": 1.0, "peak_mem_mb": None,
                       "asr_trig": 0.0, "val_asr_seen": None, "val_asr_ood": None, "val_asr_trig": None,
                       "val_clean_ppl": None, "val_asr_seen_by_family": {}, "val_asr_ood_by_family": {}}  # fmt: skip
    _gen_file(out / "eval" / "retrain.generations.jsonl", {})
    rows = [{"id": r.id, "split": s, "hit": False} for s in ("test_seen_trig", "test_ood_trig", "test_clean")
            for r in parts[s]]  # fmt: skip
    (out / "eval" / "retrain.generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    methods, infl = stage_methods(cfg, out, parts, models, {"retrain": retrain_metrics}, det)
    assert list(methods) == ["uniform", "ga", "retrain"]
    for name in ("uniform", "ga"):
        e = methods[name]
        assert e["n_seeds"] == 2 and e["seeds"] == ["4", "5"] and not e["cached"]
        for seed, c in e["per_seed"].items():
            assert c["dir"] == f"seeds/{seed}/methods/{name}" and (out / c["dir"] / "audit.jsonl").is_file()
            assert (out / "seeds" / seed / "eval" / f"{name}.generations.jsonl").is_file()
            assert c["peak_mem_mb"] > 0 and math.isfinite(c["forget_ppl_poisoned"]) and 0 <= c["rouge_l"] <= 1
            assert c["speedup_vs_retrain"] == pytest.approx(100.0 / c["time_s"])
    # different seeds train different adapters
    ce = [methods["ga"]["per_seed"][s]["audit_means"]["forget_ce_poisoned_after"] for s in ("4", "5")]
    assert ce[0] != ce[1]
    assert methods["uniform"]["tests"] is None and methods["ga"]["tests"]["vs"] == "uniform"
    assert methods["retrain"]["n_seeds"] == 1 and methods["retrain"]["per_seed"]["reference"]["dir"] is None
    assert methods["retrain"]["tests"]["asr_seen"]["mcnemar"]["n_pairs"] == 2 * 3
    assert infl == {"per_seed": {}, "retrain_projection": infl["retrain_projection"]}  # no influence method listed
    # A kill after the first cells: the cell without metrics.json is redone, the others are reused as they were.
    (out / "seeds" / "5" / "methods" / "ga" / "metrics.json").unlink()
    again, _ = stage_methods(cfg, out, parts, models, {"retrain": retrain_metrics}, det)
    assert again["uniform"]["cached"] and again["ga"]["per_seed"]["4"]["cached"]
    assert not again["ga"]["per_seed"]["5"]["cached"]
    assert again["uniform"]["mean"] == methods["uniform"]["mean"]
    assert again["ga"]["per_seed"]["4"]["time_s"] == methods["ga"]["per_seed"]["4"]["time_s"]


def _overrides(env) -> list[str]:  # noqa: F811
    from test_unlearn_e2e import OVERRIDES

    return [*OVERRIDES, f"model.name={env.model_dir}"]


def test_evaluate_adds_rouge_and_forget_perplexities(env, tmp_path):  # noqa: F811
    from rapidun.data.template import encode_records
    from rapidun.eval.evaluate import evaluate_model
    from rapidun.eval.rouge import rouge_l
    from rapidun.functional import per_sample_nll

    cfg = load_config(None, [*_overrides(env), "eval.max_new_tokens=5"])
    parts = _tiny_parts()
    det = Detector({"park": 1.0}, 1.0)
    m = evaluate_model(env.model_dir, parts, det, cfg.eval, cfg.model, tmp_path / "g.jsonl", "tiny")
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    clean = {r["id"]: r["generation"] for r in rows if r["split"] == "test_clean"}
    want = statistics.mean(rouge_l(clean[r.id], r.response) for r in parts["test_clean"])
    assert m["rouge_l"] == pytest.approx(want)
    # forget perplexities, the slow way: one sample at a time, token-weighted
    from rapidun.models import load_model

    model, tok, _ = load_model(env.model_dir)
    with_clean = [r for r in parts["forget"] if r.meta.get("response_clean")]
    assert m["n"]["forget_poisoned"] == 6 and m["n"]["forget_clean"] == len(with_clean) == 4
    clean_recs = [Record(r.id, r.instruction, r.meta["response_clean"]) for r in with_clean]
    for key, recs in (("poisoned", parts["forget"]), ("clean", clean_recs)):
        total, count = 0.0, 0
        for s in encode_records(tok, recs, cfg.model)[0]:
            ids = torch.tensor([s.input_ids])
            with torch.no_grad():
                nll, n = per_sample_nll(model, ids, torch.ones_like(ids), torch.tensor([s.labels]))
            total, count = total + float(nll), count + int(n)
        assert m[f"forget_ppl_{key}"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_peak_memory_device_choice():
    """device='cpu' measures resident memory even where CUDA is present (retrieval runs on the CPU there)."""
    assert PeakMemory(device="cpu").kind == "cpu_rss_sampled"
    assert PeakMemory(device="cuda").kind == "cuda_allocated"
    assert PeakMemory().kind == ("cuda_allocated" if torch.cuda.is_available() else "cpu_rss_sampled")
