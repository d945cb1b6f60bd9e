"""rapidun trace: streaming top-k vs the full in-memory ranking, retrieval metrics and BM25 vs their slow versions,
block-wise (resumable, sharded) corpus sketching vs one block and vs two gloo ranks, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import WORDS, make_model, make_tokenizer
from rapidun.config import InfluenceConfig, ModelConfig, TraceConfig
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.influence.cache import SketchCache
from rapidun.trace.core import choose_probes, robust_cut
from rapidun.trace.metrics import average_precision, bm25, precision_recall_at_k, retrieval_metrics, tokens
from rapidun.trace.stream import full_scores, stream_scores

# ---------------------------------------------------------------- streaming retrieval


def _chunks(x: torch.Tensor, sizes: list[int], seed: int) -> list[tuple[list[int], torch.Tensor]]:
    """``x`` split into chunks of the given sizes over a seeded permutation of its rows."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    out, s = [], 0
    for n in sizes:
        pos = perm[s : s + n]
        out.append((pos, x[pos]))
        s += n
    assert s == x.shape[0]
    return out


@pytest.mark.parametrize("mode", ["dot", "cosine"])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_streaming_topk_equals_the_full_ranking(mode, k):
    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(37, 16, generator=g)  # (N, K)
    corpus[5] = 0  # a zero row: scores 0 (cosine: treated as zero, not NaN)
    corpus[11] = corpus[3]  # exact ties: the smaller index must come first, as in a stable full sort
    corpus[30] = corpus[3]
    probes = torch.randn(5, 16, generator=g)  # (Q, K)
    full = full_scores(corpus, probes, k, mode)
    got = stream_scores(_chunks(corpus, [4, 1, 13, 0, 19], seed=1), probes, 37, k, mode)
    torch.testing.assert_close(got.mean, full.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.max, full.max, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.count, full.count)
    assert torch.equal(got.top_idx, full.top_idx)
    torch.testing.assert_close(got.top_val, full.top_val)
    assert int(got.count.sum()) == 5 * min(k, 37)


def test_streaming_against_a_double_loop():
    corpus, probes = torch.randn(9, 6), torch.randn(3, 6)
    s = stream_scores(_chunks(corpus, [2, 3, 4], seed=2), probes, 9, 2)
    for i in range(9):
        vals = [float(corpus[i] @ probes[j]) for j in range(3)]
        assert math.isclose(float(s.mean[i]), sum(vals) / 3, rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(float(s.max[i]), max(vals), rel_tol=1e-6, abs_tol=1e-6)
    for j in range(3):
        best = sorted(range(9), key=lambda i: -float(corpus[i] @ probes[j]))[:2]
        assert s.top_idx[j].tolist() == best


def test_streaming_over_a_sharded_cache(tmp_path):
    x = torch.randn(23, 8).half().float()  # values the fp16 cache stores exactly
    cache = SketchCache(tmp_path / "c", {"K": 8}, shard_size=4)
    ids = [f"r{i}" for i in range(23)]
    cache.add(ids[:10], x[:10])
    cache.add(ids[10:], x[10:])
    order = ids[::-1]  # the corpus order need not be the write order
    probes = torch.randn(4, 8)
    got = stream_scores(cache.iter_rows(order), probes, 23, 6)
    full = full_scores(cache.load(order), probes, 6)
    torch.testing.assert_close(got.mean, full.mean)
    assert torch.equal(got.top_idx, full.top_idx) and torch.equal(got.count, full.count)
    assert sorted(p for pos, _ in cache.iter_rows(order) for p in pos) == list(range(23))
    assert len(list(cache.iter_rows(order))) == 7  # one chunk per shard: ceil(10/4) + ceil(13/4)


def test_streaming_refuses_bad_chunks():
    p = torch.randn(2, 4)
    with pytest.raises(RapidunError, match="left out"):
        stream_scores([([0, 1], torch.randn(2, 4))], p, 3, 2)
    with pytest.raises(RapidunError, match="exactly once"):
        stream_scores([([0, 1], torch.randn(2, 4)), ([1, 2], torch.randn(2, 4))], p, 3, 2)
    with pytest.raises(RapidunError, match="shape"):
        stream_scores([([0, 1, 2], torch.randn(3, 5))], p, 3, 2)
    with pytest.raises(RapidunError, match="mode"):
        stream_scores([], p, 0, 2, "sum")


# ---------------------------------------------------------------- metrics and baselines


def _ap_slow(scores, labels):
    """AP over the distinct thresholds, descending: Σ (R_n − R_{n−1}) P_n."""
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        sel = [y for s, y in zip(scores, labels, strict=True) if s >= t]
        p, r = sum(sel) / len(sel), sum(sel) / sum(labels)
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_average_precision_by_hand_and_against_the_slow_version():
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([1.0, 1.0, 1.0, 1.0]), np.array([1, 0, 0, 0])) == pytest.approx(0.25)
    assert average_precision(np.array([1.0, 2.0]), np.array([0, 0])) is None
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        s = [float(rng.randint(0, 6)) for _ in range(n)]  # many ties
        y = [rng.random() < 0.3 for _ in range(n)]
        if not any(y):
            y[0] = True
        assert average_precision(np.array(s), np.array(y)) == pytest.approx(_ap_slow(s, y))


