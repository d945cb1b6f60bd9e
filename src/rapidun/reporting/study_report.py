"""Render a study folder's ``study.json`` into ``study.md``, a self-contained ``study.html`` and forest plots.

A study runs several method labels × seeds on several scenarios, selects one label per scenario on the validation
split and reports the test split beside it. Usage::

    from rapidun.reporting.study_report import render_study
    paths = render_study("runs/study")  # {"md": ..., "html": ..., "forest_<scenario>_<split>": plots/....png}

Input: ``OUT_DIR/study.json`` (schema ``rapidun.study/1``). Optional fields that are missing or null render as ``–``.
A scenario run with ``select_on: relearn`` also gets a "Removal under attack" section
(:mod:`rapidun.reporting.study_robust_report`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rapidun.errors import RapidunError
from rapidun.io import atomic_path, read_json, write_text
from rapidun.reporting.doc import Block, Facts, Figure, Heading, Note, Paragraph, Table
from rapidun.reporting.html import render_html
from rapidun.reporting.load import as_dict, finite, get, num
from rapidun.reporting.markdown import render_markdown
from rapidun.reporting.plots import _figure, palette, to_png
from rapidun.reporting.tables import fmt_num, fmt_p, truncate

STUDY_SCHEMA = "rapidun.study/1"
DASH = "–"
# (key in a metrics dict M, column header, decimals)
SUMMARY: list[tuple[str, str, int]] = [
    ("asr_trig", "ASR trig.", 3),
    ("asr_seen", "ASR seen", 3),
    ("asr_ood", "ASR OOD", 3),
    ("false_trigger", "False trig.", 3),
    ("clean_ppl", "Clean PPL", 2),
    ("rouge_l", "ROUGE-L", 3),
]
METRIC_NAMES = {key: header for key, header, _ in SUMMARY}
TESTED = ["asr_trig", "asr_seen", "asr_ood"]  # shown first; any other tested metric follows in file order
SPLITS = {"val": "validation", "test": "test"}
FOREST_METRIC = "asr_trig"
DAGGER = "†"


def safe_name(text: Any) -> str:
    """``text`` lower-cased with every run of characters outside ``[a-z0-9_]`` replaced by one ``_``."""
    return re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_") or "x"


def _num(x: Any, digits: int = 3) -> str:
    return DASH if num(x) is None else fmt_num(x, digits)


def _mean_std(mean: Any, std: Any, digits: int) -> str:
    m = _num(mean, digits)
    return f"{m} ± {fmt_num(std, digits)}" if finite(mean) and finite(std) else m


def _float(x: Any) -> float:
    """``x`` as a float, ``nan`` when it is missing or not a number."""
    v = num(x)
    return math.nan if v is None else v


def _p(x: Any) -> str:
    return DASH if num(x) is None else fmt_p(x)


def _diff_ci(t: dict[str, Any]) -> str:
    """``"+0.012 [-0.030, 0.051]"`` from a test entry; ``–`` for each missing part."""
    d = num(t.get("diff"))
    diff = _num(d)
    if d is not None and d > 0 and math.isfinite(d):
        diff = "+" + diff
    return f"{diff} [{_num(t.get('ci_low'))}, {_num(t.get('ci_high'))}]"


def _value(v: Any) -> str:
    """A diagnostic value as text; a nested dict as ``"k1 a, k2 b"``."""
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items()) or DASH
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v) or DASH
    return truncate(v, 80)


def _text(x: Any) -> str:
    return DASH if x is None or x == "" else str(x)


def _over(ppl: Any, limit: Any) -> bool:
    """Whether a clean perplexity exceeds the limit (both known; ``nan`` never exceeds)."""
    p, lim = num(ppl), num(limit)
    return p is not None and lim is not None and p > lim


def _methods(sc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): as_dict(v) for k, v in as_dict(sc.get("methods")).items()}


def _test_entries(sc: dict[str, Any], split: str) -> dict[str, dict[str, Any]]:
    """``tests[split]`` as ``{label: {metric: entry}}``, labels in ``methods`` order first."""
    tests = as_dict(get(sc, "tests", split))
    labels = list(_methods(sc)) + [str(k) for k in tests if str(k) not in _methods(sc)]
    return {lab: as_dict(tests[lab]) for lab in labels if isinstance(tests.get(lab), dict)}


def study_title(study: dict[str, Any]) -> str:
    """``"RapidUn study: <study file name>"`` (just ``"RapidUn study"`` when the file is not named)."""
    f = study.get("study_file")
    return f"RapidUn study: {Path(str(f)).name}" if f else "RapidUn study"


def summary_table(sc: dict[str, Any], split: str, factor: Any) -> list[Block]:
    """Poisoned and retrained models, then each method label's mean ± std over seeds on ``split``.

    Rows whose (mean) clean perplexity exceeds ``sc["ppl_limit"][split]`` carry a ``†``.
    """
    limit = get(sc, "ppl_limit", split)
    items: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        (f"{n} (model)", DASH, as_dict(get(sc, "models", n, split)), {}) for n in ("poisoned", "retrain")
    ]
    for label, me in _methods(sc).items():
        n = me.get("n_seeds")
        seeds = str(n) if isinstance(n, int) and not isinstance(n, bool) else DASH
        items.append((label, seeds, as_dict(get(me, split, "mean")), as_dict(get(me, split, "std"))))
    rows = []
    for label, seeds, mean, std in items:
        mark = f" {DAGGER}" if _over(mean.get("clean_ppl"), limit) else ""
        rows.append([label + mark, seeds] + [_mean_std(mean.get(k), std.get(k), d) for k, _, d in SUMMARY])
    if finite(limit):
        rule = "selection.ppl_factor" if num(factor) is None else f"{fmt_num(factor, 2)}"
        dagger = (
            f"{DAGGER} mean clean PPL above the limit {fmt_num(limit, 2)} (ppl_limit.{split} = {rule} × the "
            "poisoned model's clean PPL on this split)."
        )
    else:
        dagger = f"No clean-PPL limit for this split in study.json (ppl_limit.{split}): no row is marked {DAGGER}."
    caption = (
        f"From study.json: models.poisoned.{split} and models.retrain.{split} are single models; each method label "
        f"shows methods.LABEL.{split}.mean ± std over its seeds (the mean alone when no std is given). ASR trig. "
        f"pools seen and OOD trigger prompts. {dagger}"
    )
    return [Table(["Model / method", "Seeds"] + [h for _, h, _ in SUMMARY], rows, caption, ["l"] + ["r"] * 7)]


def tests_table(sc: dict[str, Any], split: str, reference: str) -> list[Block]:
    """Paired differences of each method label against the reference on ``split``, one row per label × metric."""
    entries = _test_entries(sc, split)
    if not entries:
        return [Note(f"No paired tests on the {SPLITS[split]} split in study.json (tests.{split}): table skipped.")]
    found = dict.fromkeys(m for e in entries.values() for m in e)
    metrics = [m for m in TESTED if m in found] + [m for m in found if m not in TESTED]
    rows = []
    for label, per_metric in entries.items():
        for m in metrics:
            t = as_dict(per_metric.get(m))
            np_, ns = t.get("n_prompts"), t.get("n_seeds")
            size = f"{np_} × {ns}" if np_ is not None and ns is not None else DASH
            rows.append([label, METRIC_NAMES.get(m, m), _diff_ci(t), _p(t.get("p")), _p(t.get("p_holm")), size])
    headers = ["Method", "Metric", f"Diff (method − {reference}) [CI]", "p", "Holm p", "Prompts × seeds"]
    caption = (
        f"From study.json: tests.{split}.LABEL.METRIC. Diff is the label's rate minus {reference}'s rate on the same "
        "prompts and seeds (negative: a lower rate than the reference), with its interval [ci_low, ci_high]. p is "
        "unadjusted; Holm p is adjusted for multiple comparisons by Holm's step-down method, as stored in the file. "
        f"{reference} itself has no row."
    )
    return [Table(headers, rows, caption, ["l", "l", "r", "r", "r", "r"])]


def forest_plot(rows: Sequence[tuple[str, float, float, float]], title: str, xlabel: str) -> bytes:
    """A forest plot: one row per method, the difference as a dot and its interval as a bar; dashed line at 0.

    Args:
        rows: ``(label, diff, ci_low, ci_high)`` from top to bottom. A non-finite (or ``None``) bound draws the dot
            alone; a non-finite difference leaves the row empty.
        title: the plot title.
        xlabel: the x-axis label.

    Returns:
        PNG bytes.
    """
    vals = [(str(r[0]), *(_float(x) for x in r[1:4])) for r in rows]
    fig = _figure(7.0, 1.4 + 0.42 * max(1, len(vals)))
    ax = fig.subplots()
    xs = [0.0]
    for i, ((_, d, lo, hi), color) in enumerate(zip(vals, palette(len(vals)), strict=True)):
        y = len(vals) - 1 - i  # first row on top
        if math.isfinite(lo) and math.isfinite(hi):
            ax.plot([lo, hi], [y, y], color=color, lw=2.2, solid_capstyle="butt")
            ax.plot([lo, hi], [y, y], "|", color=color, ms=10, mew=2)
            xs += [lo, hi]
        if math.isfinite(d):
            ax.plot([d], [y], "o", color=color, ms=7, mec="black", mew=0.6, zorder=3)
            xs.append(d)
    if not vals:
        ax.text(0.5, 0.5, "no differences to show", transform=ax.transAxes, ha="center", va="center")
    ax.axvline(0.0, color="#444444", lw=1.0, ls="--", zorder=1)
    pad = 0.08 * (max(xs) - min(xs)) or 0.05
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_yticks(range(len(vals)), [v[0] for v in reversed(vals)])
    ax.set_ylim(-0.6, max(1, len(vals)) - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return to_png(fig)


def forest_figure(sc: dict[str, Any], split: str, reference: str, scenario: str, name: str) -> list[Block]:
    """The forest plot of ``asr_trig`` differences vs the reference on ``split`` (a note when there is none)."""
    rows = []
    for label, per_metric in _test_entries(sc, split).items():
        t = as_dict(per_metric.get(FOREST_METRIC))
        if finite(t.get("diff")):
            rows.append((label, _float(t["diff"]), _float(t.get("ci_low")), _float(t.get("ci_high"))))
    where = f"tests.{split}.LABEL.{FOREST_METRIC}"
    if not rows:
        return [Note(f"No finite {FOREST_METRIC} differences on the {SPLITS[split]} split ({where}): plot skipped.")]
    metric = METRIC_NAMES[FOREST_METRIC]
    title = f"{scenario}: {metric} vs {reference}, {SPLITS[split]}"
    png = forest_plot(rows, title, f"{metric} difference (method − {reference})")
    caption = (
        f"From study.json: {where}. Dot = difference of the label's {metric} rate (seen and OOD triggers pooled) "
        f"minus {reference}'s; bar = [ci_low, ci_high]; dashed line = no difference. Left of 0: lower ASR than "
        f"{reference}."
    )
    return [Figure(name, f"{metric} difference vs {reference}, {scenario}, {SPLITS[split]}", png, caption)]


def diagnostics_table(sc: dict[str, Any]) -> list[Block]:
    """One row per method label, one column per diagnostic key found in any label."""
    diags = {label: as_dict(me.get("diagnostics")) for label, me in _methods(sc).items()}
    keys = list(dict.fromkeys(k for d in diags.values() for k in d))
    if not keys:
        return [Note("No diagnostics in study.json for this scenario (methods.LABEL.diagnostics): table skipped.")]
    rows = [[label] + [_value(d.get(k)) for k in keys] for label, d in diags.items()]
    numeric = [all(isinstance(d.get(k), int | float | None) for d in diags.values()) for k in keys]
    caption = "From study.json: methods.LABEL.diagnostics, as stored (nested values as key value pairs)."
    return [Table(["Method", *map(str, keys)], rows, caption, ["l"] + ["r" if n else "l" for n in numeric])]


def selection_facts(sc: dict[str, Any], reference: str) -> list[Block]:
    """The label selected on validation, the reason, and its test-split ``asr_trig`` difference."""
    sel = sc.get("selected")
    items = [("selected on validation", _text(sel)), ("reason", _text(sc.get("selected_reason")))]
    t = as_dict(get(sc, "tests", "test", str(sel), FOREST_METRIC)) if sel else {}
    if t:
        metric = METRIC_NAMES[FOREST_METRIC]
        items.append((f"its test {metric} vs {reference}", f"{_diff_ci(t)}, Holm p {_p(t.get('p_holm'))}"))
    return [Facts(items)]


def scenario_blocks(name: str, sc: dict[str, Any], reference: str, factor: Any, safe: str) -> list[Block]:
    """Every section of one scenario; ``safe`` is its file-name-safe name (unique within the study)."""
    blocks: list[Block] = [Heading(name, 2, anchor=f"scenario-{safe}")]
    sizes = as_dict(sc.get("sizes"))
    limits = as_dict(sc.get("ppl_limit"))
    blocks.append(
        Facts(
            [
                ("config", _text(sc.get("config"))),
                ("run folder", _text(sc.get("run_dir"))),
                ("prompts per split", ", ".join(f"{k} {_text(v)}" for k, v in sizes.items()) or DASH),
                ("clean-PPL limit", ", ".join(f"{s} {_num(limits.get(s), 2)}" for s in SPLITS)),
            ]
        )
    )
    for split in ("val", "test"):
        blocks += [Heading(SPLITS[split].capitalize(), 3), *summary_table(sc, split, factor)]
    for split in ("test", "val"):
        blocks.append(Heading(f"Paired differences vs {reference}, {SPLITS[split]}", 3))
        blocks += tests_table(sc, split, reference)
        blocks += forest_figure(sc, split, reference, name, f"forest_{safe}_{split}")
    blocks += [Heading("Diagnostics", 3), *diagnostics_table(sc)]
    blocks += [Heading("Selection", 3), *selection_facts(sc, reference)]
    from rapidun.reporting.study_robust_report import robust_blocks  # (it imports this module's helpers)

    return blocks + robust_blocks(name, sc, reference, safe)


def study_blocks(study: dict[str, Any]) -> list[Block]:
    """The study report's format-neutral blocks (forest plots rendered, nothing written)."""
    blocks: list[Block] = [Heading(study_title(study), 1)]
    schema = study.get("schema")
    if schema != STUDY_SCHEMA:
        blocks.append(
            Note(f"study.json has schema {schema or '(none)'!r}, expected {STUDY_SCHEMA!r}: rendered best-effort.")
        )
    reference = str(study.get("reference") or "reference")
    sel = as_dict(study.get("selection"))
    seeds = study.get("seeds")
    scenarios = as_dict(study.get("scenarios"))
    settings = [f"metric {_text(sel.get('metric'))}", f"split {_text(sel.get('split'))}"]
    settings.append(f"perplexity factor {_num(sel.get('ppl_factor'), 2)}")
    if sel.get("select_on"):
        settings.append(f"select on {sel['select_on']}")
    blocks.append(
        Facts(
            [
                ("study file", _text(study.get("study_file"))),
                ("seeds", ", ".join(map(str, seeds)) if isinstance(seeds, list) and seeds else DASH),
                ("reference", _text(study.get("reference"))),
                ("scenarios", ", ".join(map(str, scenarios)) or DASH),
                ("selection rule", _text(sel.get("rule"))),
                ("selection settings", ", ".join(settings)),
            ]
        )
    )
    if not scenarios:
        blocks.append(Note("No scenarios in study.json (scenarios is empty or missing)."))
    used: set[str] = set()
    for name, sc in scenarios.items():
        safe = base = safe_name(name)
        i = 2
        while safe in used:  # two names that sanitize alike keep distinct plot files
            safe, i = f"{base}_{i}", i + 1
        used.add(safe)
        if not isinstance(sc, dict):
            blocks += [Heading(str(name), 2, anchor=f"scenario-{safe}"), Note("Scenario entry is not an object.")]
            continue
        blocks += scenario_blocks(str(name), sc, reference, sel.get("ppl_factor"), safe)
    decision = study.get("decision")
    blocks.append(Heading("Decision", 2, anchor="decision"))
    blocks.append(Paragraph(str(decision)) if decision else Note("No decision in study.json."))
    return blocks


