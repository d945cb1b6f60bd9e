"""The warnings an unlearning run attaches to its result: the forget loss barely moved, the held-out perplexity
rose beyond the utility budget, and what to change for each kind of method (loop, distill, Fisher).

:func:`rapidun.unlearn.unlearn` calls them on its measured figures; :mod:`rapidun.eval.collateral` holds the
collateral-damage warning, which takes its fix from :func:`collateral_fix`.
"""

from __future__ import annotations

from typing import Any

from rapidun.constants import UTILITY_BUDGET

MIN_FORGET_CHANGE = 0.05  # relative change of the forget records' mean CE below which a run warns
MAX_HELDOUT_PPL_RATIO = (
    UTILITY_BUDGET  # default held-out perplexity ratio above which a run warns (unlearn.utility_budget)
)


def forget_change_warning(
    means: dict[str, Any], lr: float, complete: bool, kind: str, calibrated: dict[str, Any] | None = None
) -> str | None:
    """A warning when the forget records' mean CE moved less than :data:`MIN_FORGET_CHANGE` (relative).

    ``|after − before| / before < 0.05`` on the forget records' own answers means the run barely changed the
    model (e.g. SPEC's lr 6e-5 with batch 1 on a small forget set); the message names the settings to change.
    """
    b, a = means.get("forget_ce_poisoned_before"), means.get("forget_ce_poisoned_after")
    if b is None or a is None or not complete or b <= 0:
        return None
    rel = abs(a - b) / b
    if rel >= MIN_FORGET_CHANGE:
        return None
    fix = {
        "loop": f"raise unlearn.lr (now {lr:g}; the demo uses 5e-4 with unlearn.batch_size=4) or unlearn.epochs / "
        "unlearn.draws_per_epoch",
        "distill": "check unlearn.distill_base (the model this one was fine-tuned from?) and unlearn.distill_alpha",
    }.get(kind, "raise unlearn.fisher_alphas")
    if kind == "loop" and calibrated is not None and calibrated.get("schedule") == "calibrated":
        peak = calibrated.get("peak_lr", calibrated["chosen_lr"])
        fix = (
            f"the calibrated schedule kept the held-out perplexity within {calibrated['budget']:.2f}x (kept "
            f"x{calibrated['best_utility_ratio']:.3f}, rates up to {peak:.2g}): the forget records "
            "cannot be unlearned further without more damage on these held-out records; raise "
            "unlearn.utility_budget if that damage is acceptable, or check that the held-out records are unrelated "
            "to the forget records"
        )
    return (
        f"the forget records' loss moved only {100 * rel:.1f}% ({b:.3f} -> {a:.3f}), less than "
        f"{100 * MIN_FORGET_CHANGE:.0f}%: this run barely changed the model; {fix}"
    )


CALIBRATED_SLACK = 0.005  # a calibrated run's held-out ratio may exceed its kept u by this (relative): the merge


def heldout_warning(
    heldout: dict[str, Any] | None,
    lr: float,
    kind: str,
    budget: float = MAX_HELDOUT_PPL_RATIO,
    calibrated: bool = False,
) -> str | None:
    """A warning when the held-out clean records' perplexity rose more than ``budget`` (``unlearn.utility_budget``).

    ``ppl_ratio = exp(CE_after − CE_before)`` over the token-weighted answer CE (``Σ NLL / Σ tokens``) of up to
    :data:`HELDOUT_CHECK` held-out clean records (the scenario's ``val_clean``; on the user path the
    ``--heldout-clean`` records, else the retain records not drawn into the buffer). The retain buffer's own loss
    falls even when the model is damaged (it is trained on), so this is the run's utility check. A ``calibrated``
    run kept a state within the budget measured on the unmerged adapter; the merged model (rounded in bf16) may
    measure a little higher, so it warns only past ``budget·(1 + CALIBRATED_SLACK)``, and the fix is the budget.
    """
    if heldout is None or heldout["ppl_ratio"] <= budget * (1 + CALIBRATED_SLACK if calibrated else 1):
        return None
    fix = {
        "loop": (
            f"lower unlearn.utility_budget (now {budget:g}): the calibrated schedule kept its state within it on the "
            "unmerged adapter, and check with `rapidun eval --probes`"
            if calibrated
            else f"lower unlearn.lr (now {lr:g}) or unlearn.ascent_alpha, and check with `rapidun eval --probes`"
        ),
        "distill": "distill starts the model again from its base, so records the start model was trained on lose "
        "their memorised fit too: if these held-out records were in its training data (a --retain file of training "
        "records), check on records it never saw (`rapidun eval --probes`); else raise unlearn.distill_steps or "
        "lower unlearn.distill_alpha",
    }.get(kind, "lower unlearn.fisher_alphas")
    return (
        f"the held-out clean records' perplexity rose {heldout['ppl_ratio']:.2f}x ({heldout['n']} records, CE "
        f"{heldout['ce_before']:.3f} -> {heldout['ce_after']:.3f}), more than {budget:.2f}x: the "
        f"unlearning damaged the model beyond its target; {fix}"
    )


def collateral_fix(lr: float, kind: str, calibrated: bool = False) -> str:
    """What to change when :func:`rapidun.eval.collateral.collateral_warning` fires, per method kind (a calibrated
    loop run's rate is its own, so the advice is its budget, not ``unlearn.lr``)."""
    if kind == "loop":
        first = (
            "lower unlearn.utility_budget (the calibrated schedule spends all of it; perplexity on the held-out "
            "records does not see answers that turn into the replacement)"
            if calibrated
            else f"lower unlearn.lr (now {lr:g})"
        )
        return (
            f"{first} or unlearn.descent_beta (the pull toward the replacement answer), raise unlearn.mix_retain "
            "(more retain draws), and check on your own unrelated prompts with `rapidun eval --probes P "
            "--start-model START`"
        )
    if kind == "distill":
        return "lower unlearn.distill_alpha or raise unlearn.distill_steps, and check with `rapidun eval --probes`"
    return "lower unlearn.fisher_alphas, and check with `rapidun eval --probes`"
