"""Assemble the report's blocks (text, tables, plots) from a run folder."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import yaml

from rapidun.io import fault_point, read_json
from rapidun.reporting import plots, tables
from rapidun.reporting.doc import Block, Code, Facts, Figure, Heading, Note
from rapidun.reporting.load import SCHEMA, RunData, as_dict, finite, get, num, read_jsonl

REFERENCE = "rapidun"
# Disjoint stages only: influence_caching_s / influence_retrieval_s are parts of influence_s, time_s a total, and
# influence_sketches_reused a count.
TIMING_ORDER = ["influence_s", "mapping_s", "training_s", "eval_s", "load_s", "audit_before_s", "audit_after_s"]
MAX_LISTED_FILES = 8


def method_colors(run: RunData) -> dict[str, str]:
    """A colour per method (display order), shared by every plot."""
    names = list(run.methods)
    return dict(zip(names, plots.palette(len(names)), strict=True))


def _files(run: RunData, paths: list[Any]) -> str:
    rels = [run.rel(p) for p in paths]
    if len(rels) > MAX_LISTED_FILES:
        return ", ".join(rels[:MAX_LISTED_FILES]) + f" and {len(rels) - MAX_LISTED_FILES} more"
    return ", ".join(rels)


def header(run: RunData) -> list[Block]:
    """Title, scenario sizes, seeds, demo note and detector quality."""
    r = run.report
    out: list[Block] = [Heading("RapidUn unlearning report", 1, "top")]
    if run.schema != SCHEMA:
        out.append(
            Note(f"report.json has schema {run.schema or '(none)'!r}, expected {SCHEMA!r}: rendered best-effort.")
        )
    items: list[tuple[str, str]] = [("Run folder", run.root.name)]
    sc = as_dict(r.get("scenario"))
    sizes = as_dict(sc.get("sizes"))
    if sizes:
        items.append(("Scenario sizes", ", ".join(f"{k} {v}" for k, v in sizes.items())))
    data = as_dict(sc.get("data"))
    if data:
        items.append(("Data", ", ".join(f"{k} {v}" for k, v in data.items())))
    if sc.get("poison_source") is not None:
        items.append(("Poison source", str(sc["poison_source"])))
    if sc.get("seed") is not None:
        items.append(("Scenario seed", str(sc["seed"])))
    items.append(("Unlearning seeds", ", ".join(run.seeds) or tables.DASH))
    if r.get("demo_note"):
        items.append(("Demo", str(r["demo_note"])))
    det = as_dict(r.get("detector"))
    if det:
        items.append(
            (
                "Detector",
                f"precision {tables.fmt_num(det.get('precision'))}, recall {tables.fmt_num(det.get('recall'))}"
                f" (threshold {det.get('threshold', tables.DASH)}, {det.get('n_keywords', tables.DASH)} keywords)",
            )
        )
    out.append(Facts(items))
    out.append(Note("Every value below comes from report.json or from the file named under its table or plot."))
    return out


def asr_scatter(run: RunData, colors: dict[str, str]) -> list[Block]:
    """Plot a: ASR seen against clean perplexity, mean ± std per method, the models as references."""
    points: list[plots.Point] = []
    skipped: list[str] = []
    for name in ("poisoned", "retrain"):
        mm = run.models.get(name)
        if isinstance(mm, dict):
            x, y = num(mm.get("clean_ppl")), num(mm.get("asr_seen"))
            if finite(x) and finite(y):
                points.append(plots.Point(f"{name} (model)", x, y, color=plots.REFERENCE_COLORS[name], reference=True))
            else:
                skipped.append(f"{name} (model)")
    for name, me in run.methods.items():
        x, y = num(get(me, "mean", "clean_ppl")), num(get(me, "mean", "asr_seen"))
        if finite(x) and finite(y):
            points.append(
                plots.Point(name, x, y, num(get(me, "std", "clean_ppl")), num(get(me, "std", "asr_seen")), colors[name])
            )
        else:
            skipped.append(name)
    if not points:
        return [Note("ASR vs utility plot skipped: no model or method with a finite clean PPL and ASR seen.")]
    log = plots.wide_range([p.x for p in points])
    png = plots.asr_vs_utility(points, "clean PPL" + (" (log scale)" if log else ""), "ASR seen")
    caption = (
        "From report.json: methods.NAME.mean/std (clean_ppl, asr_seen; error bars = std over seeds) and "
        "models.poisoned / models.retrain (squares)."
    )
    out: list[Block] = [Figure("asr_vs_utility", "ASR (seen triggers) vs clean perplexity", png, caption)]
    if skipped:
        out.append(Note(f"Not plotted (non-finite clean PPL or ASR): {', '.join(skipped)}."))
    return out


def _family_stats(d: Any) -> dict[str, tuple[float, float | None]]:
    out = {}
    for fam, v in as_dict(d).items():
        m, s = (num(v.get("mean")), num(v.get("std"))) if isinstance(v, dict) else (num(v), None)
        if m is not None and math.isfinite(m):
            out[str(fam)] = (m, s)
    return out


def family_plot(run: RunData, colors: dict[str, str]) -> list[Block]:
    """Plot b: ASR per trigger family (seen and OOD) for the models and each method."""
    series: list[plots.FamilySeries] = []
    for name in ("poisoned", "retrain"):
        mm = run.models.get(name)
        if isinstance(mm, dict):
            series.append(
                plots.FamilySeries(
                    f"{name} (model)",
                    _family_stats(mm.get("asr_seen_by_family")),
                    _family_stats(mm.get("asr_ood_by_family")),
                    plots.REFERENCE_COLORS[name],
                )
            )
    for name, me in run.methods.items():
        bf = as_dict(me.get("by_family"))
        series.append(
            plots.FamilySeries(name, _family_stats(bf.get("asr_seen")), _family_stats(bf.get("asr_ood")), colors[name])
        )
    series = [s for s in series if s.seen or s.ood]
    families = sorted({f for s in series for f in (*s.seen, *s.ood)})
    if not families:
        return [Note("Per-family ASR plot skipped: no per-family ASR in report.json.")]
    caption = (
        "From report.json: models.MODEL.asr_seen_by_family / asr_ood_by_family and "
        "methods.NAME.by_family.asr_seen / asr_ood (mean, error bars = std over seeds)."
    )
    return [Figure("asr_by_family", "ASR per trigger family", plots.family_bars(families, series), caption)]


def weight_plot(run: RunData, method: str = REFERENCE) -> list[Block]:
    """Plot c: histogram of ``method``'s first-seed sample weights, forget vs retain."""
    me = run.methods.get(method)
    if me is None:
        return [Note(f"Weight histogram skipped: no {method} method in report.json.")]
    seed, f = run.first_seed_file(method, "weights.jsonl")
    if f is None or not f.is_file():
        return [Note(f"Weight histogram skipped: no {run.rel(f) if f else method + ' folder'} in the run folder.")]
    try:
        rows = read_jsonl(f)
    except (OSError, ValueError) as e:
        return [Note(f"Weight histogram skipped: could not read {run.rel(f)} ({e}).")]
    groups = {}
    for g in ("forget", "retain"):
        w = np.array([float(r["weight"]) for r in rows if r.get("group") == g and finite(r.get("weight"))])
        if w.size:
            groups[g] = w
    if not groups:
        return [Note(f"Weight histogram skipped: no finite weights in {run.rel(f)}.")]
    caption = f"From {run.rel(f)} (seed {seed}): weight per sample, forget and retain groups."
    return [Figure("weights", f"{method} sample weights", plots.weight_histogram(groups), caption)]


