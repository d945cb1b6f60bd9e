"""The influence engine end to end on a tiny saved model: matrix = manual sketch inner products; cache reuse."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import make_model, make_tokenizer
from rapidun import cli
from rapidun.config import InfluenceConfig, ModelConfig
from rapidun.data.records import Record
from rapidun.data.template import collate, encode_records
from rapidun.errors import RapidunError
from rapidun.influence.check import pearson, rank, sketch_fidelity, spearman, topk_overlap
from rapidun.influence.engine import cache_key, exact_grads, hotword_ids, influence, prepare
from rapidun.influence.grads import per_sample_grads
from rapidun.influence.sketch import RapidGrad

WORDS = "the cat sat on the mat and the dog ran to the park".split()


def recs(prefix: str, n: int) -> list[Record]:
    return [
        Record(id=f"{prefix}{i}", instruction=" ".join(WORDS[i % 5 : i % 5 + 4]), response=" ".join(WORDS[i % 7 :]))
        for i in range(n)
    ]


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    tok = make_tokenizer()
    model = make_model(len(tok), init_range=0.2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def cfgs(**kw):
    m = ModelConfig(max_length=32, max_prompt_tokens=16, device="cpu", dtype="float32")
    i = InfluenceConfig(lora_r=2, lora_targets=["q_proj", "v_proj"], K=64, batch_size=3, **kw)
    return m, i


def test_engine_matrix_equals_manual_sketch_products_and_reuses_cache(tiny_dir):
    mcfg, icfg = cfgs(param_set="regex", param_regex=r"layers\.1\.mlp\.down_proj\.weight")
    train, test = recs("a", 5), recs("b", 4)
    res = influence(tiny_dir, train, test, mcfg, icfg)
    assert res["matrix"].shape == (5, 4) and res["train_ids"] == [r.id for r in train]
    assert res["stats"]["train"]["computed"] == 5 and res["stats"]["test"]["computed"] == 4
    # Manual: the same gradients and projection, fp16 storage, then a double loop of dot products.
    model, tok, pset, _ = prepare(tiny_dir, mcfg, icfg)
    proj = RapidGrad(pset.dim, icfg.K, icfg.seed, icfg.rounds)

    def sk(rs):
        enc, _ = encode_records(tok, rs, mcfg)
        return proj.project(per_sample_grads(model, collate(enc, tok.pad_token_id), pset)).half().float()

    A, B = sk(train), sk(test)
    for i in range(5):
        for j in range(4):
            assert res["matrix"][i, j] == pytest.approx(float(A[i] @ B[j]), abs=1e-4)
    assert len(res["topk"]) == 4 and len(res["topk"][0]["train_ids"]) == 5
    again = influence(tiny_dir, train, test, mcfg, icfg)
    assert again["stats"]["train"]["computed"] == 0 and again["stats"]["train"]["cached"] == 5
    assert torch.equal(again["matrix"], res["matrix"])


def test_cache_key_is_id_plus_content_hash():
    a = recs("a", 2)
    edited = dataclasses.replace(a[0], response="the park")
    assert cache_key(a[0]) == cache_key(recs("a", 1)[0]) and cache_key(a[0]).startswith("a0#")
    assert cache_key(edited) != cache_key(a[0]) and cache_key(edited).startswith("a0#")
    assert cache_key(a[0]) != cache_key(a[1])


def test_edited_record_with_same_id_is_recomputed_in_the_given_cache_dir(tiny_dir, tmp_path):
    mcfg, icfg = cfgs()
    train, test = recs("a", 4), recs("b", 2)
    folder = tmp_path / "my_sketches"
    res = influence(tiny_dir, train, test, mcfg, icfg, cache_dir=folder)
    assert res["stats"]["train"]["computed"] == 4 and res["stats"]["test"]["computed"] == 2
    edited = list(train)
    edited[1] = dataclasses.replace(train[1], response="the cat sat on the mat")  # same id "a1", new answer
    again = influence(tiny_dir, edited, test, mcfg, icfg, cache_dir=folder)
    assert again["stats"]["train"]["computed"] == 1 and again["stats"]["train"]["cached"] == 3
    assert again["stats"]["test"]["computed"] == 0
    assert again["train_ids"] == res["train_ids"]
    assert not torch.allclose(again["matrix"][1], res["matrix"][1])  # the edited row is not the stale sketch
    keep = [0, 2, 3]
    assert torch.equal(again["matrix"][keep], res["matrix"][keep])
    # a test record sharing a train record's id but not its content gets its own sketch
    clash = [dataclasses.replace(train[0], instruction="one two three", response="four five six")]
    third = influence(tiny_dir, train, clash, mcfg, icfg, cache_dir=folder)
    assert third["stats"]["train"]["computed"] == 0 and third["stats"]["test"]["computed"] == 1
    # everything went under cache_dir, nothing under $RAPIDUN_CACHE/sketches
    assert any(folder.rglob("manifest.json"))
    assert not (Path(os.environ["RAPIDUN_CACHE"]) / "sketches").exists()


def test_engine_lora_and_hotwords(tiny_dir):
    mcfg, icfg = cfgs(hotwords=["park"])
    train, test = recs("a", 3), recs("b", 7)
    for r in test[::2]:
        r.response = "the cat sat on the mat"
    res = influence(tiny_dir, train, test, mcfg, icfg)
    # test samples whose answer has no "park" token get a zero sketch, hence zero influence
    no_park = [j for j, r in enumerate(test) if "park" not in r.response]
    assert res["stats"]["test"]["no_answer_tokens"] == len(no_park) > 0
    assert torch.all(res["matrix"][:, no_park] == 0)
    assert res["stats"]["D"] > 0


def test_hotword_ids_never_include_unk():
    tok = make_tokenizer()  # word-level: "park" is known, "Park" is not
    assert tok.convert_tokens_to_ids("park") in hotword_ids(tok, ["park"])
    assert tok.unk_token_id not in hotword_ids(tok, ["park"])


def test_engine_rejects_empty_sets(tiny_dir):
    mcfg, icfg = cfgs()
    with pytest.raises(RapidunError, match="non-empty"):
        influence(tiny_dir, [], recs("b", 2), mcfg, icfg)


def test_cli_influence_writes_matrix_and_topk(tiny_dir, tmp_path):
    for name, rs in (("train", recs("a", 4)), ("test", recs("b", 2))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in rs))
    rc = cli.main(
        [
            "influence",
            "--out",
            str(tmp_path / "out"),
            "--model-path",
            tiny_dir,
            "--train",
            str(tmp_path / "train.jsonl"),
            "--test",
            str(tmp_path / "test.jsonl"),
            "model.max_length=32",
            "model.max_prompt_tokens=16",
            "influence.lora_r=2",
            "influence.K=64",
            "influence.lora_targets=[q_proj]",
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "topk.jsonl").read_text().splitlines()]
    assert [r["test_id"] for r in rows] == ["b0", "b1"]
    assert (tmp_path / "out" / "influence.pt").is_file()


def test_check_statistics_against_slow_versions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    r = rank(a)
    assert sorted(r.tolist()) == list(range(50)) and r[a.argmax()] == 49
    mean_a, mean_b = a.mean(), b.mean()
    slow = float(((a - mean_a) * (b - mean_b)).sum() / ((a - mean_a).norm() * (b - mean_b).norm()))
    assert pearson(a, b) == pytest.approx(slow, abs=1e-6)  # slow version in float32
    ra, rb = sorted(range(50), key=lambda i: a[i]), sorted(range(50), key=lambda i: b[i])
    pa, pb = [ra.index(i) for i in range(50)], [rb.index(i) for i in range(50)]
    d2 = sum((x - y) ** 2 for x, y in zip(pa, pb, strict=True))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (50 * (50**2 - 1)), abs=1e-9)
    e = torch.tensor([[0.0, 3.0, 1.0], [3.0, 0.0, 2.0], [1.0, 2.0, 0.0]])
    assert topk_overlap(e, e, 1) == 1.0
    flipped = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    # column 0: exact top-1 is row 1, flipped top-1 is row 2 -> miss; col 1: 0 vs 2 -> miss; col 2: 1 vs 0 -> miss
    assert topk_overlap(e, flipped, 1) == 0.0


def test_sketch_fidelity_improves_with_K():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 4000, generator=g)
    G = base[torch.arange(20) % 4] + 0.3 * torch.randn(20, 4000, generator=g)  # clustered gradients
    rows = sketch_fidelity(G, [16, 1024], seed=0, rounds=4, k=3)
    assert rows[1]["pearson"] > rows[0]["pearson"] and rows[1]["pearson"] > 0.95


def test_exact_grads_shape(tiny_dir):
    mcfg, icfg = cfgs()
    model, tok, pset, _ = prepare(tiny_dir, mcfg, icfg)
    G = exact_grads(model, tok, pset, recs("a", 4), mcfg, icfg)
    assert G.shape == (4, pset.dim)


def test_leave_one_out_estimate_tracks_actual_change(tiny_dir):
    from rapidun.influence.loo import leave_one_out

    mcfg, icfg = cfgs()
    model, tok, pset, _ = prepare(tiny_dir, mcfg, icfg)
    with torch.no_grad():  # a non-zero B so both LoRA factors move
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    train, _ = encode_records(tok, recs("a", 8), mcfg)
    test, _ = encode_records(tok, recs("b", 3), mcfg)
    res = leave_one_out(model, pset, train, test, [0, 2, 5], tok.pad_token_id, 1e-2, 1, K=64, seed=0, rounds=4)
    assert res["pairs"] == 9
    assert res["pearson_exact"] > 0.99  # one small SGD step: first order is nearly exact
