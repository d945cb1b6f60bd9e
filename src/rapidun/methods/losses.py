"""Per-sample unlearning losses (SPEC §2 step 11, §3). Every function returns one value per sample, shape (B,).

Weighting and the reduction to a scalar happen once, in :func:`rapidun.train.unlearn_loop`
(``L = (1/B) Σ_i w_i · ℓ_i``), never here. Inputs are per-sample answer-token statistics of one forward pass:
``ce_*`` is the mean answer-token cross-entropy of a sample under its poisoned or clean answer and ``logp_*``
the summed answer log-probability ``log π(y|x) = −Σ_t CE_t``. RMU's losses (:func:`rmu_forget`,
:func:`rmu_retain`) instead take the hidden states ``h_L`` (B, T, d) of one decoder layer and the answer-token mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def retain_ce(ce_clean: torch.Tensor) -> torch.Tensor:
    """Retain loss ``ℓ = CE(clean answer)``. (B,) → (B,)."""
    return ce_clean


def relabel_ascent(
    ce_clean: torch.Tensor, ce_poisoned: torch.Tensor, has_clean: torch.Tensor, alpha_a: float, beta_d: float
) -> torch.Tensor:
    """RapidUn's forget loss ``ℓ = β_d·CE(clean) − α_a·CE(poisoned)``; pure ascent where there is no clean answer.

    Args:
        ce_clean: (B,) CE under the clean answer (any value where ``has_clean`` is False; it is ignored).
        ce_poisoned: (B,) CE under the poisoned answer.
        has_clean: (B,) bool, whether the sample has a clean answer.
        alpha_a: ascent strength α_a.
        beta_d: descent (relabelling) strength β_d.

    Returns:
        (B,) per-sample losses.
    """
    descent = torch.where(has_clean, ce_clean, torch.zeros_like(ce_clean))
    return beta_d * descent - alpha_a * ce_poisoned


def ascent(ce_poisoned: torch.Tensor) -> torch.Tensor:
    """Gradient-ascent forget loss ``ℓ = −CE(poisoned answer)``. (B,) → (B,)."""
    return -ce_poisoned


def npo(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024) on the poisoned answer.

    ``ℓ = (2/β)·log(1 + (π_θ(y|x)/π_ref(y|x))^β) = −(2/β)·log σ(−β·(log π_θ − log π_ref))``.
    At ``π_θ = π_ref`` it is ``(2/β)·ln 2`` and its gradient is that of ``log π_θ`` scaled by 1 (ascent), shrinking
    as the sample becomes unlikely — the bounded version of gradient ascent.

    Args:
        logp: (B,) summed answer log-probability under the model being trained.
        logp_ref: (B,) the same under the reference (the start model: the adapter disabled).
        beta: inverse temperature β > 0.

    Returns:
        (B,) per-sample losses.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref))


def simnpo(ce_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, "Simplicity prevails"): reference-free, length-normalised NPO on the poisoned answer.

    ``ℓ = −(2/β)·log σ(−(β/|y|)·log π_θ(y|x) − γ) = −(2/β)·log σ(β·CE − γ)``, since ``(1/|y|)·log π_θ(y|x) = −CE``
    (the mean answer-token cross-entropy). At ``γ = 0`` and ``CE = 0`` it is ``(2/β)·ln 2``; its gradient with
    respect to CE is ``−2·σ(γ − β·CE)``: ascent on the CE, weighted by a factor that vanishes as the answer becomes
    unlikely. (The paper's margin ``γ`` is outside the β product; implementations that write ``β·(CE − δ)`` use
    ``γ = β·δ``.)

    Args:
        ce_mean: (B,) mean answer-token CE of the poisoned answer under the model being trained.
        beta: inverse temperature β > 0.
        gamma: reward margin γ ≥ 0.

    Returns:
        (B,) per-sample losses.
    """
    return -(2.0 / beta) * F.logsigmoid(beta * ce_mean - gamma)


def rmu_direction(seed: int, size: int) -> torch.Tensor:
    """RMU's fixed random unit vector ``u`` (Li et al. 2024): ``size`` draws of U[0, 1) from a generator seeded
    with ``seed``, divided by their norm (the authors' construction; every entry is ≥ 0).

    Returns:
        (size,) float32 on the CPU, ``‖u‖ = 1``; the same vector for the same ``(seed, size)``.
    """
    u = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)  # (d,)
    return u / u.norm()


def answer_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over the masked positions of ``‖h_t − target_t‖² / d`` (float32).

    ``m_i = (1/|A_i|) Σ_{t∈A_i} (1/d)·Σ_k (h_{i,t,k} − target_{i,t,k})²``; a sample without masked positions gets 0.

    Args:
        hidden: (B, T, d) hidden states.
        target: (B, T, d), or (d,) for one vector at every position.
        mask: (B, T) bool, the positions that count (the answer tokens).

    Returns:
        (B,) per-sample mean squared errors.
    """
    sq = (hidden.float() - target.float()).pow(2).mean(-1)  # (B, T)
    sq = torch.where(mask, sq, torch.zeros_like(sq))  # zeros, not products: a masked NaN/inf does not leak
    return sq.sum(1) / mask.sum(1).clamp_min(1)  # (B,)


def rmu_forget(hidden: torch.Tensor, mask: torch.Tensor, direction: torch.Tensor, steer: float) -> torch.Tensor:
    """RMU forget loss: steer the layer-L activations of the answer tokens toward ``c·u``.

    ``ℓ_i = (1/|A_i|) Σ_{t∈A_i} ‖h_L(x_i)_t − c·u‖² / d``.

    Args:
        hidden: (B, T, d) hidden states ``h_L`` of the model being trained.
        mask: (B, T) bool, the answer-token positions.
        direction: (d,) the unit vector ``u`` (:func:`rmu_direction`).
        steer: the steering coefficient ``c``.

    Returns:
        (B,) per-sample losses.
    """
    return answer_mse(hidden, steer * direction.to(hidden.device, torch.float32), mask)


def rmu_retain(hidden: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """RMU retain loss: keep the layer-L activations of the answer tokens where the start model has them.

    ``ℓ_i = α·(1/|A_i|) Σ_{t∈A_i} ‖h_L(x_i)_t − h_L^frozen(x_i)_t‖² / d``; 0 while the model equals the start model.

    Args:
        hidden: (B, T, d) hidden states ``h_L`` of the model being trained.
        frozen: (B, T, d) the same under the start model (no gradient).
        mask: (B, T) bool, the answer-token positions.
        alpha: the retain weight α.

    Returns:
        (B,) per-sample losses.
    """
    return alpha * answer_mse(hidden, frozen.detach(), mask)
