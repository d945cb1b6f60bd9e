"""The one explicit training loop: per-sample loss × weight → mean → step.

Used for supervised fine-tuning (the poisoned model and the ``retrain`` reference: every weight 1, loss = CE on
the answer). Batches are drawn with little padding (length-sorted windows), the LR follows linear warm-up then
cosine decay, gradients are clipped, and a non-finite loss stops the run with a clear message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from rapidun.config import SFTConfig
from rapidun.data.template import Batch, Encoded, collate, length_batches
from rapidun.errors import RapidunError
from rapidun.functional import per_sample_ce

LossFn = Callable[[Any, Batch], torch.Tensor]  # (model, batch) -> (B,) per-sample losses


def ce_loss(model: Any, batch: Batch) -> torch.Tensor:
    """(B,) answer-token cross-entropy per sample."""
    return per_sample_ce(model, batch.input_ids, batch.attention_mask, batch.labels)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_autocast(mode: str, device: torch.device) -> bool:
    """Resolve ``sft.autocast`` (see :class:`rapidun.config.SFTConfig`)."""
    if mode not in ("auto", "bf16", "off"):
        raise RapidunError(f"sft.autocast={mode!r}; choose 'auto', 'bf16' or 'off'")
    if mode == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return mode == "bf16"


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak LR: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: Any,
    samples: list[Encoded],
    cfg: SFTConfig,
    pad_id: int,
    device: torch.device,
    weights: list[float] | None = None,
    loss_fn: LossFn = ce_loss,
    desc: str = "train",
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on ``samples`` for ``cfg.epochs`` epochs.

    ``L = (1/B) Σ_i w_i · ℓ_i`` per batch, with ``ℓ`` from ``loss_fn`` and ``w`` = ``weights`` (default 1).

    Returns:
        Measured statistics: ``time_s``, ``steps``, ``tokens``, ``tokens_per_s``, ``loss_curve`` (per step).
    """
    if not samples:
        raise RapidunError(f"{desc}: no training samples")
    if weights is not None and len(weights) != len(samples):
        raise RapidunError(f"{desc}: {len(weights)} weights for {len(samples)} samples; give one weight per sample")
    w_all = torch.tensor(weights if weights is not None else [1.0] * len(samples), dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in samples]
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, int(cfg.warmup_ratio * total)))
    autocast = use_autocast(cfg.autocast, device)
    model.train()
    curve: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=2.0)
    for _epoch in range(cfg.epochs):
        for idx in length_batches(lengths, cfg.batch_size, gen):
            batch = collate([samples[i] for i in idx], pad_id).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = loss_fn(model, batch)  # (B,)
            loss = (w_all[idx].to(losses.device) * losses).mean()
            if not torch.isfinite(loss):
                raise RapidunError(
                    f"{desc}: loss became {loss.item()} at step {len(curve)}; lower sft.lr or check "
                    "the data (the model was not saved)"
                )
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append(round(loss.item(), 5))
            tokens += int(batch.attention_mask.sum())
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    model.eval()
    return {
        "time_s": elapsed,
        "autocast_bf16": autocast,
        "steps": len(curve),
        "tokens": tokens,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "samples": len(samples),
        "epochs": cfg.epochs,
        "loss_curve": curve,
    }
