"""Two CPU processes (gloo) give exactly the single-process influence matrix, and one cache."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_model, make_tokenizer
from rapidun.config import InfluenceConfig, ModelConfig
from rapidun.data.records import Record

WORDS = "the cat sat on the mat and the dog ran to the park".split()


def records(prefix: str, n: int) -> list[Record]:
    return [
        Record(
            id=f"{prefix}{i}", instruction=" ".join(WORDS[i % 5 : i % 5 + 3 + i % 3]), response=" ".join(WORDS[i % 6 :])
        )
        for i in range(n)
    ]


def configs():
    m = ModelConfig(max_length=32, max_prompt_tokens=16, device="cpu", dtype="float32")
    i = InfluenceConfig(lora_r=2, lora_targets=["q_proj", "down_proj"], K=32, batch_size=2)
    return m, i


def _worker(rank: int, world: int, model_dir: str, init_file: str, cache: str, out: str) -> None:
    from rapidun.influence.engine import influence

    os.environ["RAPIDUN_CACHE"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m, i = configs()
        res = influence(model_dir, records("a", 7), records("b", 5), m, i)
        torch.save({"matrix": res["matrix"], "computed": res["stats"]["train"]["computed"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    from rapidun.influence.engine import influence

    tok = make_tokenizer()
    make_model(len(tok), init_range=0.2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache1"))
    m, i = configs()
    single = influence(str(tmp_path / "m"), records("a", 7), records("b", 5), m, i)["matrix"]
    mp.spawn(
        _worker,
        args=(2, str(tmp_path / "m"), str(tmp_path / "init"), str(tmp_path / "cache2"), str(tmp_path / "res")),
        nprocs=2,
        join=True,
    )
    r0, r1 = torch.load(tmp_path / "res.0"), torch.load(tmp_path / "res.1")
    assert torch.equal(r0["matrix"], single) and torch.equal(r1["matrix"], single)
    assert r0["computed"] == 7
    shards = list((tmp_path / "cache2" / "sketches").rglob("*.pt"))
    assert shards, "rank 0 wrote the sketch cache"