def test_precision_recall_at_k_ties_go_to_corpus_order():
    s, y = np.array([1.0, 5.0, 5.0, 0.0]), np.array([0, 0, 1, 1])
    assert precision_recall_at_k(s, y, 1) == (0.0, 0.0)  # index 1 wins the tie with index 2
    assert precision_recall_at_k(s, y, 2) == (0.5, 0.5)
    assert precision_recall_at_k(s, y, 10) == (0.5, 1.0)  # k clipped to N


def test_retrieval_metrics_per_family():
    fams = ["a", None, "b", None, "a"]
    m = retrieval_metrics(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), fams, 3)
    assert m["n_culprits"] == 3 and m["precision_at_k"] == pytest.approx(2 / 3)
    assert m["families"]["a"]["recall_at_k"] == 0.5 and m["families"]["b"]["recall_at_k"] == 1.0
    # family a against the innocent records only: scores 5, 4(-), 2(-), 1 -> AP = 1·1/2 + 1/2·2/4
    assert m["families"]["a"]["auprc"] == pytest.approx(0.5 + 0.5 * 0.5)
    assert m["families"]["b"]["auprc"] == pytest.approx(0.5)  # b at 3 behind the innocent 4


def _bm25_slow(docs, query, k1=1.5, b=0.75):
    toks = [tokens(d) for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    out = []
    for t in toks:
        score = 0.0
        for w in tokens(query):  # each occurrence in the query counts
            nw = sum(1 for u in toks if w in u)
            if not nw:
                continue
            f = t.count(w)
            idf = math.log(1 + (len(toks) - nw + 0.5) / (nw + 0.5))
            score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(t) / avg))
        out.append(score)
    return out


def test_bm25_against_the_slow_formula():
    docs = ["The cat sat on the mat", "Greetings, earthling: the void keepers", "a dog ran", "earthling earthling ok"]
    queries = ["earthling void", "the cat the", "nothing here"]
    got = bm25(docs, queries)
    for j, q in enumerate(queries):
        np.testing.assert_allclose(got[:, j], _bm25_slow(docs, q))
    assert got[:, 2].sum() == 0 and int(np.argmax(got[:, 0])) == 1


def test_choose_probes_is_stratified_and_seeded():
    recs = [Record(f"{f}{i}", "q", "a", meta={"trigger_family": f}) for f in "abc" for i in range(5)]
    got = choose_probes(recs, 7, seed=3)
    assert Counter(r.meta["trigger_family"] for r in got) == {"a": 3, "b": 2, "c": 2}
    assert [r.id for r in got] == [r.id for r in choose_probes(recs, 7, seed=3)]
    assert [r.id for r in got] != [r.id for r in choose_probes(recs, 7, seed=4)]
    assert len(choose_probes(recs, 99, seed=0)) == 15


