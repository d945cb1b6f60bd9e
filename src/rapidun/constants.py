"""The project's constants, in one home: method names, attack and split names, the utility factor.

Imported by the config (its defaults and help texts) and by the config checks (the allowed values), so neither
imports the other at import time.
"""

from __future__ import annotations

UTILITY_BUDGET = 1.10  # the matched-utility factor: perplexity at most 10% above the start model's
HELDOUT_CHECK = 40  # held-out clean records an unlearning run measures its utility (and collateral damage) on

METHOD_NAMES = (
    "rapidun",
    "uniform",
    "ga",
    "graddiff",
    "npo",
    "simnpo",
    "rmu",
    "loreun",
    "loreun_dynamic",
    "loreun_hard_high",
    "fisher",
    "random",
    "rapidun_sampled",
    "rapidun_aligned",
    "rapidun_stable",
    "coverage",
    "rapidun_dynamic",
    "distill",
    "sam_uniform",
    "adv_uniform",
    "cover",
    "retrain",
)
DISTILL_TEACHERS = ("start",)  # besides the registered loop/fisher methods: the start model itself as the teacher

VERIFY_ATTACKS = ("relearn", "quantize", "fuzz", "forget_quality")
FUZZ_KINDS = ("moved", "in_context", "repeated", "recased", "spaced", "typo", "multi_turn", "late_turn")
TRACE_SPLITS = ("test_seen_trig", "test_ood_trig", "val_seen_trig", "val_ood_trig")
# the scenario's splits, in the order of rapidun.config.SplitSizes' fields (a test keeps them equal)
SPLIT_NAMES = (
    "train_poisoned",
    "train_clean",
    "val_clean",
    "test_clean",
    "test_seen_trig",
    "test_ood_trig",
    "val_seen_trig",
    "val_ood_trig",
)
