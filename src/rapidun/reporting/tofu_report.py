"""The TOFU report: ``report.md`` (learnability check, metric table, relearning attack, the choice made on
validation) and ``tofu_scatter.png`` (TOFU's forget-quality vs model-utility scatter, log p, one point per
method and seed, the full and retain models marked)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rapidun.io import atomic_path, write_text
from rapidun.reporting.plots import _figure, palette, to_png

FQ_FLOOR = 1e-30  # a p-value of 0 is drawn here on the log axis


def tofu_scatter(points: list[tuple[str, float, float]], refs: dict[str, tuple[float, float]], title: str) -> bytes:
    """Model utility (x) vs log10 forget quality (y); ``points`` = (method, utility, forget quality)."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    names = sorted({p[0] for p in points})
    colors = dict(zip(names, palette(max(len(names), 1)), strict=False))
    for n in names:
        xs = [p[1] for p in points if p[0] == n]
        ys = [math.log10(max(p[2], FQ_FLOOR)) for p in points if p[0] == n]
        ax.scatter(xs, ys, label=n, color=colors[n], s=28, alpha=0.85)
    for label, (mu, fq), marker in ((k, v, m) for (k, v), m in zip(refs.items(), ("*", "X"), strict=False)):
        ax.scatter([mu], [math.log10(max(fq, FQ_FLOOR))], marker=marker, s=120, color="black", label=label)
    ax.axhline(math.log10(0.05), color="grey", lw=0.8, ls="--")
    ax.text(ax.get_xlim()[0], math.log10(0.05), " p = 0.05", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("model utility (harmonic mean of 9 retain / real-authors / world-facts numbers)")
    ax.set_ylabel("log10 forget quality (KS p vs retain model)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return to_png(fig)


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and 0 < abs(x) < 10 ** (-nd):
        return f"{x:.1e}"
    return f"{x:.{nd}f}"


def _ms(e: dict[str, Any], nd: int = 3) -> str:
    return _f(e["mean"], nd) + (f" ± {_f(e['std'], nd)}" if len(e["values"]) > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    """The report's markdown text."""
    sc, lc, models, methods = report["scenario"], report["learnability"], report["models"], report["methods"]
    lines = [
        f"# TOFU ({sc['forget_split']}): forget {len(sc['forget_authors'])} fictitious authors",
        "",
        f"Forget authors: {', '.join(sc['forget_authors'])}. Scored on: "
        + ", ".join(f"{k} {v}" for k, v in sc["eval_sizes"].items())
        + " QA (validation and test halves; numbers below are the **test** half, choices were made on validation).",
        "",
        "## Did the full model learn the authors?",
        "",
        f"{'yes' if lc['ok'] else '**NO** — the benchmark below measures little at this scale'}: forget probability "
        f"{_f(lc['full_forget_prob'])} (retain model {_f(lc['retain_forget_prob'])}), ROUGE-L recall "
        f"{_f(lc['full_forget_rouge'])} ({_f(lc['retain_forget_rouge'])}), forget quality vs the retain model "
        f"{_f(lc['full_forget_quality'])} (needs < 0.01).",
        "",
        "## Test half",
        "",
        "| model | forget quality | model utility | forget prob | forget ROUGE | truth ratio | Min-K% AUC (gap) | "
        "Min-K%++ AUC (gap) | after relearning: FQ | time s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ("full", "retain"):
        t = models[label]["test"]
        lines.append(
            f"| {label} model | {_f(t['forget_quality'])} | {_f(t['model_utility'])} | {_f(t['forget_prob'])} | "
            f"{_f(t['forget_rouge'])} | {_f(t['forget_truth_ratio'])} | {_f(t['mink_auc'])} "
            f"({_f(t['mink_auc_gap'], 2)}) | {_f(t['minkpp_auc'])} ({_f(t['minkpp_auc_gap'], 2)}) | - | "
            f"{_f(models[label]['train']['time_s'], 0)} |"
        )
    for name, e in methods.items():
        t = e["test"]
        lines.append(
            f"| {name} | {_ms(t['forget_quality'])} | {_ms(t['model_utility'])} | {_ms(t['forget_prob'])} | "
            f"{_ms(t['forget_rouge'])} | {_ms(t['forget_truth_ratio'])} | {_ms(t['mink_auc'])} "
            f"({_ms(t['mink_auc_gap'], 2)}) | {_ms(t['minkpp_auc'])} ({_ms(t['minkpp_auc_gap'], 2)}) | "
            f"{_ms(e['relearn']['forget_quality']) if 'relearn' in e else '-'} | {_ms(e['time_s'], 0)} |"
        )
    quant = [(n, b, e[b]) for n, e in methods.items() for b in e if b.startswith("int")]
    if quant:
        lines += ["", "Quantization (round-to-nearest weights, test half): forget quality / forget prob after it:"]
        lines += [f"* {n} {b}: {_ms(q['forget_quality'])} / {_ms(q['forget_prob'])}" for n, b, q in quant]
    sel = report.get("selected")
    lines += [
        "",
        f"Seeds: {', '.join(next(iter(methods.values()))['seeds']) if methods else '-'}; mean ± std over seeds. "
        "Forget quality: KS-test p-value between the truth-ratio statistics of the model and of the retain model on "
        "the forget QA (high = indistinguishable). Model utility: harmonic mean of probability, ROUGE-L recall and "
        "truth ratio on retain, real-authors and world-facts QA. AUC gap: membership AUC (forget QA vs holdout "
        "authors) minus the retain model's. After relearning: forget quality on the test half after a LoRA trained "
        "on validation-half forget QA (verify.relearn_*).",
        "",
    ]
    if sel:
        lines.append(
            f"Chosen on validation: **{sel['method']}** (highest forget quality "
            + (
                f"among methods with utility ≥ {sel['utility_floor']:.3f} = 0.95 × the full model's)."
                if sel["within_utility"]
                else f"— no method kept utility ≥ {sel['utility_floor']:.3f}, 0.95 × the full model's)."
            )
        )
    return "\n".join(lines) + "\n"


def render_tofu(out: Path, report: dict[str, Any], cells: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Write ``report.md`` and ``tofu_scatter.png`` into ``out``; returns their paths."""
    pts = [(n, c["test"]["model_utility"], c["test"]["forget_quality"]) for n, ps in cells.items() for c in ps.values()]
    refs = {
        f"{k} model": (report["models"][k]["test"]["model_utility"], report["models"][k]["test"]["forget_quality"])
        for k in ("full", "retain")
    }
    png = tofu_scatter(pts, refs, f"TOFU {report['scenario']['forget_split']}: test half")
    with atomic_path(out / "tofu_scatter.png") as tmp:
        Path(tmp).write_bytes(png)
    md = markdown(report) + "\n![forget quality vs model utility](tofu_scatter.png)\n"
    write_text(out / "report.md", md)
    return {"md": out / "report.md", "png": out / "tofu_scatter.png"}