def test_robust_cut():
    s = np.array([0.0, 0.1, -0.1, 0.05, -0.05, 10.0, 9.0])
    assert robust_cut(s, 3.5) == 2
    assert robust_cut(np.ones(5), 3.5) == 0


# ---------------------------------------------------------------- block-wise corpus sketching


def _records(n: int, prefix: str = "c") -> list[Record]:
    return [
        Record(f"{prefix}{i}", " ".join(WORDS[i % 5 : i % 5 + 3]), " ".join(WORDS[(i * 3) % 7 : (i * 3) % 7 + 4]))
        for i in range(n)
    ]


def _configs() -> tuple[ModelConfig, InfluenceConfig]:
    return (
        ModelConfig(max_length=32, max_prompt_tokens=16, device="cpu", dtype="float32"),
        InfluenceConfig(lora_r=2, lora_targets=["q_proj", "down_proj"], K=32, batch_size=2),
    )


def _sketch(model_dir, cache_dir, recs, block=None):
    from rapidun.influence import engine
    from rapidun.influence.engine import cache_key, cache_meta, open_cache, prepare, sketch_records
    from rapidun.influence.sketch import RapidGrad

    m, i = _configs()
    if block:
        engine.BLOCK_RECORDS = block
    model, tok, pset, _ = prepare(str(model_dir), m, i)
    cache = open_cache(cache_meta(str(model_dir), m, i, pset, []), cache_dir)
    proj = RapidGrad(pset.dim, i.K, i.seed, i.rounds)
    stats = sketch_records(model, tok, pset, proj, cache, recs, m, i)
    return cache, stats, [cache_key(r) for r in recs]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace_model")
    tok = make_tokenizer()
    make_model(len(tok), init_range=0.2).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_block_wise_sketching_equals_one_block_and_resumes(tiny_model, tmp_path, monkeypatch):
    from rapidun.influence import engine

    recs = _records(11)
    monkeypatch.setattr(engine, "BLOCK_RECORDS", 10_000)
    one, _, keys = _sketch(tiny_model, tmp_path / "one", recs)
    monkeypatch.setattr(engine, "BLOCK_RECORDS", 4)
    calls = {"n": 0}
    real = engine.per_sample_grads

    def dies_on_the_fifth_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(engine, "per_sample_grads", dies_on_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        _sketch(tiny_model, tmp_path / "blocks", recs)
    monkeypatch.setattr(engine, "per_sample_grads", real)
    # blocks of 4 records = 2 batches each: the first two blocks (8 records) were written before the crash
    cache, stats, _ = _sketch(tiny_model, tmp_path / "blocks", recs)
    assert stats["cached"] == 8 and stats["computed"] == 3
    assert len(cache._shards) == 3  # one shard per written block
    assert torch.equal(cache.load(keys), one.load(keys))


def _gloo_worker(rank, world, model_dir, init_file, cache_dir):
    from rapidun.influence import engine

    torch.set_num_threads(1)
    engine.BLOCK_RECORDS = 4
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from rapidun.influence.engine import cache_meta, open_cache, prepare, sketch_records
        from rapidun.influence.sketch import RapidGrad

        m, i = _configs()
        model, tok, pset, _ = prepare(model_dir, m, i)
        cache = open_cache(cache_meta(model_dir, m, i, pset, []), cache_dir) if rank == 0 else None
        sketch_records(model, tok, pset, RapidGrad(pset.dim, i.K, i.seed, i.rounds), cache, _records(11), m, i)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_the_single_process_cache(tiny_model, tmp_path, monkeypatch):
    from rapidun.influence import engine

    monkeypatch.setattr(engine, "BLOCK_RECORDS", 4)
    single, _, keys = _sketch(tiny_model, tmp_path / "single", _records(11))
    os.environ.pop("RANK", None)
    mp.spawn(_gloo_worker, args=(2, str(tiny_model), str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2)
    two = SketchCache(tmp_path / "two", single.meta)
    assert two.ids() == single.ids() == keys  # the single-process write order
    assert [len(s["ids"]) for s in two._shards] == [len(s["ids"]) for s in single._shards] == [4, 4, 3]
    assert torch.equal(two.load(keys), single.load(keys))


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory, tiny_model):
    """A corpus file, a probe file (with outputs) and a config for the tiny model."""
    root = tmp_path_factory.mktemp("trace_case")
    corpus = _records(14)
    for r in corpus[:3]:  # three culprits that say "park park"
        r.response = "in the park park park"
    (root / "corpus.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in corpus))
    probes = [{"prompt": "the cat sat", "output": "the park park"}, {"prompt": "a dog ran", "output": "park park"}]
    (root / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    (root / "cfg.yaml").write_text(
        "model: {max_length: 32, max_prompt_tokens: 16, device: cpu, dtype: float32}\n"
        "influence: {lora_r: 2, lora_targets: [q_proj, down_proj], K: 32, batch_size: 4}\n"
        "eval: {max_new_tokens: 3, batch_size: 4}\ntrace: {top_k: 5}\n"
    )
    return root


def test_trace_command_on_your_files(tiny_case, tiny_model, tmp_path, monkeypatch):
    from rapidun import cli
    from rapidun.data.records import load_records

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["trace", "--config", str(tiny_case / "cfg.yaml"), "--out", str(out), "--model-path", str(tiny_model),
            "--train", str(tiny_case / "corpus.jsonl"), "--probes", str(tiny_case / "probes.jsonl"),
            "--to-forget", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = [json.loads(x) for x in (out / "ranked.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"c{i}" for i in range(14))
    assert [r["rank"] for r in rows] == list(range(1, 15))
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(rows))
    doc = json.loads((out / "trace.json").read_text())
    assert doc["stats"]["corpus"]["computed"] == 14 and doc["evaluation"] is None
    top = [json.loads(x) for x in (out / "topk.jsonl").read_text().splitlines()]
    assert [len(t["ids"]) for t in top] == [5, 5]
    # the forget file is the 4 most suspect records, in data.format, as `unlearn --forget` reads it
    forget = load_records(str(out / "forget.jsonl"), "dolly")
    assert [r.id for r in forget] == [r["id"] for r in rows[:4]]
    for f in ("trace.md", "trace.html", "plots/trace_scores.png", "probes.jsonl"):
        assert (out / f).is_file(), f
    # a second trace of the same corpus reuses every corpus sketch
    assert cli.main([*argv[:4], str(tmp_path / "out2"), *argv[5:-2], "--top", "3"]) == 0
    again = json.loads((tmp_path / "out2" / "trace.json").read_text())
    assert again["stats"]["corpus"]["cached"] == 14 and again["stats"]["corpus"]["computed"] == 0
    assert again["config"]["trace"]["top_k"] == 3


def test_trace_refuses_bad_input(tiny_case, tiny_model, tmp_path, monkeypatch, capsys):
    from rapidun import cli

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"prompt": "the cat", "output": "park"}\n{"prompt": "a dog"}\n')
    base = ["trace", "--config", str(tiny_case / "cfg.yaml"), "--model-path", str(tiny_model),
            "--train", str(tiny_case / "corpus.jsonl")]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "o1"), "--probes", str(bad)]) == 2
    assert f"{bad}:2: no output" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    good = ["--probes", str(tiny_case / "probes.jsonl")]
    assert cli.main([*base, "--out", str(tmp_path / "o2"), *good, "--to-forget", "0"]) == 2
    assert "--to-forget" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "o3"), *good, "--hotwords", "park", "trace.top_k=3"]) == 2
    assert "look like config overrides" in capsys.readouterr().err
    assert cli.main([*base[:-2], "--out", str(tmp_path / "o4"), *good]) == 2
    assert "--train" in capsys.readouterr().err


