"""Robust variants of one unlearning step: gradients that still hold after a push back toward the behaviour.

Both take the step's draws, split the weighted loss ``L = (1/B) Σ_i w_i·ℓ_i`` into its forget part ``L_f`` and
retain part ``L_r`` (same per-sample losses as :func:`rapidun.steps.step_losses`) and leave in ``p.grad`` the
gradient the optimiser then applies (clipping and the step happen in :func:`rapidun.train.unlearn_loop`):

* :func:`sam_grads` — sharpness-aware unlearning (Fan et al., ICML 2025): the forget objective is taken at the
  worst point of a ball of radius ρ around the adapter, ``g = ∇L_f(θ + ε) + ∇L_r(θ)`` with
  ``ε = ρ·∇L_f(θ) / ‖∇L_f(θ)‖`` (first-order SAM). A flat forget minimum is one a small relearning step does not
  climb out of. Cost: one extra forward/backward over the forget rows.
* :func:`adv_grads` — unlearning against a relearning adversary (MUDMAN 2025, first-order meta-learning): a
  forked copy of the adapter first *relearns* the forget set for ``adv_steps`` sign-gradient steps of size
  ``adv_lr`` on CE(poisoned answer) (Adam's first step in size), and the forget gradient is taken there:
  ``g = ∇L_f(θ_adv) + ∇L_r(θ)``. A retain-loss budget skips the forget part of a step whose retain draws' CE
  rose above ``adv_retain_budget`` × their CE at the start. Cost: ``adv_steps`` + 1 extra forward/backward passes
  over the forget rows.

Single-process only (the perturbation and the adversary would need the all-reduced forget gradient under
``torchrun``; :func:`rapidun.train.unlearn_loop` refuses them there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rapidun.config import UnlearnConfig

Draws = list[tuple[str, int]]
# (draws) -> ((B',) per-sample losses of those draws, rows, tokens): rapidun.steps.step_losses, all else bound
LossOf = Callable[[Draws], tuple[torch.Tensor, int, int]]


def split_loss(
    loss_of: LossOf, draws: Draws, weight: Callable[[str, int], float], denom: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    """``(L_f, L_r, rows, tokens, ℓ (B,))``: the weighted forget and retain parts of ``L = (1/denom) Σ_i w_i·ℓ_i``
    and the per-sample losses.

    One forward pass over every row of ``draws``; either part is a zero tensor when the step has no such draws.
    """
    ell, rows, tokens = loss_of(draws)  # (B,)
    w = torch.tensor([weight(g, i) for g, i in draws], device=ell.device, dtype=ell.dtype)  # (B,)
    is_f = torch.tensor([g == "forget" for g, _ in draws], device=ell.device)  # (B,)
    wl = w * ell  # (B,)
    return wl[is_f].sum() / denom, wl[~is_f].sum() / denom, rows, tokens, ell


def forget_grad_at(
    move: Callable[[], None],
    loss_of: LossOf,
    params: list[torch.nn.Parameter],
    forget: Draws,
    weight: Callable[[str, int], float],
    denom: int,
) -> tuple[int, int]:
    """Accumulate ``∇L_f`` taken after ``move()`` changed ``params`` in place, then restore them bit for bit
    (θ + ε − ε is not θ in floating point). Returns the extra forward pass's ``(rows, tokens)``."""
    saved = [p.detach().clone() for p in params]
    try:
        move()
        lf, _, rows, tokens, _ = split_loss(loss_of, forget, weight, denom)
        _backward(lf, params)
    finally:
        with torch.no_grad():
            for p, s0 in zip(params, saved, strict=True):
                p.copy_(s0)
    return rows, tokens


