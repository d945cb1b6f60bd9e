"""The "Removal under attack" section of a study report, for scenarios run with ``select_on: relearn``.

Reads a scenario's ``robust`` entry of ``study.json`` (:mod:`rapidun.study_robust`): the validation table the choice
was made on (ASR after the relearning attack), the finalists' test battery against the two ends of the scale, the
paired test after the attack, and the removal frontier (ASR after the attack against the measured cost).
"""

from __future__ import annotations

from typing import Any

from rapidun.reporting.doc import Block, Facts, Figure, Heading, Note, Table
from rapidun.reporting.load import as_dict, get, num
from rapidun.reporting.plots import FrontierPoint, removal_frontier
from rapidun.reporting.study_report import DASH, _diff_ci, _mean_std, _num, _over, _p, _text


def _stdof(e: dict[str, Any], key: str) -> Any:
    return as_dict(e.get("std")).get(key)


def validation_table(sc: dict[str, Any]) -> list[Block]:
    """One row per label: its validation ASR before and after the relearning attack, val perplexity, selection."""
    rob = as_dict(sc.get("robust"))
    val = {str(k): as_dict(v) for k, v in as_dict(rob.get("val")).items()}
    if not val:
        return [Note("No validation attack in study.json (robust.val): table skipped.")]
    limit = get(sc, "ppl_limit", "val")
    rows, skipped = [], []
    for label, e in val.items():
        ppl = get(sc, "methods", label, "val", "mean", "clean_ppl")
        within = DASH if num(ppl) is None or num(limit) is None else ("no" if _over(ppl, limit) else "yes")
        after = _mean_std(e.get("asr_after"), e.get("asr_after_std"), 3)
        if e.get("skipped"):
            after = "not attacked"
            skipped.append(f"{label}: {e['skipped']}")
        seeds = e.get("seeds") or []
        rows.append([label, str(len(seeds)) if seeds else DASH, _num(e.get("asr_before")), after, _num(ppl, 2),
                     within, "selected" if label == sc.get("selected") else ""])  # fmt: skip
    caption = (
        "From study.json: robust.val.LABEL. ASR is seen and OOD trigger prompts pooled, on the validation prompts, "
        "mean (± std) over the label's first seeds: before = the unlearned model, after = the same model after the "
        "relearning attack, trained on the validation half of the relearning pool (the test attack uses the other "
        "half). Val PPL: methods.LABEL.val.mean.clean_ppl; within limit: at most ppl_limit.val. The selected label "
        "has the lowest ASR after the attack among those within the limit."
    )
    headers = ["Label", "Seeds", "ASR before", "ASR after attack", "Val PPL", "Within limit", "Selected"]
    blocks: list[Block] = [Table(headers, rows, caption, ["l", "r", "r", "r", "r", "l", "l"])]
    if skipped:
        blocks.append(Note("Not attacked: " + "; ".join(skipped)))
    return blocks