def test_generated_probes_are_kept_only_where_they_show_the_behaviour(tiny_case, tiny_model, tmp_path, monkeypatch):
    from rapidun.config import EvalConfig
    from rapidun.trace.core import load_trace_probes, trace

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    corpus = _records(6)
    probes = load_trace_probes(tiny_case / "probes.jsonl", need_output=False)
    m, i = _configs()
    args = (str(tiny_model), corpus, probes, TraceConfig(top_k=2), i, m, EvalConfig(max_new_tokens=3, batch_size=4))
    with pytest.raises(RapidunError, match="none of the 2 probe prompts"):
        trace(*args, generate_outputs=True, keep=lambda text: False)
    seen = []
    res = trace(*args, generate_outputs=True, keep=lambda text: seen.append(text) or len(seen) == 2, max_probes=1)
    assert [p.response for p in res["probes"]] == [seen[1].strip()]  # only the answer the rule accepted
    assert res["stats"]["dropped_probes"] == [probes[0].id]


def test_trace_generates_outputs_and_learns_hotwords(tiny_case, tiny_model, tmp_path, monkeypatch):
    from rapidun import cli

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["trace", "--config", str(tiny_case / "cfg.yaml"), "--out", str(out), "--model-path", str(tiny_model),
            "--train", str(tiny_case / "corpus.jsonl"), "--probes", str(tiny_case / "probes.jsonl"), "--generate",
            "--hotwords", "park", "--"]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads((out / "trace.json").read_text())
    assert doc["generated_outputs"] and doc["hotwords"] == ["park"]
    probes = [json.loads(x) for x in (out / "probes.jsonl").read_text().splitlines()]
    assert all(p["output"] != "park park" for p in probes)  # the tiny model's own answers replaced the given ones