def load_study(out_dir: str | Path) -> dict[str, Any]:
    """``out_dir/study.json`` as a dict.

    Raises:
        RapidunError: the file is missing, is not JSON, or is not a JSON object.
    """
    path = Path(out_dir) / "study.json"
    if not path.is_file():
        raise RapidunError(f"{path}: not found. Pass the study's output folder (the one holding study.json).")
    try:
        study = read_json(path)
    except (OSError, ValueError) as e:
        raise RapidunError(f"{path}: not readable as JSON ({e}). Rerun the study to rewrite it.") from e
    if not isinstance(study, dict):
        raise RapidunError(f"{path}: expected a JSON object, got {type(study).__name__}.")
    return study


def render_study(out_dir: str | Path) -> dict[str, Path]:
    """Write ``study.md``, ``study.html``, ``plots/forest_*.png`` and (``select_on: relearn``)
    ``plots/frontier_*.png`` into ``out_dir``, each atomically.

    Plots of those names that this study no longer produces are removed, so the folder holds no stale figure.

    Args:
        out_dir: the study's output folder, holding ``study.json``.

    Returns:
        ``{"md": study.md, "html": study.html, <plot name>: plots/<plot name>.png for each plot drawn}``.

    Raises:
        RapidunError: ``study.json`` is missing or not a JSON object (nothing is written then).
    """
    root = Path(out_dir).resolve()
    study = load_study(root)
    blocks = study_blocks(study)
    out: dict[str, Path] = {}
    plot_dir = root / "plots"
    for fig in (b for b in blocks if isinstance(b, Figure)):
        path = plot_dir / f"{fig.name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(fig.png)
        out[fig.name] = path
    drawn = set(out.values())
    for stale in [*plot_dir.glob("forest_*.png"), *plot_dir.glob("frontier_*.png")]:
        if stale not in drawn:
            stale.unlink()
    out["md"] = root / "study.md"
    write_text(out["md"], render_markdown(blocks))
    out["html"] = root / "study.html"
    write_text(out["html"], render_html(blocks, study_title(study)))
    return out


__all__ = ["STUDY_SCHEMA", "forest_plot", "load_study", "render_study", "study_blocks"]
