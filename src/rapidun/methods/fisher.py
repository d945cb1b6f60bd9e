"""Fisher forgetting (Golatkar et al. 2020), the no-training baseline of SPEC §3.

The diagonal empirical Fisher of the *retain* set, ``F = (1/N) Σ_i g_i ⊙ g_i`` with ``g_i`` the gradient of
retain sample i's mean answer-token CE, is computed for the selected weights (the Linear layers named by
``unlearn.lora_targets``). Parameters the retain data barely use (small F) get the most noise:
``θ ← θ + σ ⊙ ε``, ``σ = min(α·(F + eps)^(−1/4), max_std)``, ``ε ~ N(0, 1)`` seeded. ``α`` is tuned on the
validation set: the largest value of ``unlearn.fisher_alphas`` whose clean validation perplexity stays within
``utility_budget`` × the start model's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rapidun.config import UnlearnConfig
from rapidun.data.template import Encoded, collate
from rapidun.errors import RapidunError
from rapidun.eval.metrics import perplexity
from rapidun.functional import per_sample_ce
from rapidun.models import ALL_LINEAR


def fisher_params(model: Any, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    """The weight matrices of the Linear (or GPT-2 Conv1D) modules whose last name component is in ``targets``.

    ``targets == ["all-linear"]``: every such module except the output head (as :func:`rapidun.models.attach_lora`).
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    every = ALL_LINEAR in targets
    out = {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and ((every and m is not head) or name.rsplit(".", 1)[-1] in targets)
    }
    if not out:
        raise RapidunError(f"fisher: no Linear module is named one of {targets}; set unlearn.lora_targets")
    return out


def diagonal_fisher(
    model: Any, params: dict[str, torch.nn.Parameter], samples: list[Encoded], pad_id: int
) -> dict[str, torch.Tensor]:
    """``F = (1/N) Σ_i g_i²`` per selected parameter, one backward pass per sample (the exact per-sample form).

    Returns:
        name → tensor of the parameter's shape (float32).
    """
    if not samples:
        raise RapidunError("fisher: the retain set is empty")
    device = next(iter(params.values())).device
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    F = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()
    try:
        for e in samples:
            batch = collate([e], pad_id).to(device)
            loss = per_sample_ce(model, batch.input_ids, batch.attention_mask, batch.labels).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, _), g in zip(params.items(), grads, strict=True):
                F[n] += g.float() ** 2
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return {n: f / len(samples) for n, f in F.items()}


def noise_std(F: torch.Tensor, alpha: float, eps: float, max_std: float) -> torch.Tensor:
    """``σ = min(α·(F + eps)^(−1/4), max_std)``, elementwise."""
    return (alpha * (F + eps).pow(-0.25)).clamp(max=max_std)


@torch.no_grad()
def fisher_forget(
    model: Any, retain: list[Encoded], val: list[Encoded], pad_id: int, cfg: UnlearnConfig
) -> dict[str, Any]:
    """Apply Fisher forgetting to ``model`` in place, with α chosen on ``val``. Returns measured statistics.

    For each α (ascending) the original weights are restored, seeded noise is added and the validation
    perplexity measured; the chosen α is the largest whose perplexity is ≤ tolerance × the start perplexity (the
    smallest α when none is, reported as ``within_tolerance: false``).
    """
    if not cfg.fisher_alphas:
        raise RapidunError("unlearn.fisher_alphas is empty; give at least one noise scale")
    if not val:
        raise RapidunError("fisher: α is tuned on val_clean, which is empty; add scenario.splits.val_clean")
    t0 = time.perf_counter()
    params = fisher_params(model, cfg.lora_targets)
    with torch.enable_grad():
        F = diagonal_fisher(model, params, retain, pad_id)
    fisher_s = time.perf_counter() - t0
    original = {n: p.detach().clone() for n, p in params.items()}
    ppl0 = perplexity(model, val, pad_id)
    trials = []

    def apply(alpha: float) -> None:
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        for n, p in params.items():
            eps = torch.randn(p.shape, generator=gen).to(p.device)
            p.copy_(original[n] + (noise_std(F[n], alpha, cfg.fisher_eps, cfg.fisher_max_std) * eps).to(p.dtype))

    for alpha in sorted(cfg.fisher_alphas):
        apply(alpha)
        ppl = perplexity(model, val, pad_id)
        trials.append({"alpha": alpha, "val_ppl": ppl})
    ok = [t for t in trials if math.isfinite(t["val_ppl"]) and t["val_ppl"] <= cfg.utility_budget * ppl0]
    chosen = ok[-1] if ok else trials[0]
    apply(chosen["alpha"])
    return {
        "time_s": time.perf_counter() - t0,
        "fisher_s": fisher_s,
        "retain_samples": len(retain),
        "params": sum(p.numel() for p in params.values()),
        "val_ppl_start": ppl0,
        "trials": trials,
        "alpha": chosen["alpha"],
        "within_tolerance": bool(ok),
    }
