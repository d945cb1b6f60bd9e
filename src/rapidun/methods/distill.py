"""Perturb, then distil (UNDO-style, Lee et al. 2025, "Distillation Robustifies Unlearning").

An unlearned model only *hides* a behaviour when its weights stay next to the poisoned ones: a few steps of
fine-tuning find the way back. UNDO moves the weights away, then restores the wanted behaviour by distillation:

1. **Perturb.** The start model is ``W = W_base + ΔW`` on every targeted linear layer (``ΔW`` the fine-tuning
   delta). The student is the start model plus a LoRA adapter initialised to ``−α·ΔW_r``, with ``ΔW_r`` the best
   rank-r approximation of ``ΔW`` (truncated SVD ``ΔW ≈ U_r S_r V_rᵀ``): with α = 1 the student *is* the base
   model (exactly so when the fine-tune was a LoRA of rank ≤ r, as the scenario's poisoned model is), with α < 1 a
   shrunk fine-tune ``W_base + (1−α)·ΔW_r + (ΔW − ΔW_r)``. Optional noise on the adapter's B factor is the
   "perturb" of shrink-and-perturb. Factors: ``A = S_r^{1/2} V_rᵀ``, ``B = −α·U_r S_r^{1/2} / s`` with ``s`` the
   LoRA scaling (lora_alpha / r), so that ``s·B·A = −α·ΔW_r``.
2. **Distil.** The student's adapter is trained for ``distill_steps`` steps to match the teacher's (the
   unlearned model's) next-token distributions on the clean retain records: per-sample forward KL
   ``(1/|A_i|) Σ_t KL(p_teacher,t ‖ p_student,t)`` over answer positions (:func:`rapidun.functional.per_sample_kl`),
   in the SFT loop :func:`rapidun.train.train`. The behaviour to remove never appears in that data, so it is not
   re-taught. With ``distill_freeze_reset`` the adapter has rank 2r: the reset sits in slots ``:r`` and is held
   fixed (:func:`freeze_reset`), the distillation trains the fresh slots ``r:`` (B = 0 at init, so the student
   still starts at the base). Otherwise the reset's own factors are trained, and a cheap way to lower the KL on
   retain data is to shrink them back toward the fine-tune — which restores the forget set's knowledge along with
   the retain set's (measured on TOFU forget01: forget quality 0.004 with the trained reset, 0.571 held fixed).

The result is still an adapter on the start model (the student's), so every later stage (merge, verify) is the
same as for any other method. Cost: the teacher's unlearning, the SVDs and the S distillation steps (each one
teacher forward without gradient and one student forward/backward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from rapidun.config import SFTConfig, UnlearnConfig
from rapidun.data.template import Batch, Encoded
from rapidun.errors import RapidunError
from rapidun.functional import answer_logits, per_sample_kl

PEFT_PREFIX = "base_model.model."


def lora_modules(model: Any) -> dict[str, Any]:
    """The PEFT model's LoRA layers of its ``default`` adapter, by their name in the wrapped model."""
    return {
        name.removeprefix(PEFT_PREFIX): mod
        for name, mod in model.named_modules()
        if "default" in getattr(mod, "lora_A", {})
    }


