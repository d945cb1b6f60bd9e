"""The report's verification section (``report.json`` ``verification``, from ``verification.json``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from rapidun.reporting.doc import Block, Note, Paragraph, Table
from rapidun.reporting.load import as_dict, finite, get, num
from rapidun.reporting.tables import DASH, fmt_mean_std, fmt_num, fmt_p


def _signed(x: Any) -> str:
    s = fmt_num(x)
    return s if s == DASH or s.startswith("-") else f"+{s}"


def verification_blocks(v: dict[str, Any] | None) -> list[Block]:
    """The headline table (one row per model: ASR, relearning, quantization, fuzzing, forget quality, weight
    distance to the two ends) and the fuzzing table (ASR per perturbation), or a note when the run has none."""
    v = as_dict(v)
    summary = as_dict(v.get("summary"))
    if not summary:
        return [Note("No verification in this run (set verify.enabled=true, or run `rapidun verify`).")]
    cfg = as_dict(v.get("config"))
    split = v.get("split", "test")
    bits = [str(b) for b in cfg.get("quant_bits", [])]
    probes = v.get("target") == "probes"
    # the user's files: named by the task (forget content, leak rate, start model, reference), not the backdoor
    what = f"leak rate ({cfg.get('probe_group')})" if probes else "ASR seen"
    ref, top = ("reference", "start") if probes else ("retrain", "poisoned")
    names = {v.get("poisoned"): "start model (poisoned)", v.get("reference"): "reference (retrain)"} if probes else {}
    coll = probes and any(as_dict(s).get("collateral") for s in summary.values())
    head = ["Model", what, "Relearn: after", "Recovered", f"After − {ref}"]
    head += [f"int{b} Δ" for b in bits] + [f"int{b} PPL" for b in bits[-1:]]
    head += [] if probes else ["Worst fuzz"]
    head += ["MIA AUC", f"KS p vs {ref}", f"L2 to {top}", f"L2 to {ref}"]
    head += ["Clean: replaced", "Clean: agree"] if coll else []
    head += ["Time (s)"]
    rows = []
    for label, s in summary.items():
        s = as_dict(s)
        rl, q, fz, fq = (as_dict(s.get(k)) for k in ("relearn", "quantize", "fuzz", "forget_quality"))
        row = [names.get(label, label), fmt_num(s.get("asr_seen")), fmt_num(rl.get("asr_seen_after"))]
        row += [fmt_num(rl.get("recovered_fraction")), _signed(rl.get("after_minus_retrain"))]
        row += [_signed(as_dict(q.get(b)).get("delta_asr_seen")) for b in bits]
        row += [fmt_num(as_dict(q.get(b)).get("clean_ppl"), 2) for b in bits[-1:]]
        worst = f"{fz['worst']} {fmt_num(fz.get('worst_asr'))}" if fz.get("worst") else DASH
        row += [] if probes else [worst]
        row += [fmt_num(fq.get("mia_auc")), fmt_p(fq.get("ks_p"))]
        row += [fmt_num(get(s, "distance", end, "relative"), 3, small=True) for end in ("to_poisoned", "to_retrain")]
        if coll:
            c = as_dict(s.get("collateral"))
            rb, ra = c.get("replacement_rate_before"), c.get("replacement_rate_after")
            row += [f"{fmt_num(rb)} → {fmt_num(ra)}" if c and ra is not None else DASH, fmt_num(c.get("agreement"))]
        row += [fmt_num(s.get("time_s"), 0)]
        rows.append(row)
    rl_text = (
        f"relearning: a fresh rank-{cfg.get('relearn_lora_r')} LoRA trained {cfg.get('relearn_steps')} steps at lr "
        f"{cfg.get('relearn_lr')} on {cfg.get('relearn_k')} "
        + ("of the forget records" if probes else "poisoned samples outside the forget pack")
    )
    if probes:
        intro = (
            f"Attacks that try to bring the forget content back, on your probes ({what}: the share of answers to "
            f"the {cfg.get('probe_group')} probes that the hit rule flags), with the start model (before "
            "unlearning) and the reference (trained without the forget records) as the two ends of the scale: "
            f"{rl_text}; weight-only round-to-nearest quantization; membership inference of the forget records "
            "against held-out ones and a KS test of the forget answers' log-likelihoods against the reference's."
        )
        cap = (
            f"From verification.json: summary.LABEL (start model = poisoned, reference = retrain); {what} "
            "throughout. Recovered = (rate after the relearning attack − before) / (the start model's rate − "
            "before), shown only where the model removed ≥ 0.05 of it; After − reference = the rate after the "
            "attack minus the reference's after the same attack; int Δ = the rate of the quantized model minus the "
            "model's own; MIA AUC ≈ 0.5 when the forget records look like records never trained on, ~1 when "
            "memorised; KS p: high when the forget answers' log-likelihoods cannot be told from the reference's; "
            "L2 = ‖θ − θ_end‖₂ / ‖θ_end‖₂ over the shared weights (summary.LABEL.distance)"
            + (
                "; Clean: replaced = the share of the other groups' answers that give a forget record's "
                "replacement answer, start model → this model; Clean: agree = token agreement of those answers "
                "with the start model's (summary.LABEL.collateral, rapidun.eval.collateral)."
                if coll
                else "."
            )
        )
    else:
        intro = (
            f"Attacks that try to bring the behaviour back, on the {split} prompts ({what}), with poisoned and "
            f"retrain as the two ends of the scale: {rl_text}; weight-only round-to-nearest quantization; trigger "
            "perturbations; membership inference and a KS test of the forget answers' log-likelihoods against "
            "retrain's."
        )
        cap = (
            f"From verification.json: summary.LABEL; {what} throughout. Recovered = (rate after the "
            "relearning attack − before) / (poisoned's rate − before), shown only where the model removed ≥ 0.05 of "
            "it; After − retrain = the rate after the attack minus retrain's after the same attack; int Δ = the "
            "rate of the quantized model minus the model's own; Worst fuzz = the perturbation with the highest "
            "seen ASR; MIA AUC ≈ 0.5 when forget samples look like never-seen poison (retrain), ~1 when memorised; "
            "KS p: high when the forget answers' log-likelihoods cannot be told from retrain's; L2 to poisoned / "
            "retrain = ‖θ − θ_end‖₂ / ‖θ_end‖₂ over the shared weights (summary.LABEL.distance.to_poisoned / "
            "to_retrain.relative, rapidun.verify.distance): near 0 to poisoned means the weights barely moved."
        )
    out: list[Block] = [Paragraph(intro), Table(head, rows, caption=cap, align=["l"] + ["r"] * (len(head) - 1))]
    kinds = sorted({k for s in summary.values() for k in as_dict(as_dict(as_dict(s).get("fuzz")).get("per"))})
    if kinds:
        frows = []
        for label, s in summary.items():
            fz = as_dict(as_dict(s).get("fuzz"))
            per = as_dict(fz.get("per"))
            frows.append([label, fmt_num(fz.get("original")), *(fmt_num(per.get(k)) for k in kinds)])
        out.append(
            Table(
                ["Model", "original", *kinds],
                frows,
                caption="From verification.json: summary.LABEL.fuzz. Seen-trigger ASR on the same prompts with the "
                "trigger unchanged (original) and perturbed (rapidun.verify.fuzz).",
                align=["l"] + ["r"] * (len(kinds) + 1),
            )
        )
    return out


@dataclass(frozen=True)
class FrontierRow:
    """One point of the removal frontier: a reference model, or a method averaged over its verified seeds."""

    label: str
    kind: str  # "poisoned" | "retrain" | "method"
    time_s: float | None
    asr_before: float | None
    asr_after: float | None
    asr_after_std: float | None
    recovered: float | None
    seeds: list[str] = field(default_factory=list)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def frontier_rows(v: dict[str, Any] | None, methods: dict[str, Any], models: dict[str, Any]) -> list[FrontierRow]:
    """The verification summary grouped per method (labels ``<method>@<seed>``), with each one's measured cost.

    Per group: ``asr_after`` = mean over seeds of ``relearn.asr_seen_after`` (``asr_after_std`` = their sample std
    when ≥ 2 seeds), ``asr_before`` = mean of ``asr_seen``, ``recovered`` = mean of the defined
    ``relearn.recovered_fraction``. Cost: 0 for the poisoned model, ``models.retrain.train_time_s`` for retrain,
    ``methods.METHOD.mean.time_s`` (the measured unlearning time, mean over the compare seeds) for a method.

    Args:
        v: the report's ``verification`` entry.
        methods: the report's ``methods``.
        models: the report's ``models``.
    """
    v = as_dict(v)
    ends = {v.get("poisoned"): "poisoned", v.get("reference"): "retrain"}
    groups: dict[str, tuple[str, list[tuple[str | None, dict[str, Any]]]]] = {}
    for label, s in as_dict(v.get("summary")).items():
        if label in ends:
            name, kind, seed = label, ends[label], None
        else:
            name, sep, seed = label.rpartition("@")
            name, kind, seed = (name, "method", seed) if sep else (label, "method", None)
        groups.setdefault(name, (kind, []))[1].append((seed, as_dict(s)))
    order = sorted(groups, key=lambda k: ("poisoned", "retrain", "method").index(groups[k][0]))
    out = []
    for name in order:
        kind, entries = groups[name]
        after = [float(x) for _, s in entries if finite(x := get(s, "relearn", "asr_seen_after"))]
        before = [float(x) for _, s in entries if finite(x := s.get("asr_seen"))]
        rec = [float(x) for _, s in entries if finite(x := get(s, "relearn", "recovered_fraction"))]
        cost = {"poisoned": 0.0, "retrain": num(get(models, "retrain", "train_time_s"))}.get(kind)
        if kind == "method":
            cost = num(get(methods, name, "mean", "time_s"))
        std = statistics.stdev(after) if len(after) >= 2 else None
        seeds = [seed for seed, _ in entries if seed is not None]
        out.append(FrontierRow(name, kind, cost, _mean(before), _mean(after), std, _mean(rec), seeds))
    return out


def frontier_table(rows: list[FrontierRow]) -> Table:
    """The removal frontier's numbers, one row per reference model or method."""
    body = [
        [
            r.label,
            fmt_num(r.time_s, 1),
            fmt_num(r.asr_before),
            fmt_mean_std(r.asr_after, r.asr_after_std, 3),
            fmt_num(r.recovered),
            ", ".join(r.seeds) or DASH,
        ]
        for r in rows
    ]
    return Table(
        ["Model / method", "Cost (s)", "ASR before", "ASR after attack", "Recovered", "Seeds"],
        body,
        caption="From report.json: cost = methods.METHOD.mean.time_s (measured unlearning time, mean over the "
        "compare seeds), models.retrain.train_time_s for retrain, 0 for poisoned; ASR before = "
        "verification.summary.LABEL.asr_seen, after attack = summary.LABEL.relearn.asr_seen_after, recovered = "
        "summary.LABEL.relearn.recovered_fraction (mean ± std over the verified seeds LABEL = METHOD@SEED).",
        align=["l", "r", "r", "r", "r", "l"],
    )