def _load_views(run: RunData, folder: Any) -> tuple[dict[str, np.ndarray], str]:
    """The four views from ``folder/views.pt`` split with ``views.json``; raises ValueError with a reason."""
    import torch

    pt, js = folder / "views.pt", folder / "views.json"
    if not pt.is_file() or not js.is_file():
        raise ValueError(f"no {run.rel(pt)} / {run.rel(js)}")
    meta = as_dict(_read_json(js))
    forget_ids = meta.get("forget_ids")
    if not isinstance(forget_ids, list):
        raise ValueError(f"{run.rel(js)} has no forget_ids")
    try:
        m = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, RuntimeError, ...) for a bad file
        raise ValueError(f"could not load {run.rel(pt)}: {e}") from e
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{run.rel(pt)} is not a square matrix")
    n, nf = m.shape[0], len(forget_ids)
    retain_ids = meta.get("retain_ids")
    if isinstance(retain_ids, list) and nf + len(retain_ids) != n:
        raise ValueError(f"{run.rel(pt)} is {n}×{n} but views.json lists {nf} + {len(retain_ids)} ids")
    if not 0 < nf < n:
        raise ValueError(f"{run.rel(pt)}: cannot split {n} samples at n_forget = {nf}")
    a = m.detach().to(torch.float64).numpy()
    views = {"FF": a[:nf, :nf], "FR": a[:nf, nf:], "RF": a[nf:, :nf], "RR": a[nf:, nf:]}
    return views, f"From {run.rel(pt)}, split at n_forget = {nf} from {run.rel(js)} (forget_ids)"