def _backward(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Accumulate ``∇loss`` into ``p.grad`` (a no-op for a loss that does not depend on ``params``)."""
    if loss.requires_grad:
        loss.backward()


def sam_grads(
    loss_of: LossOf,
    params: list[torch.nn.Parameter],
    draws: Draws,
    weight: Callable[[str, int], float],
    denom: int,
    rho: float,
) -> dict[str, Any]:
    """Leave ``∇L_f(θ + ε) + ∇L_r(θ)`` in ``p.grad`` (module docstring); parameters are restored afterwards.

    Returns:
        ``{"loss": L(θ) (tensor), "rows", "tokens", "forget_grad_norm"}`` — the loss at θ, for the loss curve, and
        ‖∇L_f(θ)‖ (ε's direction; 0 when the step has no forget draw).
    """
    lf, lr_, rows, tokens, _ = split_loss(loss_of, draws, weight, denom)
    loss = (lf + lr_).detach()
    forget = [d for d in draws if d[0] == "forget"]
    if not forget or not lf.requires_grad:
        _backward(lr_, params)
        return {"loss": loss, "rows": rows, "tokens": tokens, "forget_grad_norm": 0.0}
    g_f = torch.autograd.grad(lf, params, retain_graph=True, allow_unused=True)
    _backward(lr_, params)
    norm = torch.sqrt(sum((g.float().square().sum() for g in g_f if g is not None), torch.zeros(())))

    def ascend() -> None:
        with torch.no_grad():
            for p, g in zip(params, g_f, strict=True):
                if g is not None and norm > 0:
                    p.add_(((rho / norm) * g).to(p.dtype))

    r2, t2 = forget_grad_at(ascend, loss_of, params, forget, weight, denom)
    return {"loss": loss, "rows": rows + r2, "tokens": tokens + t2, "forget_grad_norm": float(norm)}


def adv_grads(
    loss_of: LossOf,
    relearn_of: Callable[[Draws], torch.Tensor],
    params: list[torch.nn.Parameter],
    draws: Draws,
    weight: Callable[[str, int], float],
    denom: int,
    steps: int,
    step_size: float,
    retain_ratio: Callable[[Draws, torch.Tensor], float | None] | None = None,
    budget: float = 0.0,
) -> dict[str, Any]:
    """Leave ``∇L_f(θ_adv) + ∇L_r(θ)`` in ``p.grad`` (module docstring); parameters are restored afterwards.

    Args:
        loss_of: per-sample unlearning losses of some draws (one forward).
        relearn_of: the adversary's scalar loss on some forget draws (mean CE of their poisoned answers).
        params: the trainable parameters (the adapter).
        draws: this step's draws. weight: ``(group, index) -> w``. denom: B of the step.
        steps: the adversary's sign-gradient steps. step_size: their size.
        retain_ratio: ``(retain draws, their per-sample CE at θ (R,)) -> mean CE / their mean CE at the start``
            (None: no budget).
        budget: skip the forget part when the ratio exceeds it (0: never).

    Returns:
        ``{"loss", "rows", "tokens", "skipped"}`` — the loss at θ and whether the budget skipped the forget part.
    """
    lf, lr_, rows, tokens, ell = split_loss(loss_of, draws, weight, denom)
    loss = (lf + lr_).detach()
    _backward(lr_, params)
    forget = [d for d in draws if d[0] == "forget"]
    skipped = False
    is_r = [g == "retain" for g, _ in draws]
    if retain_ratio is not None and budget > 0 and any(is_r):
        retain = [d for d, r in zip(draws, is_r, strict=True) if r]
        ce_r = ell.detach()[torch.tensor(is_r, device=ell.device)]  # (R,) a retain loss is CE(clean answer)
        ratio = retain_ratio(retain, ce_r)
        skipped = ratio is not None and ratio > budget
    if not forget or skipped:
        return {"loss": loss, "rows": rows, "tokens": tokens, "skipped": skipped}

    def relearn() -> None:
        for _ in range(steps):
            la = relearn_of(forget)
            grads = torch.autograd.grad(la, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(step_size * g.sign().to(p.dtype))

    r2, t2 = forget_grad_at(relearn, loss_of, params, forget, weight, denom)
    return {"loss": loss, "rows": rows + r2, "tokens": tokens + t2, "skipped": False}


def stepper(
    robust: str,
    loss_of: LossOf,
    relearn_of: Callable[[Draws], torch.Tensor],
    params: list[torch.nn.Parameter],
    cfg: UnlearnConfig,
    start_ce: torch.Tensor | None,
) -> Callable[[Draws, torch.Tensor, torch.Tensor, int], dict[str, Any]]:
    """``(draws, w_f (N_f,), w_r (N_r,), B) -> result`` of :func:`sam_grads` or :func:`adv_grads` for ``robust``.

    ``start_ce``: (N_r,) the retain samples' CE at the start (the adversary's retain budget; None: no budget).
    """

    def retain_ratio(draws: Draws, ce: torch.Tensor) -> float | None:
        if start_ce is None:
            return None
        base = float(start_ce[[i for _, i in draws]].mean())
        return float(ce.float().mean()) / base if base > 0 else None

    def step(draws: Draws, w_f: torch.Tensor, w_r: torch.Tensor, denom: int) -> dict[str, Any]:
        def weight(g: str, i: int) -> float:
            return float(w_f[i]) if g == "forget" else float(w_r[i])

        if robust == "sam":
            return sam_grads(loss_of, params, draws, weight, denom, cfg.sam_rho)
        return adv_grads(loss_of, relearn_of, params, draws, weight, denom, cfg.adv_steps, cfg.adv_lr,
                         retain_ratio, cfg.adv_retain_budget)  # fmt: skip

    return step
