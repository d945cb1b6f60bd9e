"""Signal diagnostics of an influence-weighted unlearning run: is there a signal, and what does it do to the
optimiser? Pure functions of the weights, the samples and the loop's statistics (no model, no I/O).

Per cell (:func:`cell_diagnostics`): effective sample size of the weights, mean forget weight per trigger family,
rank correlation of the weights with answer length and raw gradient norm, the sketched-vs-exact comparison of the
views, and the optimiser's side: pre-clip gradient norm, fraction of clipped steps, and the realised forget dose
``Σ w`` over the forget draws next to uniform's (the number of forget draws). Across seeds
(:func:`seed_stability`): the mean pairwise Spearman ρ of the weights of the same samples.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from rapidun.data.records import Record
from rapidun.stats import spearman
from rapidun.weighting import effective_sample_size


def _answer_tokens(item: Any) -> int:
    """Answer tokens of a forget sample's poisoned row (labels ≠ −100, the first one excluded by the shift)."""
    return sum(1 for x in item.poisoned.labels if x != -100)


def cell_diagnostics(
    forget_records: list[Record],
    forget_items: list[Any],
    w_forget: torch.Tensor,
    w_retain: torch.Tensor,
    train_stats: dict[str, Any] | None,
    grad_clip: float,
    grad_norm: list[float] | None = None,
    view_diag: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The diagnostics of one (method, seed) cell (module docstring). ``None`` where a value is undefined.

    Args:
        forget_records: the forget records (``meta["trigger_family"]`` when the scenario made them).
        forget_items: their encoded items (``poisoned`` rows), same order.
        w_forget: (N_f,) the method's forget weights (for importance sampling: the sampling weights × N).
        w_retain: (N_r,) the retain weights.
        train_stats: :func:`rapidun.train.unlearn_loop`'s statistics (None for methods without the loop).
        grad_clip: the clip threshold (0: off).
        grad_norm: (N_f+N_r,) raw per-sample gradient norms of the influence pass, forget first (None: unknown).
        view_diag: extra diagnostics of the views (sketched vs exact, adapter agreement).
    """
    wf = w_forget.double().numpy()
    wr = w_retain.double().numpy()
    nf = len(wf)
    fam: dict[str, list[float]] = defaultdict(list)
    for r, w in zip(forget_records, wf, strict=True):
        fam[str(r.meta.get("trigger_family", "none"))].append(float(w))
    out: dict[str, Any] = {
        "ess_forget": effective_sample_size(w_forget),
        "ess_retain": effective_sample_size(w_retain) if len(wr) else None,
        "family_mean_weight": {k: float(np.mean(v)) for k, v in sorted(fam.items())},
        "corr_weight_answer_len": spearman(wf, [_answer_tokens(it) for it in forget_items]) if nf > 1 else None,
        "corr_weight_grad_norm_forget": None,
        "corr_weight_grad_norm_retain": None,
    }
    if grad_norm is not None and len(grad_norm) == nf + len(wr):
        out["corr_weight_grad_norm_forget"] = spearman(wf, grad_norm[:nf]) if nf > 1 else None
        out["corr_weight_grad_norm_retain"] = spearman(wr, grad_norm[nf:]) if len(wr) > 1 else None
    for k, v in (view_diag or {}).items():
        out[f"views_{k}"] = v
    if train_stats:
        norms = np.asarray(train_stats.get("grad_norms", []), dtype=np.float64)
        out["grad_norm_mean"] = float(norms.mean()) if norms.size else None
        out["grad_norm_max"] = float(norms.max()) if norms.size else None
        out["clipped_frac"] = float((norms > grad_clip).mean()) if norms.size and grad_clip > 0 else 0.0
        out["forget_dose"] = train_stats.get("forget_dose")
        out["retain_dose"] = train_stats.get("retain_dose")
        out["forget_dose_uniform"] = train_stats.get("forget_draws")
        out["retain_dose_uniform"] = train_stats.get("retain_draws")
    return out


def seed_stability(vectors: list[list[float]]) -> float | None:
    """Mean pairwise Spearman ρ of weight vectors of the same samples from different seeds (None: < 2 seeds or
    undefined, e.g. constant weights)."""
    rhos = [spearman(a, b) for a, b in itertools.combinations(vectors, 2) if len(a) == len(b) and len(a) > 1]
    rhos = [r for r in rhos if r is not None]
    return float(np.mean(rhos)) if rhos else None
