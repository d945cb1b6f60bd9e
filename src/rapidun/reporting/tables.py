"""Number formatting and the report's tables, built from ``report.json`` and the run's audit files."""

from __future__ import annotations

import json
import math
from typing import Any

from rapidun.reporting.doc import Block, Note, Paragraph, Table
from rapidun.reporting.load import RunData, as_dict, finite, get, num, read_jsonl

DASH = "—"

# (key in ME.mean / MM, column header, decimals)
HEADLINE: list[tuple[str, str, int]] = [
    ("val_asr_trig", "Val ASR seen+OOD", 3),
    ("asr_trig", "ASR seen+OOD", 3),
    ("asr_seen", "ASR seen", 3),
    ("asr_ood", "ASR OOD", 3),
    ("false_trigger", "False trig.", 3),
    ("clean_ppl", "Clean PPL", 2),
    ("rouge_l", "ROUGE-L", 3),
    ("forget_ppl_poisoned", "Forget PPL, poisoned ans. ↑", 2),
    ("forget_ppl_clean", "Forget PPL, clean ans. ↓", 2),
    ("time_s", "Time s", 1),
    ("speedup_vs_retrain", "vs retrain", 2),
]
TESTED = ["asr_trig", "asr_seen", "asr_ood", "false_trigger", "val_asr_trig"]
# (diagnostic key, column header): the signal diagnostics of influence-weighted methods (methods.NAME.diagnostics)
DIAGNOSTICS: list[tuple[str, str]] = [
    ("ess_forget", "ESS forget"),
    ("ess_retain", "ESS retain"),
    ("weight_stability_spearman.forget", "ρ seeds, forget"),
    ("weight_stability_spearman.retain", "ρ seeds, retain"),
    ("views_S_forget_spearman", "ρ sketch/exact S_f"),
    ("views_S_retain_spearman", "ρ sketch/exact S_r"),
    ("corr_weight_answer_len", "ρ(w, answer len)"),
    ("corr_weight_grad_norm_forget", "ρ(w, ‖g‖)"),
    ("grad_norm_mean", "pre-clip ‖∇‖"),
    ("clipped_frac", "clipped steps"),
    ("forget_dose", "forget dose Σw"),
    ("forget_dose_uniform", "uniform dose"),
]
TOP_K = 5
INSTRUCTION_CHARS = 100


def fmt_num(x: Any, digits: int = 3, small: bool = False) -> str:
    """A number with ``digits`` decimals; ``inf``/``nan`` spelled out, ``—`` when missing.

    Args:
        x: the value (anything :func:`~rapidun.reporting.load.num` accepts).
        digits: decimals.
        small: write non-zero values below ``10**-digits`` in scientific notation instead of as zero.
    """
    v = num(x)
    if v is None:
        return DASH
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if abs(v) >= 1e6 or (small and v != 0 and abs(v) < 10.0**-digits):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def fmt_mean_std(mean: Any, std: Any, digits: int) -> str:
    """``"mean ± std"``; just the mean when the std is missing/non-finite or the mean is not finite."""
    m = fmt_num(mean, digits)
    if not finite(mean) or not finite(std):
        return m
    return f"{m} ± {fmt_num(std, digits)}"


def fmt_speedup(x: Any) -> str:
    """A speed-up factor as ``"2.31×"``."""
    s = fmt_num(x, 2)
    return s if s == DASH else f"{s}×"


def fmt_p(x: Any) -> str:
    """A p-value with three significant digits."""
    v = num(x)
    if v is None or not math.isfinite(v):
        return fmt_num(v)
    return f"{v:.3g}"


def fmt_level(x: Any) -> str:
    """A confidence level (``0.95``) as ``"95%"``."""
    v = num(x)
    return f"{100 * v:g}%" if v is not None and math.isfinite(v) else "CI"