def _read_json(path: Any) -> Any:
    """JSON content of ``path``; ValueError for unreadable or invalid files."""
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {path}: {e}") from e


def heatmap_plot(run: RunData) -> list[Block]:
    """Plot d: heat maps of the four influence views of the first seed."""
    inf = run.report.get("influence")
    per_seed = get(inf, "per_seed")
    seed = run.first_seed(per_seed)
    if seed is None:
        return [Note("Influence heat maps skipped: no influence in report.json (no influence-based method).")]
    folder = run.resolve(get(per_seed, seed, "dir"))
    if folder is None:
        return [Note(f"Influence heat maps skipped: influence.per_seed.{seed}.dir is missing or outside the run.")]
    try:
        views, source = _load_views(run, folder)
    except ValueError as e:
        return [Note(f"Influence heat maps skipped: {e}.")]
    caption = (
        f"{source} (seed {seed}). Rows: train samples, columns: test samples. Colour scale per panel: symmetric "
        "around 0 up to the 99th percentile of |value| (off the diagonal for FF and RR, whose self-influence "
        "diagonal is much larger); larger values saturate."
    )
    return [Figure("influence_views", "Influence views (FF, FR, RF, RR)", plots.influence_heatmaps(views), caption)]


def loss_plot(run: RunData, colors: dict[str, str]) -> list[Block]:
    """Plot e: training-loss curves of each method and seed, from result.json ``train.loss_curve``."""
    curves: dict[str, list[tuple[str, np.ndarray]]] = {}
    files = []
    missing = []
    for name, me in run.methods.items():
        for seed in run.ordered_seeds(me.get("per_seed")):
            folder = run.method_dir(name, seed)
            f = folder / "result.json" if folder is not None else None
            if f is None or not f.is_file():
                continue
            try:
                curve = get(_read_json(f), "train", "loss_curve")
            except ValueError:
                continue
            if not isinstance(curve, list) or not curve:
                continue
            y = np.array([v if (v := num(x)) is not None else np.nan for x in curve], dtype=np.float64)
            curves.setdefault(name, []).append((seed, y))
            files.append(f)
        if name not in curves:
            missing.append(name)
    if not curves:
        return [Note("Training-loss plot skipped: no result.json with a train.loss_curve in the run folder.")]
    caption = (
        f"From train.loss_curve of {_files(run, files)}. Thin: raw loss per step; thick: trailing moving average "
        "(window in the legend)."
    )
    out: list[Block] = [Figure("loss_curves", "Unlearning training loss", plots.loss_curves(curves, colors), caption)]
    if missing:
        out.append(Note(f"No loss curve for: {', '.join(missing)}."))
    return out