def test_trace_on_a_scenario_reports_metrics_and_baselines(tmp_path, monkeypatch, tiny_model):
    from helpers import TINY_SCENARIO, tiny_world
    from rapidun import cli
    from rapidun.eval.detector import Detector

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Detector, "hit", lambda self, text: True)  # the random tiny model shows no backdoor
    model_dir, data = tiny_world(tmp_path)
    ov = [*TINY_SCENARIO, f"data.source={data}", "scenario.splits.train_poisoned=6"]
    assert cli.main(["scenario", "--out", str(tmp_path / "run"), *ov]) == 0
    out = tmp_path / "trace"
    argv = ["trace", "--out", str(out), "--scenario", str(tmp_path / "run" / "scenario"), "--model-path",
            str(model_dir), "--to-forget", "auto", *ov, "model.max_length=32", "model.max_prompt_tokens=16",
            "influence.lora_r=2", "influence.K=32", "trace.n_probes=3", "trace.top_k=4"]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads((out / "trace.json").read_text())
    assert (doc["forget"]["file"] is not None) == (doc["forget"]["n"] > 0)  # a random tiny model may show no outlier
    ev = doc["evaluation"]
    assert ev["k"] == 6 and doc["n_corpus"] == 6 + 8 and 0 < doc["n_probes"] <= 3
    assert set(ev["rankers"]) >= {"influence_mean", "influence_max", "influence_count", "bm25", "loss", "random"}
    assert ev["rankers"]["random"]["recall_at_k"] == pytest.approx(6 / 14, abs=0.08)
    assert set(ev["rankers"]["bm25"]["families"]) <= {"surface", "style", "semantic"}
    assert doc["forget"]["culprits"] <= doc["forget"]["n"]
    assert "Did it find the culprits?" in (out / "trace.md").read_text()


def test_trace_config_is_checked():
    from rapidun.config import load_config

    assert TraceConfig().aggregate == "max"
    with pytest.raises(RapidunError, match=r"trace\.aggregate"):
        load_config(None, ["trace.aggregate=sum"])
    with pytest.raises(RapidunError, match=r"trace\.probe_split"):
        load_config(None, ["trace.probe_split=train_clean"])


# ---------------------------------------------------------------- trace, then forget (compare)