def top_svd(m: torch.Tensor, rank: int, oversample: int = 8, niter: int = 4) -> tuple[torch.Tensor, ...]:
    """The top singular triplets of ``m`` (out, in): ``(U (out, q), S (q,), Vᵀ (q, in))``, q = rank + oversample.

    Randomised SVD (Halko et al. 2011, ``torch.svd_lowrank`` with ``niter`` power iterations) from a fixed seed in
    a forked RNG (deterministic, the global RNG untouched): exact to rounding when ``m`` has rank ≤ q, and the
    usual near-optimal top-r approximation otherwise. A full SVD of every layer's delta costs seconds per matrix on
    a CPU (minutes for a 135M model) and does not scale to 8B; this costs a few matrix products per layer.
    """
    q = min(rank + oversample, *m.shape)
    with torch.random.fork_rng(devices=[m.device] if m.is_cuda else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(m, q=q, niter=niter)  # (out, q), (q,), (in, q)
    return u, s, v.T


@torch.no_grad()
def delta_factors(student: Any, base: Any, rank: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Rank-``rank`` factors of the fine-tuning delta ``ΔW = W_start − W_base`` of each LoRA-wrapped module.

    Args:
        student: the start model wrapped with a fresh LoRA adapter (its layers' ``base_layer`` hold the start
            model's weights). base: the model it was fine-tuned from (same architecture).
        rank: r.

    Returns:
        ``(factors, info)``: ``factors[name] = (U_r S_r^{1/2} (out, r), S_r^{1/2} V_rᵀ (r, in))`` in float32 (``ΔW``
        in the ``out × in`` orientation of ``nn.Linear``; GPT-2's Conv1D weights are transposed first), and
        ``info`` with ``delta_norm`` (‖ΔW‖ over all modules), ``residual_norm`` (‖ΔW − ΔW_r‖) and
        ``residual_fraction`` (their ratio; 0 when the fine-tune was of rank ≤ r).

    Raises:
        RapidunError: a module is missing from the base model or has another shape (not the same architecture).
    """
    base_mods = dict(base.named_modules())
    factors: dict[str, Any] = {}
    d2 = r2 = 0.0
    for name, mod in lora_modules(student).items():
        if name not in base_mods or not hasattr(base_mods[name], "weight"):
            raise RapidunError(f"distill: the base model has no module {name!r}; unlearn.distill_base must be the "
                               "model the start model was fine-tuned from")  # fmt: skip
        w_s = mod.get_base_layer().weight
        w_b = base_mods[name].weight.to(w_s.device)
        if w_b.shape != w_s.shape:
            raise RapidunError(f"distill: {name} has shape {tuple(w_b.shape)} in the base model but "
                               f"{tuple(w_s.shape)} in the start model: not the base of this model")  # fmt: skip
        delta = w_s.float() - w_b.float()  # (out, in), or (in, out) for Conv1D
        if getattr(mod, "fan_in_fan_out", False):
            delta = delta.T  # (out, in)
        u, s, vh = top_svd(delta, rank)  # (out, k), (k,), (k, in)
        k = min(rank, s.numel())
        root = s[:k].sqrt()  # (k,)
        left = torch.zeros(delta.shape[0], rank, device=delta.device)  # (out, r)
        right = torch.zeros(rank, delta.shape[1], device=delta.device)  # (r, in)
        left[:, :k] = u[:, :k] * root
        right[:k] = root[:, None] * vh[:k]
        factors[name] = (left, right)
        d2 += float(delta.double().square().sum())
        r2 += float((delta - left @ right).double().square().sum())  # ‖ΔW − ΔW_r‖², measured (no cancellation)
    if not factors:
        raise RapidunError("distill: the student has no LoRA layers (attach the adapter first)")
    info = {
        "delta_norm": math.sqrt(d2),
        "residual_norm": math.sqrt(r2),
        "residual_fraction": math.sqrt(r2 / d2) if d2 > 0 else 0.0,
        "modules": len(factors),
    }
    return factors, info


@torch.no_grad()
def reset_adapter(model: Any, factors: dict[str, Any], alpha: float, noise: float, seed: int) -> int:
    """Initialise the PEFT model's ``default`` LoRA adapter to ``−alpha·ΔW_r`` (+ noise on B) module by module.

    A row of A whose singular value is 0 (the delta has rank < r there, e.g. a layer the fine-tune did not touch)
    keeps PEFT's random init, so that the factor pair still receives gradient (with A = B = 0 neither would).
    ``noise`` > 0 adds ``N(0, (noise·std(B))²)`` to B (seeded).

    Returns:
        The number of LoRA modules initialised.
    """
    gen = torch.Generator().manual_seed(seed)
    done = 0
    for name, mod in lora_modules(model).items():
        if name not in factors:
            continue
        left, right = factors[name]  # (out, r), (r, in)
        r = right.shape[0]
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # (R, in), (out, R), R ≥ r
        scale = float(mod.scaling["default"])
        live = right.abs().sum(1) > 0  # (r,) rows carrying a singular direction
        new_a = torch.where(live[:, None], right.to(a.device), a[:r].float())  # (r, in)
        new_b = -alpha * left.to(b.device) / scale  # (out, r)
        if noise > 0:
            std = float(new_b.std()) if new_b.numel() > 1 else 0.0
            new_b = new_b + noise * std * torch.randn(new_b.shape, generator=gen).to(new_b.device)
        a[:r].copy_(new_a.to(a.dtype))
        b[:, :r].copy_(new_b.to(b.dtype))
        done += 1
    return done


def freeze_reset(model: Any, r: int) -> list[Any]:
    """Hold the first ``r`` slots of every LoRA pair (the reset written by :func:`reset_adapter`) fixed.

    Gradient hooks zero ``∂L/∂A[:r]`` and ``∂L/∂B[:, :r]``, so an optimiser without weight decay never moves them
    (Adam's update is 0 where every gradient was 0); the slots ``r:`` train as usual. Why: a reset that is itself
    trained can be walked back along the fine-tune's own directions (shrinking ``B[:, :r]`` toward 0 restores
    ``ΔW_r``, the forget set's knowledge with it), which distillation on retain data rewards; fresh slots with a
    random ``A`` have no such path and must learn what the retain data teaches.

    Returns:
        The hooks' handles (call ``.remove()`` on each when the distillation ends).
    """
    handles = []
    for mod in lora_modules(model).values():
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # (R, in), (out, R)
        if a.shape[0] <= r:
            raise RapidunError(f"distill: the adapter has rank {a.shape[0]}; freezing a rank-{r} reset needs more")
        keep_a = torch.ones(a.shape[0], 1, device=a.device, dtype=a.dtype)
        keep_a[:r] = 0
        keep_b = torch.ones(1, b.shape[1], device=b.device, dtype=b.dtype)
        keep_b[:, :r] = 0
        handles.append(a.register_hook(lambda g, k=keep_a: g * k))
        handles.append(b.register_hook(lambda g, k=keep_b: g * k))
    return handles


def kl_loss(teacher: Any) -> Any:
    """``(student, batch) -> (B,)`` per-sample forward KL from ``teacher`` (a :data:`rapidun.train.LossFn`)."""

    def loss(student: Any, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            t_logits, _, _ = answer_logits(teacher, batch.input_ids, batch.attention_mask, batch.labels)  # (A, V)
        s_logits, row, _ = answer_logits(student, batch.input_ids, batch.attention_mask, batch.labels)  # (A, V)
        return per_sample_kl(t_logits, s_logits, row, batch.input_ids.shape[0])  # (B,)

    return loss


def distill(
    student: Any,
    teacher: Any,
    base: Any,
    rows: list[Encoded],
    u: UnlearnConfig,
    pad_id: int,
    device: torch.device,
    fit: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Perturb ``student`` (a PEFT model: the start model + a fresh adapter) toward ``base`` and distil ``teacher``.

    Args:
        student: the start model with a fresh LoRA adapter of rank ``u.lora_r`` (``attach_lora``; rank
            ``2·u.lora_r`` and alpha ``2·u.lora_alpha`` with ``u.distill_freeze_reset``).
        teacher: the unlearned model (eval mode; or the start model itself).
        base: the base model the start model was fine-tuned from (read only, for the delta).
        rows: the clean records distilled on (encoded with their clean answers).
        u: the ``unlearn`` settings (``distill_*``, ``lora_r``, ``seed``, ``autocast``, ``grad_clip``).
        pad_id: tokenizer pad id. device: where the models are.
        fit: the training loop, :func:`rapidun.train.train` (passed in: methods sit below the loops).

    Returns:
        Measured statistics: ``perturb_s`` (SVDs and reset), ``delta`` (norms, residual fraction), ``train`` (the
        distillation's :func:`rapidun.train.train` statistics), ``time_s`` (both).
    """
    if not rows:
        raise RapidunError("distill needs clean records to distil on (the retain pack is empty)")
    if u.distill_freeze_reset and u.weight_decay > 0:
        raise RapidunError(f"unlearn.distill_freeze_reset holds the reset fixed, but unlearn.weight_decay "
                           f"{u.weight_decay} would still shrink it: set unlearn.weight_decay=0")  # fmt: skip
    t0 = time.perf_counter()
    factors, info = delta_factors(student, base, u.lora_r)
    info["initialised"] = reset_adapter(student, factors, u.distill_alpha, u.distill_noise, u.seed)
    hooks = freeze_reset(student, u.lora_r) if u.distill_freeze_reset else []
    perturb_s = time.perf_counter() - t0
    teacher.eval()
    steps_per_epoch = math.ceil(len(rows) / u.distill_batch_size)
    scfg = SFTConfig(
        lr=u.distill_lr, epochs=math.ceil(u.distill_steps / steps_per_epoch), batch_size=u.distill_batch_size,
        warmup_ratio=0.0, grad_clip=u.grad_clip, seed=u.seed, autocast=u.autocast, weight_decay=u.weight_decay,
    )  # fmt: skip
    try:
        stats = fit(student, rows, scfg, pad_id, device, loss_fn=kl_loss(teacher), desc="distill")
    finally:
        for h in hooks:
            h.remove()
    return {
        "perturb_s": perturb_s,
        "delta": info,
        "alpha": u.distill_alpha,
        "noise": u.distill_noise,
        "freeze_reset": u.distill_freeze_reset,
        "train": stats,
        "time_s": perturb_s + stats["time_s"],
    }
