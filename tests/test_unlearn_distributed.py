"""Two CPU processes (gloo) running unlearn_loop give the one-process adapter (up to reduction order)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_model, make_tokenizer, make_unlearn_items
from rapidun.config import UnlearnConfig
from rapidun.models import attach_lora

W_FORGET = [0.5, 2.0, 1.0, 3.0, 0.25, 1.5]
W_RETAIN = [1.0, 0.1, 4.0, 0.7, 2.0]


def run(forget_loss: str) -> dict:
    """Build the tiny LoRA model and data identically in any process and run the loop; adapter + stats back."""
    from rapidun.train import unlearn_loop
    from rapidun.unlearn import reference_logp

    tok = make_tokenizer()
    pad = tok.pad_token_id
    cpu = torch.device("cpu")
    forget, retain = make_unlearn_items(tok)
    model = attach_lora(make_model(len(tok), init_range=0.2), 4, 8, 0.0, ["q_proj", "v_proj"], seed=0)
    # 13 draws in batches of 4: the last batch has one draw, so rank 1 has no rows there (zero-gradient path)
    cfg = UnlearnConfig(
        epochs=1, draws_per_epoch=13, batch_size=4, lr=1e-2, grad_clip=1.0, autocast="off", seed=11,
        ascent_alpha=1.0, descent_beta=0.5, npo_beta=0.5,
    )  # fmt: skip
    ref = reference_logp(model, forget, pad, cpu) if forget_loss == "npo" else None
    stats = unlearn_loop(
        model, forget, retain, cfg, forget_loss, True, torch.tensor(W_FORGET), torch.tensor(W_RETAIN), pad, cpu,
        ref_logp=ref,
    )  # fmt: skip
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"adapter": adapter, "curve": stats["loss_curve"], "ranks": stats["ranks"], "rows": stats["rows"]}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({loss: run(loss) for loss in ("relabel_ascent", "npo")}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    single = {loss: run(loss) for loss in ("relabel_ascent", "npo")}
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    for loss, one in single.items():
        assert one["ranks"] == 1
        r0, r1 = ranks[0][loss], ranks[1][loss]
        assert r0["ranks"] == r1["ranks"] == 2
        assert r0["rows"] == r1["rows"] == one["rows"]  # counts summed over ranks: every row computed once
        assert len(r0["curve"]) == len(one["curve"]) == 4
        assert r0["curve"] == r1["curve"]  # the all-reduced loss
        assert max(abs(a - b) for a, b in zip(r0["curve"], one["curve"], strict=True)) < 1e-4
        for n, p in one["adapter"].items():
            assert torch.equal(r0["adapter"][n], r1["adapter"][n]), (loss, n)  # the ranks stay in sync
            assert torch.allclose(r0["adapter"][n], p, atol=1e-5, rtol=1e-4), (loss, n)
        assert all(p.abs().max() > 0 for n, p in one["adapter"].items() if "lora_B" in n)  # B left 0: it trained