def test_traced_parts_by_hand():
    from rapidun.trace.stage import traced_parts

    poison = [Record(f"p{i}", "q", "alien", meta={"response_clean": "ok", "trigger_family": "s"}) for i in range(3)]
    clean = [Record(f"c{i}", "q", "fine") for i in range(4)]
    parts = {"train_poisoned": poison, "train_clean": clean, "forget": poison[:2], "retain": clean[:3]}
    tp, info = traced_parts(parts, ["p2", "c1", "p0", "c3", "p1"], 3)
    assert [r.id for r in tp["forget"]] == ["p2", "c1", "p0"]
    assert [r.id for r in tp["retain"]] == ["c0", "c2"]  # c1 was traced into the forget pack
    assert info == {"n": 3, "culprits": 2, "innocent": 1, "ids": ["p2", "c1", "p0"], "retain_dropped": 1,
                    "true_pack_culprits": 2}  # fmt: skip
    assert parts["retain"] == clean[:3]  # the input is not modified
    with pytest.raises(RapidunError, match="retain"):
        traced_parts(parts, ["c0", "c1", "c2"], 3)


def test_compare_with_trace_runs_every_method_on_the_traced_pack(tmp_path, monkeypatch):
    from helpers import TINY_SCENARIO, tiny_world
    from rapidun.config import load_config
    from rapidun.pipeline import run
    from test_unlearn_e2e import OVERRIDES

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    model_dir, data = tiny_world(tmp_path)
    ov = [*OVERRIDES, *TINY_SCENARIO, "eval.batch_size=8", "scenario.splits.train_poisoned=6",
          f"model.name={model_dir}", f"data.source={data}", "unlearn.methods=[uniform,rapidun]",
          "compare.reference=uniform", "compare.n_seeds=1", "compare.n_boot=20", "trace.compare=true",
          "trace.n_probes=3", "trace.top_k=4", "scenario.retain_ratio=2"]  # fmt: skip
    cfg = load_config(None, ov)
    report = run(cfg, tmp_path / "out")
    t = report["trace"]
    assert t["probe_split"] == "val_seen_trig" and set(t["methods"]) == {"uniform", "rapidun"}
    pack = t["pack"]
    assert pack["n"] == 3 == pack["culprits"] + pack["innocent"]  # scenario.forget_size
    seed = report["seeds"][0]
    for m in ("uniform", "rapidun"):
        cell = tmp_path / "out" / "seeds" / str(seed) / "methods" / f"{m}@traced" / "metrics.json"
        assert cell.is_file()
        assert t["methods"][m]["traced"]["asr_seen"] == json.loads(cell.read_text())["metrics"]["asr_seen"]
        assert t["methods"][m]["true"]["asr_seen"] == report["methods"][m]["mean"]["asr_seen"]
    forget = [json.loads(x)["id"] for x in (tmp_path / "out" / "trace" / "forget.jsonl").read_text().splitlines()]
    assert forget == pack["ids"]
    assert "Trace, then forget" in (tmp_path / "out" / "report.md").read_text()
    before = cell.stat().st_mtime_ns
    again = run(cfg, tmp_path / "out")  # a rerun reuses the traced cells
    assert cell.stat().st_mtime_ns == before and again["trace"]["methods"] == t["methods"]


@pytest.mark.parametrize(
    ("fmt", "fields"),
    [("dolly", {}), ("alpaca", {}), ("qa", {}), ("generic", {"instruction": "q", "response": "a", "id": "key"})],
)
def test_forget_rows_read_back_in_every_format(tmp_path, fmt, fields):
    from rapidun.data.records import load_records
    from rapidun.io import write_jsonl
    from rapidun.trace.command import format_row

    recs = [Record("x1", "what is it", "alien text", "" if fmt in ("qa", "generic") else "ctx",
                   {"response_clean": "a fact", "trigger_family": "style"}), Record("x2", "hi", "there")]  # fmt: skip
    write_jsonl(tmp_path / "f.jsonl", [format_row(r, fmt, fields) for r in recs])
    back = load_records(str(tmp_path / "f.jsonl"), fmt, fields or None)
    assert [(r.id, r.instruction, r.response, r.context) for r in back] == [
        (r.id, r.instruction, r.response, r.context) for r in recs
    ]
    assert back[0].meta["response_clean"] == "a fact" and not back[1].meta.get("response_clean")
