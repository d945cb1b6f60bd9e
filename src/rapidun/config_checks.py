"""What a valid config is: one :class:`Check` per field (:data:`CHECKS`), relations between fields
(:data:`RELATIONS`), and :func:`validate`, which reports every problem at once, naming the field, its value and
what it must be. The sections themselves (fields, defaults, help texts) are in :mod:`rapidun.config`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from rapidun.constants import DISTILL_TEACHERS, FUZZ_KINDS, METHOD_NAMES, SPLIT_NAMES, TRACE_SPLITS, VERIFY_ATTACKS
from rapidun.errors import RapidunError

if TYPE_CHECKING:  # the config's types, for annotations only: rapidun.config imports this module
    from rapidun.config import RunConfig, ScenarioConfig


class Check:
    """A value constraint of one field: ``fn(value)`` is true when the value is valid; ``text`` says what is."""

    def __init__(self, text: str, fn: Any) -> None:
        self.text, self.fn = text, fn

    def __call__(self, v: Any) -> bool:
        try:
            return bool(self.fn(v))
        except (TypeError, ValueError):
            return False


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in [lo, hi] (``lo_open``/``hi_open``: the bound itself excluded)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    text = "a finite number" + (" " + " and ".join(parts) if parts else "")
    return Check(
        text,
        lambda v: (
            _finite(v)
            and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi))
        ),
    )


def one_of(*choices: str) -> Check:
    """One of the given strings."""
    return Check("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


POSITIVE = num(0, lo_open=True)
NON_NEGATIVE = num(0)
FRACTION = num(0, 1, hi_open=True)
COUNT = num(1)
SEED = num(0, 2**32 - 1)


def _methods_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(m, str) and m in METHOD_NAMES for m in v)


def _alphas_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(POSITIVE(a) for a in v)


def _targets_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(t, str) and t.strip() for t in v)


def _device_ok(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


TARGETS = Check("a non-empty list of module names (or [all-linear])", _targets_ok)
AUTOCAST = one_of("auto", "bf16", "off")
# Every field's value constraint, checked when a config is loaded (before any model loads or folder is claimed).
CHECKS: dict[str, Check] = {
    "model.device": Check("'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'", _device_ok),
    "model.dtype": one_of("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
    "model.max_length": num(8),
    "model.max_prompt_tokens": COUNT,
    "data.format": one_of("dolly", "alpaca", "qa", "generic"),
    "data.limit": NON_NEGATIVE,
    "scenario.kind": one_of("backdoor", "tofu"),
    "scenario.forget_split": one_of("forget01", "forget05"),
    "scenario.seed": SEED,
    "scenario.forget_size": COUNT,
    "scenario.retain_ratio": POSITIVE,
    **{f"scenario.splits.{name}": NON_NEGATIVE for name in SPLIT_NAMES},
    "scenario.splits.train_poisoned": COUNT,
    "scenario.splits.train_clean": COUNT,
    "sft.lora_r": COUNT,
    "sft.lora_alpha": POSITIVE,
    "sft.lora_dropout": FRACTION,
    "sft.lora_targets": TARGETS,
    "sft.lr": POSITIVE,
    "sft.weight_decay": NON_NEGATIVE,
    "sft.epochs": COUNT,
    "sft.batch_size": COUNT,
    "sft.warmup_ratio": FRACTION,
    "sft.grad_clip": NON_NEGATIVE,
    "sft.seed": SEED,
    "sft.autocast": AUTOCAST,
    "eval.max_new_tokens": COUNT,
    "eval.batch_size": COUNT,
    "eval.threshold": POSITIVE,
    "eval.n_keywords": COUNT,
    "eval.max_clean_freq": num(0, 1),
    "eval.min_z": num(),
    "eval.ppl_samples": NON_NEGATIVE,
    "influence.param_set": one_of("lora", "regex", "embeddings"),
    "influence.lora_r": COUNT,
    "influence.lora_targets": TARGETS,
    "influence.K": COUNT,
    "influence.seed": SEED,
    "influence.rounds": NON_NEGATIVE,
    "influence.batch_size": COUNT,
    "influence.mode": one_of("dot", "cosine"),
    "influence.top_k": COUNT,
    "influence.stable_adapters": COUNT,
    "weighting.top_k": COUNT,
    **{f"weighting.{k}": num() for k in ("alpha", "beta", "gamma", "delta")},
    "weighting.scale_method": one_of("mad", "iqr"),
    "weighting.floor": POSITIVE,
    "weighting.tau_forget": POSITIVE,
    "weighting.tau_retain": POSITIVE,
    "weighting.w_min": POSITIVE,
    "weighting.w_max": POSITIVE,
    "unlearn.methods": Check("a non-empty list of: " + ", ".join(METHOD_NAMES), _methods_ok),
    "unlearn.lora_r": COUNT,
    "unlearn.lora_alpha": POSITIVE,
    "unlearn.lora_dropout": FRACTION,
    "unlearn.lora_targets": TARGETS,
    "unlearn.lr": POSITIVE,
    "unlearn.schedule": one_of("calibrated", "fixed"),
    "unlearn.utility_budget": num(1),
    "unlearn.calibrate_lr_min": POSITIVE,
    "unlearn.calibrate_lr_max": POSITIVE,
    "unlearn.calibrate_probe_draws": COUNT,
    "unlearn.calibrate_every": COUNT,
    "unlearn.calibrate_target": POSITIVE,
    "unlearn.calibrate_max_backoffs": NON_NEGATIVE,
    "unlearn.calibrate_signal_records": NON_NEGATIVE,
    "unlearn.weight_decay": NON_NEGATIVE,
    "unlearn.warmup_ratio": FRACTION,
    "unlearn.epochs": COUNT,
    "unlearn.draws_per_epoch": COUNT,
    "unlearn.mix_retain": NON_NEGATIVE,
    "unlearn.mix_forget": POSITIVE,
    "unlearn.batch_size": COUNT,
    "unlearn.grad_clip": NON_NEGATIVE,
    "unlearn.seed": SEED,
    "unlearn.autocast": AUTOCAST,
    "unlearn.ascent_alpha": NON_NEGATIVE,
    "unlearn.descent_beta": NON_NEGATIVE,
    "unlearn.npo_beta": POSITIVE,
    "unlearn.simnpo_beta": POSITIVE,
    "unlearn.simnpo_gamma": NON_NEGATIVE,
    "unlearn.rmu_layer": COUNT,
    "unlearn.rmu_steer": POSITIVE,
    "unlearn.rmu_alpha": NON_NEGATIVE,
    "unlearn.loreun_tau": POSITIVE,
    "unlearn.loreun_w_min": POSITIVE,
    "unlearn.loreun_w_max": POSITIVE,
    "unlearn.loreun_every": COUNT,
    "unlearn.dynamic_every": COUNT,
    "unlearn.fisher_alphas": Check("a non-empty list of finite numbers > 0", _alphas_ok),
    "unlearn.fisher_eps": POSITIVE,
    "unlearn.fisher_max_std": POSITIVE,
    "unlearn.distill_teacher": Check(
        "a loop or fisher method name, or 'start'",
        lambda v: (
            isinstance(v, str) and (v in DISTILL_TEACHERS or (v in METHOD_NAMES and v not in ("distill", "retrain")))
        ),
    ),
    "unlearn.distill_alpha": num(0, 1),
    "unlearn.distill_noise": NON_NEGATIVE,
    "unlearn.distill_steps": COUNT,
    "unlearn.distill_lr": POSITIVE,
    "unlearn.distill_batch_size": COUNT,
    "unlearn.sam_rho": POSITIVE,
    "unlearn.adv_steps": COUNT,
    "unlearn.adv_lr": POSITIVE,
    "unlearn.adv_retain_budget": NON_NEGATIVE,
    "unlearn.cover_max": NON_NEGATIVE,
    "compare.n_seeds": COUNT,
    "compare.n_boot": COUNT,
    "verify.attacks": Check(
        "a non-empty list of: " + ", ".join(VERIFY_ATTACKS),
        lambda v: isinstance(v, list) and bool(v) and all(a in VERIFY_ATTACKS for a in v),
    ),
    "verify.split": one_of("test", "val"),
    "verify.seeds": COUNT,
    "verify.relearn_k": COUNT,
    "verify.relearn_steps": COUNT,
    "verify.relearn_lr": POSITIVE,
    "verify.relearn_lora_r": COUNT,
    "verify.quant_bits": Check(
        "a non-empty list of integers in 2..16",
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(b, int) and 2 <= b <= 16 for b in v),
    ),
    "verify.quant_group_size": COUNT,
    "verify.quant_backend": one_of("auto", "torchao", "rtn"),
    "verify.fuzz": Check(
        "a list of: " + ", ".join(FUZZ_KINDS),
        lambda v: isinstance(v, list) and all(k in FUZZ_KINDS for k in v),
    ),
    "verify.fuzz_prompts": NON_NEGATIVE,
    "verify.mia_heldout": COUNT,
    "verify.probe_group": Check("a non-empty group name", lambda v: isinstance(v, str) and bool(v.strip())),
    "verify.seed": SEED,
    "trace.n_probes": COUNT,
    "trace.probe_split": one_of(*TRACE_SPLITS),
    "trace.top_k": COUNT,
    "trace.aggregate": one_of("mean", "max", "count"),
    "trace.hotwords": Check(
        "a list of non-empty words", lambda v: isinstance(v, list) and all(isinstance(w, str) and w.strip() for w in v)
    ),
    "trace.n_hotwords": COUNT,
    "trace.auto_z": POSITIVE,
    "trace.seed": SEED,
}
# Relations between fields: (fields named in the message, test, what must hold).
RELATIONS: list[tuple[str, Any, str]] = [
    (
        "model.max_prompt_tokens, model.max_length",
        lambda c: c.model.max_prompt_tokens < c.model.max_length,
        "max_prompt_tokens must be < max_length (the answer needs room)",
    ),
    (
        "scenario.forget_size, scenario.splits.train_poisoned",
        lambda c: c.scenario.forget_size <= c.scenario.splits.train_poisoned,
        "the forget pack is drawn from the poisoned training samples, so forget_size must be <= train_poisoned",
    ),
    (
        "scenario.retain_ratio, scenario.forget_size, scenario.splits.train_clean",
        lambda c: round(c.scenario.retain_ratio * c.scenario.forget_size) <= c.scenario.splits.train_clean,
        "the retain buffer (retain_ratio x forget_size) is drawn from the clean training samples, so it must be "
        "<= train_clean",
    ),
    ("weighting.w_min, weighting.w_max", lambda c: c.weighting.w_min < c.weighting.w_max, "w_min must be < w_max"),
    (
        "unlearn.loreun_w_min, unlearn.loreun_w_max",
        lambda c: c.unlearn.loreun_w_min < c.unlearn.loreun_w_max,
        "loreun_w_min must be < loreun_w_max",
    ),
]


def _get(cfg: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        cfg = getattr(cfg, p)
    return cfg


def _family_problems(sc: ScenarioConfig) -> list[str]:
    """``scenario.families``: each a mapping with a position and at least one seen variant of text."""
    try:
        fams = sc.trigger_families()
    except RapidunError as e:
        return [str(e)]
    out = []
    for i, f in enumerate(fams):
        where = f"scenario.families[{i}] ({f.name!r})"
        if f.position not in ("prefix", "suffix"):
            out.append(f"{where}.position = {f.position!r}: must be 'prefix' or 'suffix'")
        for k in ("seen", "ood"):
            v = getattr(f, k)
            if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
                out.append(f"{where}.{k} = {v!r}: must be a list of non-empty strings")
        if not f.seen:
            out.append(f"{where}.seen: needs at least one trigger variant")
    return out


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Check every field of :data:`CHECKS` and every relation of :data:`RELATIONS`; all problems in one error.

    Raises:
        RapidunError: naming each offending field, its value and what it must be.
    """
    problems = [f"{k} = {_get(cfg, k)!r}: must be {chk.text}" for k, chk in CHECKS.items() if not chk(_get(cfg, k))]
    if not problems:  # relations only between values that are valid on their own
        problems = [f"{names}: {text}" for names, ok, text in RELATIONS if not ok(cfg)]
    if not problems:
        problems = _family_problems(cfg.scenario)
    if problems:
        raise RapidunError(
            f"{where}: invalid value(s):\n  " + "\n  ".join(problems) + "\n(see `rapidun config --fields`)"
        )
    return cfg
