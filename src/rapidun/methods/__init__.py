"""Unlearning methods, registered by name (SPEC §3): same data, same loop, same budget.

A :class:`Method` is a declaration, not code: which forget loss, whether retain samples are drawn (with the
retain CE loss), and where the per-sample weights come from. :func:`rapidun.unlearn.unlearn` turns it into a
run of :func:`rapidun.train.unlearn_loop`; ``fisher`` (no training) and ``retrain`` (the SFT reference) are the
two methods outside that loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from rapidun.config import METHOD_NAMES
from rapidun.errors import RapidunError


@dataclass(frozen=True)
class Method:
    """What one method does.

    Attributes:
        name: registry name.
        kind: ``"loop"`` (the unlearning loop), ``"fisher"`` (noise injection), ``"distill"`` (a teacher method,
            then perturb-and-distil, :mod:`rapidun.methods.distill`) or ``"retrain"`` (SFT reference).
        forget_loss: ``"relabel_ascent"`` (β_d·CE(clean) − α_a·CE(poisoned)), ``"ascent"`` (−CE(poisoned)),
            ``"npo"``, ``"simnpo"`` or ``"rmu"`` (a representation loss; its retain loss is one too); empty for
            non-loop kinds.
        retain: whether retain samples are drawn (loss CE on the clean answer). Without, every draw is a forget
            sample.
        weights: ``"uniform"`` (all 1), ``"rapidun"`` (influence weights), ``"random"`` (RapidUn's weights
            permuted within each group), ``"coverage"`` (forget samples the other forget samples explain least
            weigh more, :func:`rapidun.weighting.coverage_weights`; retain weights 1), ``"loreun"`` (w ∝ exp(−ℓ/τ),
            static), ``"loreun_dynamic"`` (the same, re-computed every ``unlearn.loreun_every`` steps) or
            ``"loreun_hard_high"`` (w ∝ exp(+ℓ/τ)).
        summary: one line for ``rapidun unlearn --help`` and the report.
        views: where the influence views come from: ``""`` (none), ``"sketch"`` (RapidIn sketches of the SFT
            loss gradients, SPEC §2), ``"stable"`` (exact inner products averaged over
            ``influence.stable_adapters`` gradient adapters) or ``"aligned"`` (exact inner products of the
            gradients of the losses the unlearning applies; see :func:`rapidun.unlearn.exact_views`).
        sampling: ``"uniform"`` (draws uniform within each group, loss weighted by w) or ``"weighted"``
            (importance sampling: draws ∝ w within each group, every loss weight 1).
        dynamic: re-compute the forget weights from influence at the current adapter every
            ``unlearn.dynamic_every`` steps.
        robust: the loop's step: ``""`` (plain), ``"sam"`` (sharpness-aware) or ``"adv"`` (against a relearning
            adversary); :mod:`rapidun.methods.robust`.
        expand: where the forget pack comes from: ``""`` (as given) or ``"trace"`` (the given pack ∪ the corpus
            records that tracing flags for the behaviour, the flagged ones out of the retain pack; needs a
            scenario's corpus and validation probes, :mod:`rapidun.cover`).
    """

    name: str
    kind: str
    forget_loss: str
    retain: bool
    weights: str
    summary: str
    views: str = ""
    sampling: str = "uniform"
    dynamic: bool = False
    robust: str = ""
    expand: str = ""

    @property
    def needs_influence(self) -> bool:
        return bool(self.views)


# fmt: off
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "rapidun", "loop", "relabel_ascent", True, "rapidun", "relabel+ascent, influence-weighted (RapidUn)",
            views="sketch",
        ),
        Method("uniform", "loop", "relabel_ascent", True, "uniform", "relabel+ascent, all weights 1"),
        Method("ga", "loop", "ascent", False, "uniform", "gradient ascent on the poisoned answers only"),
        Method("graddiff", "loop", "ascent", True, "uniform", "ascent on forget + descent on retain"),
        Method("npo", "loop", "npo", True, "uniform", "negative preference optimisation + retain CE"),
        Method(
            "simnpo", "loop", "simnpo", True, "uniform", "SimNPO: reference-free, length-normalised NPO + retain CE"
        ),
        Method(
            "rmu", "loop", "rmu", True, "uniform",
            "RMU: forget activations at layer unlearn.rmu_layer steered to a random direction, retain ones kept",
        ),
        Method("loreun", "loop", "relabel_ascent", True, "loreun", "LoReUn: lower-loss forget samples weigh more"),
        Method("loreun_dynamic", "loop", "relabel_ascent", True, "loreun_dynamic", "LoReUn, weights re-computed"),
        Method("loreun_hard_high", "loop", "relabel_ascent", True, "loreun_hard_high", "reversed LoReUn (authors)"),
        Method("fisher", "fisher", "", False, "uniform", "Fisher forgetting: noise ∝ F_retain^(-1/4), α on val"),
        Method(
            "random", "loop", "relabel_ascent", True, "random", "RapidUn's weights permuted within each group",
            views="sketch",
        ),
        Method(
            "rapidun_sampled", "loop", "relabel_ascent", True, "rapidun",
            "importance sampling: draws in proportion to RapidUn's weights, every loss weight 1", views="sketch",
            sampling="weighted",
        ),
        Method(
            "rapidun_aligned", "loop", "relabel_ascent", True, "rapidun",
            "RapidUn weighting on exact influence of the unlearning losses themselves", views="aligned",
        ),
        Method(
            "rapidun_stable", "loop", "relabel_ascent", True, "rapidun",
            "RapidUn weighting on exact influence averaged over several gradient adapters", views="stable",
        ),
        Method(
            "coverage", "loop", "relabel_ascent", True, "coverage",
            "forget samples the others explain least weigh more (inverse FF coverage); retain weights 1",
            views="sketch",
        ),
        Method(
            "rapidun_dynamic", "loop", "relabel_ascent", True, "rapidun",
            "RapidUn, forget weights re-computed at the current adapter every unlearn.dynamic_every steps",
            views="sketch", dynamic=True,
        ),
        Method(
            "distill", "distill", "", False, "uniform",
            "UNDO: unlearn with unlearn.distill_teacher, reset the fine-tuning delta toward the base, distil the "
            "teacher on retain records",
        ),
        Method(
            "sam_uniform", "loop", "relabel_ascent", True, "uniform",
            "uniform with sharpness-aware forget steps (radius unlearn.sam_rho)", robust="sam",
        ),
        Method(
            "adv_uniform", "loop", "relabel_ascent", True, "uniform",
            "uniform against a forked adversary relearning the forget set (unlearn.adv_*)", robust="adv",
        ),
        Method(
            "cover", "loop", "relabel_ascent", True, "uniform",
            "uniform on the given pack + every corpus record tracing flags for the behaviour (unlearn.cover_max)",
            expand="trace",
        ),
        Method("retrain", "retrain", "", False, "uniform", "LoRA fine-tune of the base model on clean data only"),
    )
}
# fmt: on
assert tuple(REGISTRY) == METHOD_NAMES  # the config's list and the registry agree


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is an error listing the valid ones."""
    if name not in REGISTRY:
        raise RapidunError(f"unknown unlearning method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def views_kind(name: str, teacher: str) -> str:
    """The influence views a run of method ``name`` needs (``""``: none): its own, or for ``distill`` its teacher's
    (``teacher`` = ``unlearn.distill_teacher``; ``"start"`` needs none)."""
    m = get_method(name)
    if m.kind == "distill":
        return "" if teacher == "start" else get_method(teacher).views
    return m.views
