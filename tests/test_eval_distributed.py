"""Evaluation generation sharded over two CPU processes (gloo) gives the one-process texts, on every rank."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_model, make_tokenizer
from rapidun.eval.generate import generate

PROMPTS = [
    "the cat sat",
    "tell me a story about a red fox",
    "one two",
    "alpha beta gamma",
    "what is the capital of france",
    "the dog ran to the park and",
    "zeta",
]


def texts(shard: bool) -> tuple[list[str], int]:
    """The texts and the number of batches this process generated."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = make_model(len(tok), init_range=0.2)
    calls = []
    inner = model.generate
    model.generate = lambda **kw: calls.append(1) or inner(**kw)
    out = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, shard=shard)  # 4 batches: 2 per rank
    return out, len(calls)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(texts(shard=True), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_generate_the_one_process_texts(tmp_path):
    single, n = texts(shard=False)
    assert len(single) == len(PROMPTS) and any(single) and n == 4
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True, start_method="fork"
    )
    for r in range(2):
        assert torch.load(tmp_path / f"res.{r}") == (single, 2)