def calibration_plot(run: RunData, colors: dict[str, str]) -> list[Block]:
    """The calibrated schedule of each method and seed (result.json ``calibration``), when its runs used it."""
    runs: list[tuple[str, dict[str, Any]]] = []
    files = []
    for name, me in run.methods.items():
        seeds = run.ordered_seeds(me.get("per_seed"))
        for seed in seeds:
            folder = run.method_dir(name, seed)
            f = folder / "result.json" if folder is not None else None
            if f is None or not f.is_file():
                continue
            try:
                rec = get(_read_json(f), "calibration")
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("schedule") == "calibrated" and rec.get("curve"):
                runs.append((name if len(seeds) == 1 else f"{name} seed {seed}", rec))
                files.append(f)
    if not runs:
        return [Note("No calibrated schedule in this run (unlearn.schedule=fixed): nothing to plot.")]
    caption = (
        f"From calibration.curve of {_files(run, files)}: the held-out utility ratio against the budget, the "
        "forget signal against its target and the rate at each check (docs/method.md, the calibrated schedule)."
    )
    return [Figure("calibration", "Calibrated schedule", plots.calibration_curves(runs, colors), caption)]


def timing_plot(run: RunData) -> list[Block]:
    """Plot f: stacked mean timings per method, plus the retrained model's fine-tuning time."""
    bars: list[tuple[str, dict[str, float]]] = []
    comps: list[str] = []
    for name, me in run.methods.items():
        tm = {
            str(k): float(v)
            for k, v in as_dict(me.get("timings_mean")).items()
            if k in TIMING_ORDER and finite(v) and float(v) >= 0
        }
        if tm:
            bars.append((name, tm))
            comps += [k for k in tm if k not in comps]
    retrain_s = num(get(run.models, "retrain", "train_time_s"))
    if retrain_s is not None and math.isfinite(retrain_s) and "retrain" not in run.methods:
        bars.append(("retrain (model)", {"retrain train_time_s": retrain_s}))
        comps.append("retrain train_time_s")
    if not bars:
        return [Note("Timing plot skipped: no methods.NAME.timings_mean nor models.retrain.train_time_s.")]
    ordered = [c for c in TIMING_ORDER if c in comps] + [c for c in comps if c not in TIMING_ORDER]
    caption = (
        "From report.json: methods.NAME.timings_mean (seconds, mean over seeds; the disjoint stages only: "
        "influence, mapping, training, evaluation, model load and the before/after loss audits; retrain: its "
        "fine-tuning and evaluation)."
    )
    return [Figure("timings", "Time per method", plots.timing_bars(bars, ordered), caption)]


def frontier_plot(run: RunData, colors: dict[str, str]) -> list[Block]:
    """The removal frontier: ASR after the relearning attack against the measured cost of each verified model.

    Methods are averaged over their verified seeds (:func:`rapidun.reporting.verify_tables.frontier_rows`);
    poisoned sits at cost 0 and retrain at its fine-tuning time. A figure and the table of its numbers.
    """
    from rapidun.reporting.verify_tables import frontier_rows, frontier_table

    rows = frontier_rows(run.report.get("verification"), run.methods, run.models)
    points, skipped = [], []
    for r in rows:
        if r.asr_after is None or r.time_s is None or not math.isfinite(r.time_s):
            skipped.append(f"{r.label} ({'no relearning attack' if r.asr_after is None else 'no measured time'})")
            continue
        color = colors.get(r.label) if r.kind == "method" else None
        points.append(plots.FrontierPoint(r.label, r.time_s, r.asr_after, r.asr_after_std, r.asr_before, r.kind, color))
    if not points:
        return [Note("Removal frontier skipped: no verified model with a relearning attack and a measured cost.")]
    caption = (
        "From report.json: y = verification.summary.LABEL.relearn.asr_seen_after (seen-trigger ASR after the "
        "relearning attack; methods: mean over the verified seeds LABEL = METHOD@SEED, error bars = std), hollow = "
        "summary.LABEL.asr_seen (before the attack); x = methods.METHOD.mean.time_s (measured unlearning time), "
        "models.retrain.train_time_s for retrain, 0 for poisoned (left edge). Lower left: removed cheaply; a method "
        "near poisoned's dotted line after the attack had hidden the behaviour, not removed it."
    )
    png = plots.removal_frontier(points)
    out: list[Block] = [Figure("removal_frontier", "Removal frontier: cost vs ASR after relearning", png, caption)]
    out.append(frontier_table(rows))
    if skipped:
        out.append(Note(f"Not plotted: {', '.join(skipped)}."))
    return out


