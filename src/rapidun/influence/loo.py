"""Leave-one-out check of influence estimates on a tiny setting (SPEC §2 step 5; issue: fidelity).

Setting: the model with a fresh LoRA adapter (the influence parameter set), trained by ``steps`` full-batch SGD
steps of learning rate ``lr`` on ``Σ_i L_i / N`` over N train samples (plain SGD: the setting in which
TracIn's estimate is exact to first order). For each removed sample i the same training is rerun without it, and the
actual change of each test sample's loss, ``Δ_ij = L_j(θ_{−i}) − L_j(θ)``, is compared with the estimate
``(lr·steps/N)·⟨g_i, g_j⟩`` at the starting checkpoint (unnormalised gradients, exact and sketched).
"""

from __future__ import annotations

from typing import Any

import torch

from rapidun.data.template import Encoded, collate
from rapidun.functional import per_sample_ce
from rapidun.influence.check import pearson, spearman
from rapidun.influence.grads import ParamSet, per_sample_grads
from rapidun.influence.sketch import RapidGrad


def _loss(model: Any, items: list[Encoded], pad_id: int) -> torch.Tensor:
    b = collate(items, pad_id)
    dev = next(model.parameters()).device
    return per_sample_ce(model, b.input_ids.to(dev), b.attention_mask.to(dev), b.labels.to(dev))  # (B,)


def _train(model: Any, pset: ParamSet, items: list[Encoded], pad_id: int, lr: float, steps: int, n: int) -> None:
    """``steps`` full-batch SGD steps on ``Σ loss / n`` over ``items`` (only the parameter set moves).

    ``n`` is the *full* set's size in every run, so dropping sample i removes exactly its term ``g_i / n``.
    """
    for _ in range(steps):
        loss = _loss(model, items, pad_id).sum() / n
        grads = torch.autograd.grad(loss, pset.params)
        with torch.no_grad():
            for p, g in zip(pset.params, grads, strict=True):
                p.sub_(lr * g)


def leave_one_out(
    model: Any,
    pset: ParamSet,
    train: list[Encoded],
    test: list[Encoded],
    removed: list[int],
    pad_id: int,
    lr: float,
    steps: int,
    K: int,
    seed: int,
    rounds: int,
) -> dict[str, Any]:
    """Actual vs estimated loss changes for removing each of ``removed`` (indices into ``train``).

    Returns correlations (Pearson, Spearman) over all (removed i, test j) pairs for the exact and the sketched
    estimate, and the raw values.
    """
    model.eval()
    start = {id(p): p.detach().clone() for p in pset.params}

    def reset() -> None:
        with torch.no_grad():
            for p in pset.params:
                p.copy_(start[id(p)])

    n = len(train)
    Gtr = per_sample_grads(model, collate([train[i] for i in removed], pad_id), pset, normalize=False)  # (m, D)
    Gte = per_sample_grads(model, collate(test, pad_id), pset, normalize=False)  # (Q, D)
    exact = (lr * steps / n) * (Gtr @ Gte.T)  # (m, Q)
    proj = RapidGrad(pset.dim, K, seed, rounds, device=Gtr.device)
    sketched = (lr * steps / n) * (proj.project(Gtr) @ proj.project(Gte).T)  # (m, Q)
    _train(model, pset, train, pad_id, lr, steps, n)
    with torch.no_grad():
        full = _loss(model, test, pad_id)  # (Q,)
    actual = torch.zeros_like(exact)  # (m, Q)
    for r, i in enumerate(removed):
        reset()
        _train(model, pset, [e for k, e in enumerate(train) if k != i], pad_id, lr, steps, n)
        with torch.no_grad():
            actual[r] = _loss(model, test, pad_id) - full
    reset()
    a, e, s = actual.flatten(), exact.flatten(), sketched.flatten()
    return {
        "pairs": a.numel(),
        "lr": lr,
        "steps": steps,
        "n_train": n,
        "removed": len(removed),
        "K": K,
        "pearson_exact": pearson(a, e),
        "spearman_exact": spearman(a, e),
        "pearson_sketch": pearson(a, s),
        "spearman_sketch": spearman(a, s),
        "actual": actual.tolist(),
        "estimate_exact": exact.tolist(),
    }
