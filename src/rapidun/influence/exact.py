"""Exact (unsketched) influence for small sets, and the gradients of the unlearning objective itself.

With a few hundred samples the Gram matrix of the full per-sample gradients is cheap (N × D floats, one matrix
product), so the sketch's noise can be removed instead of estimated. Two gradient *objectives*:

* ``"sft"`` — every sample's gradient is that of its mean answer CE under the answer it carries (a forget sample:
  its poisoned answer). The inner products are what RapidIn's sketches estimate (SPEC §2 step 5).
* ``"aligned"`` — the gradient of the loss the unlearning loop applies to the sample (SPEC §2 step 11): a forget
  sample ``∇(β_d·CE(clean) − α_a·CE(poisoned))`` (pure ascent ``−α_a·∇CE(poisoned)`` without a clean answer or
  with ``β_d = 0``), a retain sample ``∇CE(clean)``. ``⟨g_i, g_j⟩ > 0`` then says "a descent step on i's loss
  also lowers j's loss": on FF, "does unlearning i also unlearn j".

Per-tensor L2 normalisation (RapidIn) is applied to the *combined* gradient, never to its parts.
Notation: B batch, D gradient length, N samples.
"""

from __future__ import annotations

import torch
from torch import nn

from rapidun.data.template import Encoded, collate
from rapidun.errors import RapidunError
from rapidun.influence.grads import ParamSet, per_sample_grads

OBJECTIVES = ("sft", "aligned")


def normalize_blocks(G: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Divide each sample's gradient block of every parameter tensor by its L2 norm (zero blocks stay zero).

    Args:
        G: (N, D) gradients, ``D = sum(sizes)``.
        sizes: length of each parameter tensor's block, in order.

    Returns:
        (N, D) float32.
    """
    if sum(sizes) != G.shape[1]:
        raise RapidunError(f"block sizes sum to {sum(sizes)} but the gradients have length {G.shape[1]}")
    out = []
    for blk in torch.split(G.float(), sizes, dim=1):  # each (N, D_k)
        n = blk.norm(dim=1, keepdim=True)  # (N, 1)
        out.append(torch.where(n > 0, blk / n.clamp_min(1e-30), blk))
    return torch.cat(out, 1)  # (N, D)


def raw_grads(model: nn.Module, pset: ParamSet, rows: list[Encoded], pad_id: int, batch_size: int) -> torch.Tensor:
    """(n, D) float32 per-sample gradients of each row's mean answer CE, *not* normalised, batched."""
    if not rows:
        return torch.zeros(0, pset.dim)
    out = []
    for s in range(0, len(rows), batch_size):
        batch = collate(rows[s : s + batch_size], pad_id)
        out.append(per_sample_grads(model, batch, pset, normalize=False).cpu())  # (B, D)
    return torch.cat(out)  # (n, D)


def objective_grads(
    model: nn.Module,
    pset: ParamSet,
    forget_poisoned: list[Encoded],
    forget_clean: list[Encoded | None],
    retain: list[Encoded],
    pad_id: int,
    objective: str = "sft",
    ascent_alpha: float = 1.0,
    descent_beta: float = 0.5,
    normalize: bool = True,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of forget + retain samples under ``objective`` (see module docstring).

    Args:
        model: the model (with the adapter whose parameters ``pset`` holds).
        pset: the parameter set.
        forget_poisoned: (N_f) encoded poisoned answers. forget_clean: (N_f) encoded clean answers or None.
        retain: (N_r) encoded clean answers.
        pad_id: tokenizer pad id.
        objective: ``"sft"`` or ``"aligned"``.
        ascent_alpha: α_a. descent_beta: β_d (aligned only).
        normalize: per-tensor L2 normalisation of the combined gradient.
        batch_size: samples per batched gradient pass.

    Returns:
        ``(G (N_f+N_r, D) float32, raw_norm (N_f+N_r,))``: the (normalised) gradients, forget rows first, and each
        sample's gradient norm before normalisation.
    """
    if objective not in OBJECTIVES:
        raise RapidunError(f"unknown influence objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if len(forget_clean) != len(forget_poisoned):
        raise RapidunError(f"{len(forget_clean)} clean answers for {len(forget_poisoned)} forget samples")
    Gf = raw_grads(model, pset, forget_poisoned, pad_id, batch_size)  # (N_f, D) ∇CE(poisoned)
    if objective == "aligned":
        Gf = -ascent_alpha * Gf
        has = [k for k, e in enumerate(forget_clean) if e is not None]
        if has and descent_beta != 0:
            Gc = raw_grads(model, pset, [forget_clean[k] for k in has], pad_id, batch_size)  # (H, D)
            Gf[torch.tensor(has)] += descent_beta * Gc
    Gr = raw_grads(model, pset, retain, pad_id, batch_size)  # (N_r, D)
    G = torch.cat([Gf, Gr])  # (N_f+N_r, D)
    norms = G.norm(dim=1)  # (N,)
    if normalize:
        G = normalize_blocks(G, pset.sizes)
    return G, norms


def gram(G: torch.Tensor, mode: str = "dot") -> torch.Tensor:
    """(N, N) exact influence ``⟨g_i, g_j⟩`` (``mode="cosine"``: of the unit vectors), in float64."""
    g = G.double()
    if mode == "cosine":
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    elif mode != "dot":
        raise RapidunError(f"unknown influence mode {mode!r}; choose 'dot' or 'cosine'")
    return g @ g.T  # (N, N)
