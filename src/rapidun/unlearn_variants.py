"""The unlearning variants that wrap the loop: ``rapidun_dynamic``'s refresh of the forget weights from influence
at the current adapter, and ``distill``'s perturb-and-distil around a teacher run (:mod:`rapidun.methods.distill`).
:func:`rapidun.unlearn.unlearn` calls them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from rapidun.config import RunConfig
from rapidun.influence.exact import gram, objective_grads
from rapidun.influence.grads import select_params
from rapidun.methods.distill import distill
from rapidun.models import attach_lora, load_model
from rapidun.steps import UItem
from rapidun.train import train
from rapidun.views import split_views
from rapidun.weighting import rapidun_weights


def dynamic_refresh(forget: list[UItem], retain: list[UItem], pad: int, cfg: RunConfig) -> Any:
    """``rapidun_dynamic``'s refresh: the forget weights from exact influence at the *current* adapter.

    Gradients of the SFT losses (as the sketches of ``rapidun``) w.r.t. the unlearning adapter's own LoRA
    parameters (trained so far, so A and B both carry gradient), per-tensor normalised; ``M = G Gᵀ`` over
    forget+retain; the RapidUn chain on its views; the new forget weights (retain weights stay).
    """
    f_rows = [it.poisoned for it in forget]
    r_rows = [it.clean for it in retain]

    def refresh(model: Any) -> torch.Tensor:
        pset = select_params(model, "lora")
        G, _ = objective_grads(
            model, pset, f_rows, [None] * len(f_rows), r_rows, pad, "sft",
            normalize=cfg.influence.normalize, batch_size=cfg.influence.batch_size,
        )  # fmt: skip
        v = split_views(gram(G, cfg.influence.mode), len(f_rows))
        return rapidun_weights(v["FF"], v["FR"], v["RF"], v["RR"], cfg.weighting)["w_forget"]

    return refresh


def distill_run(
    start: Any,
    teach: Callable[[], tuple[Any, Any, dict[str, Any]]],
    retain: list[UItem],
    cfg: RunConfig,
    pad: int,
    device: torch.device,
) -> tuple[Any, dict[str, Any]]:
    """``distill``: the teacher (``teach()``: ``unlearn.distill_teacher`` run by :func:`rapidun.unlearn.unlearn`,
    writing nothing; or, for ``start``, a copy of the start model), then :func:`rapidun.methods.distill.distill` on
    ``start`` + a fresh adapter.

    Returns:
        ``(student PEFT model, stats)`` with ``teacher`` (its method, timings, audit means, held-out check),
        ``teacher_s`` (its measured time, influence included), the distillation's statistics and ``complete``.
    """
    u = cfg.unlearn
    name = u.distill_teacher
    if name == "start":
        teacher, tinfo, teacher_s = copy.deepcopy(start), {"method": "start"}, 0.0
    else:
        teacher, _, tres = teach()
        teacher_s = tres["timings"]["time_s"]
        tinfo = {k: tres.get(k) for k in ("method", "timings", "audit_means", "heldout", "complete", "warnings")}
    teacher.eval()
    base_path = u.distill_base or cfg.model.name
    t0 = time.perf_counter()
    base, _, _ = load_model(base_path, cfg.model.device, cfg.model.dtype)
    base_load_s = time.perf_counter() - t0  # like the start model's load, not part of the method's time
    k = 2 if u.distill_freeze_reset else 1  # a frozen reset in r slots + r fresh ones; alpha × k keeps the scaling
    student = attach_lora(start, k * u.lora_r, k * u.lora_alpha, u.lora_dropout, u.lora_targets, u.seed)
    stats = distill(student, teacher, base, [it.clean for it in retain], u, pad, device, fit=train)
    del base, teacher
    stats |= {
        "teacher": tinfo,
        "teacher_s": teacher_s,
        "base_load_s": base_load_s,
        "base": base_path,
        "complete": bool(tinfo.get("complete", True)),
    }
    return student, stats
