"""Per-sample unlearning losses (SPEC §2 step 11, §3). Every function returns one value per sample, shape (B,).

Weighting and the reduction to a scalar happen once, in :func:`rapidun.train.unlearn_loop`
(``L = (1/B) Σ_i w_i · ℓ_i``), never here. Inputs are per-sample answer-token statistics of one forward pass:
``ce_*`` is the mean answer-token cross-entropy of a sample under its poisoned or clean answer and ``logp_*``
the summed answer log-probability ``log π(y|x) = −Σ_t CE_t``.
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