def _test_rows(rob: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    ends = as_dict(rob.get("test_models"))
    items = [(f"{n} (model)", as_dict(ends.get(n))) for n in ("poisoned", "retrain") if n in ends]
    return items + [(str(k), as_dict(v)) for k, v in as_dict(rob.get("test")).items()]


def test_table(sc: dict[str, Any]) -> list[Block]:
    """The finalists (and the two ends of the scale) under the test battery."""
    rob = as_dict(sc.get("robust"))
    items = _test_rows(rob)
    if not items:
        return [Note("No test battery in study.json (robust.test): table skipped.")]
    rows = []
    for label, e in items:
        mean = as_dict(e.get("mean"))
        seeds = e.get("seeds") or []
        rows.append(
            [label, str(len(seeds)) if seeds else DASH]
            + [_mean_std(mean.get(k), _stdof(e, k), 3) for k in ("asr_before", "asr_after", "recovered_fraction")]
            + [_mean_std(mean.get("mia_auc"), _stdof(e, "mia_auc"), 3), _p(mean.get("ks_p"))]
        )
    caption = (
        "From study.json: robust.test_models (single models) and robust.test.LABEL (mean ± std over the seeds), "
        "on the test prompts. ASR: seen and OOD trigger prompts pooled, before and after the relearning attack "
        "(trained on the test half of the relearning pool). Recovered fraction: (seen ASR after − before) / "
        "(poisoned seen ASR − before), – where the model removed under 0.05. MIA AUC: membership inference of the "
        "forget samples against held-out poison (0.5 = indistinguishable). KS p: forget log-likelihoods vs retrain's "
        "(mean over seeds; small = unlike retrain)."
    )
    headers = ["Model / label", "Seeds", "ASR before", "ASR after attack", "Recovered fraction", "MIA AUC",
               "KS p vs retrain"]  # fmt: skip
    return [Table(headers, rows, caption, ["l"] + ["r"] * 6)]


def paired_facts(sc: dict[str, Any], reference: str) -> list[Block]:
    """The paired test of the selected label against the reference after the attack (and before it)."""
    rob = as_dict(sc.get("robust"))
    tests = as_dict(rob.get("test_tests"))
    if not tests:
        sel = sc.get("selected")
        why = "the reference itself was selected" if sel == reference else "no label other than the reference"
        return [Note(f"No paired test after the attack in study.json (robust.test_tests): {why}.")]
    items = []
    for label, per in tests.items():
        for metric, when in (("asr_after", "after the attack"), ("asr_before", "before the attack")):
            t = as_dict(as_dict(per).get(metric))
            if t:
                size = f"{_text(t.get('n_prompts'))} prompts × {_text(t.get('n_seeds'))} seeds"
                items.append(
                    (f"{label} − {reference}, test ASR {when}",
                     f"{_diff_ci(t)}, p {_p(t.get('p'))} (prompts), Holm p {_p(t.get('p_holm'))} ({size})")
                )  # fmt: skip
    return [Facts(items)]


def frontier_figure(sc: dict[str, Any], scenario: str, name: str) -> list[Block]:
    """The removal frontier on the test prompts: seen ASR after the attack against the measured cost."""
    rob = as_dict(sc.get("robust"))
    points = []
    for label, e in _test_rows(rob):
        mean, kind = as_dict(e.get("mean")), "method"
        if label.endswith(" (model)"):
            kind = label.removesuffix(" (model)")
            t = 0.0 if kind == "poisoned" else num(get(sc, "models", "retrain", "train_time_s"))
            label = kind
        else:
            t = num(get(sc, "methods", label, "time_s"))
        after = num(mean.get("asr_seen_after"))
        if t is None or after is None:
            continue
        before, std = num(mean.get("asr_seen_before")), num(_stdof(e, "asr_seen_after"))
        points.append(FrontierPoint(label, t, after, std, before, kind))
    if not any(p.kind == "method" for p in points):
        return [Note("No finalist with a test ASR after the attack and a measured time (robust.test): plot skipped.")]
    png = removal_frontier(points, f"{scenario}: removal frontier, test prompts")
    caption = (
        "From study.json: y = seen-trigger ASR on the test prompts after the relearning attack "
        "(robust.test.LABEL.mean.asr_seen_after ± std over seeds; hollow: before the attack); x = measured cost: "
        "methods.LABEL.time_s (mean unlearning time), retrain's SFT time (models.retrain.train_time_s), poisoned at "
        "0. Lower left: removed cheaply."
    )
    return [Figure(name, f"Removal frontier, {scenario}", png, caption)]


def robust_blocks(name: str, sc: dict[str, Any], reference: str, safe: str) -> list[Block]:
    """The "Removal under attack" section of one ``select_on: relearn`` scenario (nothing without ``robust``)."""
    rob = sc.get("robust")
    if not isinstance(rob, dict):
        return []
    ids = as_dict(rob.get("relearn_ids"))
    blocks: list[Block] = [Heading("Removal under attack", 3)]
    blocks.append(
        Facts(
            [
                ("selected on", "validation ASR after the relearning attack"),
                ("selected", _text(sc.get("selected"))),
                ("finalists on the test battery", ", ".join(map(str, rob.get("finalists") or [])) or DASH),
                ("test attacks", ", ".join(map(str, rob.get("verify_attacks") or [])) or DASH),
                ("seeds attacked per label", _text(rob.get("verify_seeds"))),
                (
                    "relearning samples (val / test half)",
                    f"{', '.join(ids.get('val') or []) or DASH} / {', '.join(ids.get('test') or []) or DASH}",
                ),
            ]
        )
    )
    blocks += [Heading("Validation: the attack the choice is made on", 4), *validation_table(sc)]
    blocks += [Heading("Test: the finalists under the battery", 4), *test_table(sc), *paired_facts(sc, reference)]
    blocks += frontier_figure(sc, name, f"frontier_{safe}")
    return blocks
