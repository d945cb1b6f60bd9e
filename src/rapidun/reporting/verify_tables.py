"""The report's verification section (``report.json`` ``verification``, from ``verification.json``)."""

from __future__ import annotations

from typing import Any

from rapidun.reporting.doc import Block, Note, Paragraph, Table
from rapidun.reporting.load import as_dict
from rapidun.reporting.tables import DASH, fmt_num, fmt_p


def _signed(x: Any) -> str:
    s = fmt_num(x)
    return s if s == DASH or s.startswith("-") else f"+{s}"


def verification_blocks(v: dict[str, Any] | None) -> list[Block]:
    """The headline table (one row per model: ASR, relearning, quantization, fuzzing, forget quality) and the
    fuzzing table (ASR per perturbation), or a note when the run has no verification."""
    v = as_dict(v)
    summary = as_dict(v.get("summary"))
    if not summary:
        return [Note("No verification in this run (set verify.enabled=true, or run `rapidun verify`).")]
    cfg = as_dict(v.get("config"))
    split = v.get("split", "test")
    bits = [str(b) for b in cfg.get("quant_bits", [])]
    probes = v.get("target") == "probes"
    what = f"hit rate ({cfg.get('probe_group')})" if probes else "ASR seen"
    head = ["Model", what, "Relearn: after", "Recovered", "After − retrain"]
    head += [f"int{b} Δ" for b in bits] + [f"int{b} PPL" for b in bits[-1:]]
    head += ["Worst fuzz", "MIA AUC", "KS p vs retrain", "Time (s)"]
    rows = []
    for label, s in summary.items():
        s = as_dict(s)
        rl, q, fz, fq = (as_dict(s.get(k)) for k in ("relearn", "quantize", "fuzz", "forget_quality"))
        row = [label, fmt_num(s.get("asr_seen")), fmt_num(rl.get("asr_seen_after"))]
        row += [fmt_num(rl.get("recovered_fraction")), _signed(rl.get("after_minus_retrain"))]
        row += [_signed(as_dict(q.get(b)).get("delta_asr_seen")) for b in bits]
        row += [fmt_num(as_dict(q.get(b)).get("clean_ppl"), 2) for b in bits[-1:]]
        worst = f"{fz['worst']} {fmt_num(fz.get('worst_asr'))}" if fz.get("worst") else DASH
        row += [worst, fmt_num(fq.get("mia_auc")), fmt_p(fq.get("ks_p")), fmt_num(s.get("time_s"), 0)]
        rows.append(row)
    rl_text = (
        f"relearning: a fresh rank-{cfg.get('relearn_lora_r')} LoRA trained {cfg.get('relearn_steps')} steps at lr "
        f"{cfg.get('relearn_lr')} on {cfg.get('relearn_k')} "
        + ("of the forget records" if probes else "poisoned samples outside the forget pack")
    )
    out: list[Block] = [
        Paragraph(
            f"Attacks that try to bring the behaviour back, on the {split} prompts ({what}), with poisoned and "
            f"retrain as the two ends of the scale: {rl_text}; weight-only round-to-nearest quantization; trigger "
            "perturbations; membership inference and a KS test of the forget answers' log-likelihoods against "
            "retrain's."
        ),
        Table(
            head,
            rows,
            caption=f"From verification.json: summary.LABEL; {what} throughout. Recovered = (rate after the "
            "relearning attack − before) / (poisoned's rate − before), shown only where the model removed ≥ 0.05 of "
            "it; After − retrain = the rate after the attack minus retrain's after the same attack; int Δ = the "
            "rate of the quantized model minus the model's own; Worst fuzz = the perturbation with the highest "
            "seen ASR; MIA AUC ≈ 0.5 when forget samples look like never-seen poison (retrain), ~1 when memorised; "
            "KS p: high when the forget answers' log-likelihoods cannot be told from retrain's.",
            align=["l"] + ["r"] * (len(head) - 1),
        ),
    ]
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