def config_and_env(run: RunData) -> list[Block]:
    """The resolved config as YAML, the environment and the stage timings."""
    out: list[Block] = [Heading("Config and environment", 2, "config")]
    cfg = run.report.get("config")
    if isinstance(cfg, dict) and cfg:
        out += [Heading("Config", 3), Code(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), "yaml")]
        out.append(Note("From report.json: config."))
    else:
        out.append(Note("No config in report.json."))
    out += [Heading("Environment", 3), *tables.environment(run)]
    out += [Heading("Stage timings", 3), *tables.stage_timings(run)]
    return out


def _guard(name: str, fn: Callable[[], list[Block]]) -> list[Block]:
    """Run one optional plot/section; an unexpected error becomes a note instead of failing the report."""
    try:
        return fn()
    except Exception as e:  # a malformed optional piece must not sink the whole report
        return [Note(f"{name} skipped: {type(e).__name__}: {e}")]


def build(run: RunData) -> list[Block]:
    """All blocks of the report, in order."""
    colors = method_colors(run)
    blocks: list[Block] = header(run)
    blocks += [Heading("Results", 2, "results"), *_guard("Headline table", lambda: tables.headline(run))]
    blocks += _guard("Methods table", lambda: tables.methods_table(run))
    blocks += [Heading("Paired tests", 2, "tests"), *_guard("Paired tests", lambda: tables.paired_tests(run))]
    blocks += [
        Heading("Signal diagnostics", 2, "diagnostics"),
        *_guard("Diagnostics", lambda: tables.diagnostics_table(run)),
    ]
    if run.report.get("verification"):
        from rapidun.reporting.verify_tables import verification_blocks

        blocks += [
            Heading("Verification: did it really forget?", 2, "verification"),
            *_guard("Verification", lambda: verification_blocks(run.report.get("verification"))),
            Heading("Removal frontier", 3),
            *_guard("Removal frontier", lambda: frontier_plot(run, colors)),
        ]
    if run.report.get("trace"):
        from rapidun.reporting.trace_tables import traced_blocks

        blocks += [
            Heading("Trace, then forget", 2, "trace"),
            *_guard("Trace", lambda: traced_blocks(run.report.get("trace"))),
        ]
    blocks.append(Heading("Plots", 2, "plots"))
    sections: list[tuple[str, Callable[[], list[Block]]]] = [
        ("ASR vs utility", lambda: asr_scatter(run, colors)),
        ("ASR per trigger family", lambda: family_plot(run, colors)),
        (f"{REFERENCE} sample weights", lambda: weight_plot(run)),
        ("Influence views", lambda: heatmap_plot(run)),
        ("Training loss", lambda: loss_plot(run, colors)),
        ("Calibrated schedule", lambda: calibration_plot(run, colors)),
        ("Timings", lambda: timing_plot(run)),
    ]
    for title, fn in sections:
        fault_point("report:section")
        blocks += [Heading(title, 3), *_guard(title, fn)]
    blocks += [Heading("Top samples", 2, "samples"), *_guard("Top samples", lambda: tables.top_samples(run, REFERENCE))]
    blocks += _guard("Config and environment", lambda: config_and_env(run))
    return blocks
