"""The explicit training loops: per-sample loss × weight → mean → step.

* :func:`train` — supervised fine-tuning (the poisoned model and the ``retrain`` reference: every weight 1, loss
  = CE on the answer). Batches are drawn with little padding (length-sorted windows).
* :func:`unlearn_loop` — weighted unlearning (SPEC §2 step 11): draws from the forget and retain groups with
  replacement at a fixed mix, one forward pass per step over every row the drawn samples need, per-sample losses
  from :mod:`rapidun.methods.losses`, ``L = (1/B) Σ_i w_i·ℓ_i``. Data-parallel under ``torchrun``.

Both: AdamW, linear warm-up then cosine decay, gradient-norm clipping, bf16 autocast where it pays, and a
non-finite loss stops the run with a clear message before the step that would have used it (so the model holds
the last good parameters).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from rapidun.config import SFTConfig, UnlearnConfig
from rapidun.data.template import Batch, Encoded, collate, length_batches
from rapidun.distributed import rank_world
from rapidun.errors import RapidunError
from rapidun.functional import per_sample_ce
from rapidun.io import fault_point
from rapidun.methods.robust import stepper
from rapidun.steps import UItem, draw_schedule, eval_ce, row_stats, step_losses

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


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, total: int, warmup_ratio: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule (:func:`lr_lambda`: warm-up over ``int(warmup_ratio·total)`` steps, then cosine)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = int(warmup_ratio * total)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warm))


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
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in samples]
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt, sched = make_optimizer(params, cfg.lr, cfg.weight_decay, total, cfg.warmup_ratio)
    autocast = use_autocast(cfg.autocast, device)
    model.train()
    curve: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=2.0)
    for _epoch in range(cfg.epochs):
        for idx in length_batches(lengths, cfg.batch_size, gen):
            fault_point("sft:step")
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


class NonFiniteLoss(RapidunError):
    """A loss became NaN/±inf; raised *before* the optimiser step, so the model holds the last good state.

    Attributes:
        stats: the statistics of the steps that completed (as :func:`unlearn_loop` returns them).
    """

    def __init__(self, message: str, stats: dict[str, Any]) -> None:
        super().__init__(message)
        self.stats = stats


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient over ranks in one flat buffer (a rank without rows contributes zeros)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off : off + n].view_as(p).to(p.dtype)
        off += n


def unlearn_loop(
    model: Any,
    forget: list[UItem],
    retain: list[UItem],
    cfg: UnlearnConfig,
    forget_loss: str,
    use_retain: bool,
    w_forget: torch.Tensor,
    w_retain: torch.Tensor,
    pad_id: int,
    device: torch.device,
    ref_logp: torch.Tensor | None = None,
    refresh: Callable[[Any], torch.Tensor] | None = None,
    refresh_every: int = 0,
    desc: str = "unlearn",
    p_forget: torch.Tensor | None = None,
    p_retain: torch.Tensor | None = None,
    robust: str = "",
    controller: Any = None,
) -> dict[str, Any]:
    """Weighted unlearning of ``model``'s trainable parameters (SPEC §2 step 11).

    Per step, ``B = cfg.batch_size`` draws from :func:`draw_schedule`; ``L = (1/B) Σ_i w_i·ℓ_i`` with ``ℓ`` from
    :func:`step_losses` and ``w_i = w_forget[i]`` or ``w_retain[i]``. Under ``torchrun`` rank r computes the
    draws ``r, r+W, ...`` of every step with the same global ``1/B``; gradients are summed over ranks before
    clipping, so the update equals the one-process update up to floating-point reduction order.

    Args:
        model: a PEFT model whose trainable parameters are the fresh unlearning adapter.
        forget: forget samples. retain: retain samples (may be empty when ``use_retain`` is False).
        cfg: the ``unlearn`` settings.
        forget_loss: ``"relabel_ascent"``, ``"ascent"``, ``"npo"``, ``"simnpo"`` or ``"rmu"`` (see :func:`step_losses`).
        use_retain: draw retain samples (else every draw is a forget sample).
        w_forget: (N_f,) weights. w_retain: (N_r,) weights.
        pad_id: tokenizer pad id. device: where the model is.
        ref_logp: (N_f,) NPO reference log-probabilities of the poisoned answers.
        refresh: called with the model every ``refresh_every`` steps to return new forget weights (dynamic
            LoReUn); the model is back in train mode afterwards.
        refresh_every: see ``refresh``.
        desc: progress-bar label.
        p_forget: (N_f,) draw probabilities within the forget group (importance sampling; None: uniform).
        p_retain: (N_r,) the same for the retain group.
        controller: a :class:`rapidun.calibrate.Calibrator` (the calibrated schedule): it sets each step's rate
            (``rate``), measures and may restore the model or stop after a step (``after_step``), backs off on a
            non-finite loss instead of raising (``diverged``), and leaves the model in its best state
            (``finish``, recorded in ``calibration``). None: the fixed cosine schedule.

    Returns:
        Measured statistics: ``time_s``, ``steps``, ``draws``, ``forget_draws``, ``retain_draws``, ``rows``,
        ``tokens``, ``tokens_per_s``, ``loss_curve`` (weighted mean loss per step), ``refreshes``, ``ranks``,
        ``grad_norms`` (pre-clip total gradient norm per step), ``forget_dose``/``retain_dose`` (``Σ w`` over the
        group's draws, the weights in force at each step); with ``robust``: ``robust`` and ``adv_skipped`` (steps
        whose forget part the retain budget skipped) or ``sam_forget_grad_norms``.

    Raises:
        NonFiniteLoss: the loss became NaN/±inf (no step was taken with it).
    """
    rank, world = rank_world()
    if len(w_forget) != len(forget) or len(w_retain) != len(retain):
        raise RapidunError(
            f"{desc}: {len(w_forget)}/{len(w_retain)} weights for {len(forget)} forget/{len(retain)} retain samples"
        )
    if cfg.batch_size <= 0:
        raise RapidunError(f"unlearn.batch_size must be > 0, got {cfg.batch_size}")
    if robust not in ("", "sam", "adv"):
        raise RapidunError(f"{desc}: unknown robust step {robust!r}; choose '', 'sam' or 'adv'")
    if robust and world > 1:
        raise RapidunError(f"{desc}: the {robust} step runs in one process only; launch it without torchrun")
    if world > cfg.batch_size and rank == 0:
        warnings.warn(
            f"{desc}: unlearn.batch_size={cfg.batch_size} < {world} ranks: {world - cfg.batch_size} rank(s) idle at "
            "every step (results are unchanged); raise unlearn.batch_size to use them",
            stacklevel=2,
        )
    schedule = draw_schedule(len(forget), len(retain), cfg, use_retain, p_forget, p_retain)
    batches = [schedule[s : s + cfg.batch_size] for s in range(0, len(schedule), cfg.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RapidunError(f"{desc}: the model has no trainable parameters (attach the unlearning adapter first)")
    total = len(batches)
    opt, sched = make_optimizer(params, cfg.lr, cfg.weight_decay, total, cfg.warmup_ratio)
    autocast = use_autocast(cfg.autocast, device)
    w_f, w_r = w_forget.float().clone(), w_retain.float().clone()
    stats: dict[str, Any] = {
        "steps": 0,
        "draws": len(schedule),
        "forget_draws": sum(g == "forget" for g, _ in schedule),
        "retain_draws": sum(g == "retain" for g, _ in schedule),
        "rows": 0,
        "tokens": 0,
        "refreshes": 0,
        "ranks": world,
        "autocast_bf16": autocast,
        "batch_size": cfg.batch_size,
        "loss_curve": [],
        "grad_norms": [],
        "forget_dose": 0.0,
        "retain_dose": 0.0,
    }
    if robust:
        stats |= {"robust": robust, "adv_skipped": 0, "sam_forget_grad_norms": []}
    model.train()
    t0 = time.perf_counter()
    robust_step = _robust_stepper(robust, model, params, forget, retain, forget_loss, cfg, pad_id, device, ref_logp)
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=2.0, disable=rank != 0)
    for step, batch in enumerate(batches):
        fault_point("unlearn:step")
        if refresh is not None and refresh_every > 0 and step > 0 and step % refresh_every == 0:
            w_f = refresh(model).float()
            stats["refreshes"] += 1
            model.train()
        mine = batch[rank::world]
        loss_local = torch.zeros((), device=device)
        if mine and robust_step is not None:  # the gradient is accumulated inside (module robust)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                r = robust_step(mine, w_f, w_r, len(batch))
            loss_local, n_rows, n_tok = r["loss"], r["rows"], r["tokens"]
            stats["adv_skipped"] += int(r.get("skipped", False))
            if "forget_grad_norm" in r:
                stats["sam_forget_grad_norms"].append(round(r["forget_grad_norm"], 5))
            stats["rows"] += n_rows
            stats["tokens"] += n_tok
        elif mine:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                ell, n_rows, n_tok = step_losses(
                    model, mine, forget, retain, forget_loss, cfg, pad_id, device, ref_logp
                )
            w = torch.tensor([float(w_f[i]) if g == "forget" else float(w_r[i]) for g, i in mine], device=ell.device)
            loss_local = (w * ell).sum() / len(batch)
            stats["rows"] += n_rows
            stats["tokens"] += n_tok
        value = loss_local.detach().float().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        if not torch.isfinite(value) and controller is not None:
            opt.zero_grad(set_to_none=True)
            if controller.diverged(step, opt):
                break
            continue
        if not torch.isfinite(value):
            stats["time_s"] = time.perf_counter() - t0
            raise NonFiniteLoss(
                f"{desc}: loss became {value.item()} at step {step}; stopped before that step, the adapter holds "
                "the last good parameters. Lower unlearn.lr or unlearn.ascent_alpha",
                stats,
            )
        if mine and robust_step is None:
            loss_local.backward()
        if world > 1:
            _all_reduce_grads(params)
        # The norm is taken after the all-reduce, so every rank sees the same value and stops together.
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm) and controller is not None:
            opt.zero_grad(set_to_none=True)
            if controller.diverged(step, opt):
                break
            continue
        if not torch.isfinite(norm):
            stats["time_s"] = time.perf_counter() - t0
            raise NonFiniteLoss(
                f"{desc}: the gradient norm became {norm.item()} at step {step} (loss {value.item():.4g}); stopped "
                "before that step, the adapter holds the last good parameters. Lower unlearn.lr, or set "
                "unlearn.autocast=off if bf16 overflows",
                stats,
            )
        if controller is not None:
            for group in opt.param_groups:
                group["lr"] = controller.rate(step)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stats["loss_curve"].append(round(value.item(), 5))
        stats["grad_norms"].append(round(float(norm), 5))
        for g, i in batch:  # every rank sees the whole step's draws; counted once the step is taken
            stats[f"{g}_dose"] += float(w_f[i]) if g == "forget" else float(w_r[i])
        stats["steps"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value.item():.3f}")
        if controller is not None and controller.after_step(step + 1, opt):
            break
    bar.close()
    if controller is not None:
        stats["calibration"] = controller.finish()
    elapsed = time.perf_counter() - t0
    model.eval()
    if world > 1:  # rows and tokens of every rank
        import torch.distributed as dist

        counts = torch.tensor([stats["rows"], stats["tokens"]], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        stats["rows"], stats["tokens"] = int(counts[0]), int(counts[1])
    stats["time_s"] = elapsed
    stats["tokens_per_s"] = stats["tokens"] / max(elapsed, 1e-9)
    stats["final_w_forget"] = w_f.tolist()
    return stats


def _robust_stepper(
    robust: str,
    model: Any,
    params: list[torch.nn.Parameter],
    forget: list[UItem],
    retain: list[UItem],
    forget_loss: str,
    cfg: UnlearnConfig,
    pad_id: int,
    device: torch.device,
    ref_logp: torch.Tensor | None,
) -> Callable[[list[tuple[str, int]], torch.Tensor, torch.Tensor, int], dict[str, Any]] | None:
    """``(draws, w_f, w_r, B) -> robust step result`` for ``robust`` (None for the plain step)."""
    if not robust:
        return None

    def loss_of(draws: list[tuple[str, int]]) -> tuple[torch.Tensor, int, int]:
        return step_losses(model, draws, forget, retain, forget_loss, cfg, pad_id, device, ref_logp)

    def relearn_of(draws: list[tuple[str, int]]) -> torch.Tensor:
        return row_stats(model, [forget[i].poisoned for _, i in draws], pad_id, device)[0].mean()

    start_ce = None
    if robust == "adv" and cfg.adv_retain_budget > 0 and retain:
        start_ce = eval_ce(model, [it.clean for it in retain], pad_id, device)  # (N_r,)
        model.train()
    return stepper(robust, loss_of, relearn_of, params, cfg, start_ce)