def truncate(text: Any, n: int = INSTRUCTION_CHARS) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis."""
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1].rstrip() + "…"


def _cell(key: str, mean: Any, std: Any, digits: int) -> str:
    if key == "speedup_vs_retrain":
        return fmt_speedup(mean)
    return fmt_mean_std(mean, std, digits)


def headline(run: RunData) -> list[Block]:
    """The main comparison table: the poisoned and retrained models, then each method (mean ± std over seeds)."""
    headers = ["Model / method", "Seeds"] + [h for _, h, _ in HEADLINE]
    rows: list[list[str]] = []
    for name in ("poisoned", "retrain"):
        mm = run.models.get(name)
        if not isinstance(mm, dict):
            continue
        row = [f"{name} (model)", DASH]
        for key, _, digits in HEADLINE:
            if key == "time_s":
                row.append(fmt_num(mm.get("train_time_s"), digits))
            elif key == "speedup_vs_retrain":
                row.append(DASH)
            else:
                row.append(fmt_num(mm.get(key), digits))
        rows.append(row)
    for name, me in run.methods.items():
        mean, std = as_dict(me.get("mean")), as_dict(me.get("std"))
        n = me.get("n_seeds")
        row = [name, str(n) if isinstance(n, int) else DASH]
        row += [_cell(key, mean.get(key), std.get(key), digits) for key, _, digits in HEADLINE]
        rows.append(row)
    if not rows:
        return [Note("No models or methods in report.json: headline table skipped.")]
    caption = (
        "From report.json: models.poisoned and models.retrain are single models (time = fine-tuning time, "
        "train_time_s); each method shows methods.NAME.mean ± methods.NAME.std over its seeds (just the mean "
        "when no std is given). vs retrain = speedup_vs_retrain."
    )
    return [Table(headers, rows, caption, ["l"] + ["r"] * (len(headers) - 1))]


def methods_table(run: RunData) -> list[Block]:
    """One row per method: its summary, seeds, and seeds whose cell did not complete."""
    rows = []
    for name, me in run.methods.items():
        per_seed = as_dict(me.get("per_seed"))
        incomplete = [s for s in run.ordered_seeds(per_seed) if get(per_seed, s, "complete") is False]
        seeds = me.get("seeds") if isinstance(me.get("seeds"), list) else list(per_seed)
        rows.append(
            [
                name,
                str(me.get("summary") or DASH),
                ", ".join(str(s) for s in seeds) or DASH,
                ", ".join(incomplete) or "none",
            ]
        )
    if not rows:
        return [Note("No unlearning methods in report.json (methods is empty): method sections skipped.")]
    return [
        Table(
            ["Method", "Summary", "Seeds", "Incomplete seeds"],
            rows,
            "From report.json: methods.NAME.summary, .seeds and per_seed.SEED.complete.",
        )
    ]


def paired_tests(run: RunData) -> list[Block]:
    """Paired bootstrap CI, the prompt-level sign-flip p (headline) and the pooled McNemar p of each method against
    the reference (``tests.vs``)."""
    entries = []
    for name, me in run.methods.items():
        tests = me.get("tests")
        if not isinstance(tests, dict):
            continue
        vs = str(tests.get("vs") or "rapidun")
        if name == vs:
            continue
        for metric in TESTED:
            t = tests.get(metric)
            if isinstance(t, dict):
                entries.append((name, vs, metric, as_dict(t.get("bootstrap")), as_dict(t.get("mcnemar")),
                                as_dict(t.get("prompt_test"))))  # fmt: skip
    if not entries:
        return [Note("No paired tests in report.json (one method, or no methods.NAME.tests): section skipped.")]
    refs = sorted({e[1] for e in entries})
    ref = refs[0] if len(refs) == 1 else "ref"
    levels = sorted({fmt_level(e[3].get("level")) for e in entries})
    level = levels[0] if len(levels) == 1 else "CI"
    headers = ["Method"] + ([] if len(refs) == 1 else ["Ref"])
    headers += ["Metric", f"Diff (method − {ref})", f"{level} CI", "Prompts × seeds"]
    headers += [f"Only {ref}", "Only method", "Pairs", "p (prompts)", "p (McNemar, pooled)"]
    rows = []
    for name, vs, metric, b, m, pt in entries:
        ci = f"[{fmt_num(b.get('ci_low'))}, {fmt_num(b.get('ci_high'))}]"
        if level == "CI":
            ci = f"{fmt_level(b.get('level'))} {ci}"
        diff = num(b.get("diff"))
        diff_s = fmt_num(diff) if diff is None or diff < 0 or not math.isfinite(diff) else "+" + fmt_num(diff)
        np_, ns = b.get("n_prompts"), b.get("n_seeds")
        size = f"{np_} × {ns}" if np_ is not None and ns is not None else DASH
        row = [name] + ([] if len(refs) == 1 else [vs])
        row += [metric, diff_s, ci, size]
        row += [str(m.get("only_a", DASH)), str(m.get("only_b", DASH)), str(m.get("n_pairs", DASH))]
        row += [fmt_p(pt.get("p")) if pt else DASH, fmt_p(m.get("p"))]
        rows.append(row)
    boot_tests = sorted({str(e[3]["test"]) for e in entries if e[3].get("test")})
    mc_tests = sorted({str(e[4]["test"]) for e in entries if e[4].get("test")})
    n_boot = sorted({str(e[3]["n_boot"]) for e in entries if e[3].get("n_boot") is not None})
    text = (
        f"Diff is the method's rate minus {ref}'s rate on the same prompts and seeds; the interval comes from the "
        f"{' / '.join(boot_tests) or 'bootstrap'}"
        + (f" with {' / '.join(n_boot)} resamples" if n_boot else "")
        + "; p (prompts) is the two-sided sign-flip test on the per-prompt mean differences (the prompt is the unit, "
        "seeds nested: the headline p); p (McNemar, pooled) comes from the "
        + f"{' / '.join(mc_tests) or 'McNemar test'} on the prompt × seed pairs pooled as if independent (too small "
        f"when a prompt behaves alike in every seed). Only {ref} / Only method count the paired prompt outcomes "
        "(attack success, or false trigger on clean prompts) that occurred for that model alone."
    )
    caption = "From report.json: methods.NAME.tests.METRIC.bootstrap, .prompt_test and .mcnemar."
    return [Paragraph(text), Table(headers, rows, caption, ["l"] * (len(headers) - 9) + ["r"] * 9)]


def diagnostics_table(run: RunData) -> list[Block]:
    """The signal diagnostics of every method that has them (mean over seeds), and mean forget weight per family."""
    rows = []
    fam_rows = []
    for name, me in run.methods.items():
        d = me.get("diagnostics")
        if not isinstance(d, dict):
            continue
        rows.append([name] + [fmt_num(num(get(d, *key.split(".")))) for key, _ in DIAGNOSTICS])
        fam = as_dict(d.get("family_mean_weight"))
        if fam:
            fam_rows.append([name, ", ".join(f"{k} {fmt_num(num(v))}" for k, v in sorted(fam.items()))])
    if not rows:
        return [Note("No diagnostics in report.json (methods.NAME.diagnostics): section skipped.")]
    text = (
        "ESS: Kish's effective sample size of the weights / N (1 = equal weights). ρ seeds: mean pairwise Spearman "
        "of the same samples' weights across seeds (influence seeds differ). ρ sketch/exact: Spearman of the RapidUn "
        "scores from the sketched vs the exact influence on the same adapter. ρ(w, ·): Spearman of the forget "
        "weights with answer tokens and raw gradient norm. Dose: Σ w over the forget draws (uniform: their number)."
    )
    return [
        Paragraph(text),
        Table(
            ["Method"] + [h for _, h in DIAGNOSTICS],
            rows,
            "From report.json: methods.NAME.diagnostics.",
            ["l"] + ["r"] * len(DIAGNOSTICS),
        ),
        Table(["Method", "Mean forget weight per trigger family"], fam_rows, "diagnostics.family_mean_weight"),
    ]


def top_samples(run: RunData, method: str = "rapidun") -> list[Block]:
    """The ``TOP_K`` forget and retain samples with the largest weight in ``method``'s first-seed audit."""
    me = run.methods.get(method)
    if me is None:
        return [Note(f"No {method} method in report.json: top-samples section skipped.")]
    seed, f = run.first_seed_file(method, "audit.jsonl")
    if f is None or not f.is_file():
        where = run.rel(f) if f is not None else f"methods.{method}.per_seed (no dir)"
        return [Note(f"No audit file for {method} ({where}): top-samples section skipped.")]
    try:
        rows = read_jsonl(f)
    except (OSError, ValueError) as e:
        return [Note(f"Could not read {run.rel(f)} ({e}): top-samples section skipped.")]
    out: list[Block] = []
    for group, views in (("forget", ("FF", "FR")), ("retain", ("RF", "RR"))):
        grp = [r for r in rows if r.get("group") == group and finite(r.get("weight"))]
        grp.sort(key=lambda r: -float(r["weight"]))
        if not grp:
            out.append(Note(f"No {group} rows with a finite weight in {run.rel(f)}."))
            continue
        table = []
        sources = set()
        for i, r in enumerate(grp[:TOP_K], 1):
            rid = str(r.get("id"))
            rec = run.scenario_record(rid)
            if rec is not None:
                sources.add(rec["_file"])
            instr = truncate(rec.get("instruction", "")) if rec is not None else f"{DASH} (id not in scenario files)"
            table.append(
                [str(i), rid, fmt_num(r.get("weight"), 3, True), fmt_num(r.get("S"), 3, True)]
                + [fmt_num(r.get(v), 3, True) for v in views]
                + [instr]
            )
        src = f"; instructions from {', '.join(sorted(sources))}" if sources else ""
        caption = f"Top {len(table)} {group} samples by weight, from {run.rel(f)} (seed {seed}){src}."
        out.append(
            Table(
                ["#", "ID", "Weight", "S", *views, "Instruction"], table, caption, ["r", "l", "r", "r", "r", "r", "l"]
            )
        )
    return out


def _value(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False)
    return DASH if v is None else str(v)


def environment(run: RunData) -> list[Block]:
    """The environment dict of report.json as a two-column table."""
    env = as_dict(run.report.get("environment"))
    if not env:
        return [Note("No environment in report.json.")]
    rows = [[str(k), _value(v)] for k, v in env.items()]
    return [Table(["Key", "Value"], rows, "From report.json: environment.")]


def stage_timings(run: RunData) -> list[Block]:
    """The run's per-stage wall times (report.json ``timings``)."""
    t = as_dict(run.report.get("timings"))
    if not t:
        return [Note("No stage timings in report.json.")]
    rows = [[str(k), fmt_num(v, 1) if num(v) is not None else _value(v)] for k, v in t.items()]
    return [Table(["Stage", "Seconds"], rows, "From report.json: timings.", ["l", "r"])]
