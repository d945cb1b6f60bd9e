"""torch.distributed helpers: ranks under ``torchrun`` / ``accelerate launch``, a no-op in one process.

Work is split by whole batches (rank r takes batches r, r+W, ...), so every sample is computed in exactly the
batch it would have in one process and results do not depend on the number of ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA).

    Returns True when running with more than one rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Long timeout: in `rapidun compare` the other ranks wait at a barrier while rank 0 fine-tunes.
        dist.init_process_group(backend, timeout=timedelta(hours=float(os.environ.get("RAPIDUN_DIST_TIMEOUT_H", "6"))))
    return True


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank_world()[0] == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_dicts(part: dict) -> dict:
    """Union of every rank's dict, on every rank (pickled; keys must not collide)."""
    if rank_world()[1] == 1:
        return part
    parts: list[Any] = [None] * rank_world()[1]
    dist.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()
