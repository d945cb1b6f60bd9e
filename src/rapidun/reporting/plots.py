"""The report's plots: each function takes plain data and returns PNG bytes.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend switch), and saved
through the Agg renderer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
REFERENCE_COLORS = {"poisoned": "#444444", "retrain": "#999999"}


def palette(n: int) -> list[str]:
    """``n`` distinct colours (tab10, then tab20 beyond ten)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [_hex(cmap(i % cmap.N)) for i in range(n)]


def _hex(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` as PNG bytes (no timestamp or software metadata, so equal input gives equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _err(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


@dataclass(frozen=True)
class Point:
    """One model or method in the ASR-vs-utility scatter; ``reference`` marks the single models."""

    label: str
    x: float
    y: float
    xerr: float | None = None
    yerr: float | None = None
    color: str = "C0"
    reference: bool = False


def wide_range(values: Sequence[float], ratio: float = 20.0) -> bool:
    """Whether positive ``values`` span more than ``ratio`` (then a log axis reads better)."""
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return len(v) == len(values) and len(v) > 1 and max(v) / min(v) > ratio


def asr_vs_utility(
    points: Sequence[Point], x_label: str = "clean PPL (↓ better utility)", y_label: str = "ASR seen"
) -> bytes:
    """Scatter of ASR (y) against clean perplexity (x) with std error bars; references as grey squares.

    Args:
        points: finite points only.
        x_label: x-axis label.
        y_label: y-axis label.
    """
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    for p in points:
        if p.reference:
            ax.scatter([p.x], [p.y], marker="s", s=70, color=p.color, edgecolor="black", zorder=3, label=p.label)
        else:
            ax.errorbar(
                [p.x],
                [p.y],
                xerr=[_err(p.xerr)],
                yerr=[_err(p.yerr)],
                fmt="o",
                ms=7,
                capsize=3,
                color=p.color,
                zorder=4,
                label=p.label,
            )
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if wide_range([p.x for p in points]):
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ys = [p.y + _err(p.yerr) for p in points]
    ax.set_ylim(-0.03, max(1.0, *ys) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return to_png(fig)


@dataclass(frozen=True)
class FamilySeries:
    """One bar series of the per-family plot: ``{family: (mean, std)}`` for seen and OOD triggers."""

    label: str
    seen: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    ood: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    color: str = "C0"


def family_bars(families: Sequence[str], series: Sequence[FamilySeries]) -> bytes:
    """Grouped bars of ASR per trigger family, seen triggers (left) and OOD triggers (right)."""
    fig = _figure(max(8.0, 2.2 + 0.5 * len(families) * len(series)), 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(families))
    width = 0.8 / max(1, len(series))
    for ax, which, title in ((axes[0], "seen", "seen triggers"), (axes[1], "ood", "OOD triggers")):
        for i, s in enumerate(series):
            vals = getattr(s, which)
            means = [vals[f][0] if f in vals else np.nan for f in families]
            errs = [_err(vals[f][1]) if f in vals else 0.0 for f in families]
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                means,
                width,
                yerr=errs,
                capsize=2,
                color=s.color,
                label=s.label,
                edgecolor="white",
                linewidth=0.5,
            )
        ax.set_xticks(x, families)
        ax.set_title(f"ASR by family, {title}")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ASR")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(series)), fontsize=8)
    return to_png(fig)


def weight_histogram(
    groups: dict[str, np.ndarray], colors: dict[str, str] | None = None, xlabel: str = "weight", log_y: bool = False
) -> bytes:
    """Histogram of per-sample values (weights; trace scores) on shared bins, one bar colour per group (forget,
    retain; culprit, other) side by side."""
    colors = colors or {"forget": "#d62728", "retain": "#1f77b4"}
    allw = np.concatenate([g for g in groups.values() if g.size]) if groups else np.zeros(0)
    bins = np.histogram_bin_edges(allw, bins=min(40, max(5, int(math.sqrt(max(1, allw.size))) * 2)))
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    names = list(groups)
    ax.hist(
        [groups[n] for n in names],
        bins=bins,
        color=[colors.get(n, "C0") for n in names],
        label=[f"{n} (n={groups[n].size})" for n in names],
        edgecolor="white",
        linewidth=0.5,
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    if log_y:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    return to_png(fig)


VIEW_TITLES = {
    "FF": "FF: train forget × test forget",
    "FR": "FR: train forget × test retain",
    "RF": "RF: train retain × test forget",
    "RR": "RR: train retain × test retain",
}


def color_limit(m: np.ndarray, skip_diagonal: bool, q: float = 99.0) -> float:
    """Symmetric colour limit: the ``q``-th percentile of ``|m|`` over finite entries (off the diagonal if asked).

    The self-influence diagonal of FF/RR is far larger than the rest and would wash every other cell out.
    """
    a = np.abs(m)
    keep = np.isfinite(a)
    if skip_diagonal and m.shape[0] == m.shape[1] and m.shape[0] > 1:
        keep &= ~np.eye(m.shape[0], dtype=bool)
    vals = a[keep]
    lim = float(np.percentile(vals, q)) if vals.size else 0.0
    return lim if lim > 0 else 1.0


def influence_heatmaps(views: dict[str, np.ndarray], q: float = 99.0) -> bytes:
    """2×2 heat maps of the influence views on a diverging colour map centred at 0.

    Each panel's scale is symmetric, ``±`` :func:`color_limit` (off-diagonal for FF and RR); larger values saturate
    (arrows on the colour bar).
    """
    fig = _figure(10.0, 8.4)
    axes = fig.subplots(2, 2)
    for ax, key in zip(axes.flat, ("FF", "FR", "RF", "RR"), strict=True):
        m = views[key]
        lim = color_limit(m, key in ("FF", "RR"), q)
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(f"{VIEW_TITLES[key]} ({m.shape[0]}×{m.shape[1]})", fontsize=10)
        ax.set_xlabel("test sample")
        ax.set_ylabel("train sample")
        fig.colorbar(im, ax=ax, shrink=0.9, extend="both")
    return to_png(fig)


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing ``window``-step mean of ``y`` ignoring NaNs (shorter windows at the start)."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    v = np.where(ok, y, 0.0)
    k = np.ones(max(1, window))
    s = np.convolve(v, k)[: y.size]
    c = np.convolve(ok.astype(np.float64), k)[: y.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def smoothing_window(n: int) -> int:
    """The moving-average window used for an ``n``-step curve: about n/20, between 1 and 50."""
    return max(1, min(50, n // 20))


def loss_curves(curves: dict[str, list[tuple[str, np.ndarray]]], colors: dict[str, str]) -> bytes:
    """One panel per method: the raw per-step loss of each seed (thin) and its moving average (thick)."""
    n = len(curves)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(4.2 * ncols + 0.5, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).flat
    axes = list(axes)
    for ax, (name, runs) in zip(axes, curves.items(), strict=False):
        color = colors.get(name, "C0")
        for i, (seed, y) in enumerate(runs):
            steps = np.arange(1, y.size + 1)
            w = smoothing_window(y.size)
            ax.plot(steps, y, color=color, alpha=0.25, lw=0.6)
            ax.plot(
                steps,
                moving_average(y, w),
                color=color,
                alpha=1.0 - 0.25 * min(i, 3),
                lw=1.6,
                label=f"seed {seed} (MA {w})",
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return to_png(fig)


def timing_bars(bars: Sequence[tuple[str, dict[str, float]]], components: Sequence[str]) -> bytes:
    """Stacked bars of seconds per component, one bar per method (or model)."""
    fig = _figure(max(7.5, 3.0 + 1.0 * len(bars)), 4.4)
    ax = fig.subplots()
    cols = palette(len(components))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for comp, col in zip(components, cols, strict=True):
        vals = np.array([b[1].get(comp, 0.0) for b in bars])
        if not np.any(vals):
            continue
        ax.bar(x, vals, 0.6, bottom=bottom, color=col, label=comp, edgecolor="white", linewidth=0.5)
        bottom += vals
    for xi, total in zip(x, bottom, strict=True):
        ax.annotate(f"{total:.1f} s", (xi, total), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x, [b[0] for b in bars], rotation=20 if len(bars) > 5 else 0)
    ax.set_ylabel("seconds")
    ax.set_ylim(0, max(1e-9, float(bottom.max(initial=0.0))) * 1.12)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    return to_png(fig)


@dataclass
class FrontierPoint:
    """One model of the removal frontier: what it cost to produce and how much behaviour a relearning attack finds.

    Attributes:
        label: the model or method name, written next to its marker.
        time_s: measured cost of producing the model in seconds (poisoned: 0, drawn on the left edge).
        asr_after: seen-trigger ASR after the relearning attack (mean over seeds).
        asr_after_std: its std over seeds (error bar), or None.
        asr_before: the model's own ASR before the attack (hollow marker, thin line up to ``asr_after``), or None.
        kind: ``"poisoned"`` | ``"retrain"`` | ``"method"``.
        color: the method's colour (the report's shared one); None: the references' grey, else the palette.
    """

    label: str
    time_s: float
    asr_after: float
    asr_after_std: float | None = None
    asr_before: float | None = None
    kind: str = "method"
    color: str | None = None


def removal_frontier(points: Sequence[FrontierPoint], title: str = "Removal frontier") -> bytes:
    """ASR after a relearning attack (y) against the measured cost of producing each model (x).

    The lower left holds what removes the behaviour cheaply; retrain marks the cost of the exact answer and
    poisoned (cost 0) the behaviour untouched, both drawn as dotted horizontal guides. A filled marker is the rate
    after the attack (std error bar when given), a hollow one the model's own rate before it, joined by a thin line.
    The x-axis is logarithmic when the positive costs span more than :func:`wide_range`'s ratio; a point at cost
    ``≤ 0`` is then drawn on the left edge (``min positive / 3``) and annotated ``cost 0``.
    """
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    methods = [p for p in points if p.kind not in REFERENCE_COLORS]
    colors = dict(zip([p.label for p in methods], palette(len(methods)), strict=True))
    pos = [p.time_s for p in points if p.time_s > 0 and math.isfinite(p.time_s)]
    log_x = wide_range(pos)
    hi = max(pos, default=1.0)
    left = min(pos) / 3 if log_x else -0.04 * hi  # where cost-0 models are drawn (log axis) / the x limit (linear)
    placed: list[tuple[float, float, int]] = []  # (x, y, line) of the labels so far: near ones take other lines
    for p in points:
        color = p.color or REFERENCE_COLORS.get(p.kind, colors.get(p.label, "C0"))
        zero = not (p.time_s > 0 and math.isfinite(p.time_s))
        x = (left if log_x else 0.0) if zero else p.time_s
        ref = p.kind in REFERENCE_COLORS
        if ref:
            ax.axhline(p.asr_after, color=color, ls=":", lw=1.0, zorder=1)
        if p.asr_before is not None and math.isfinite(p.asr_before):
            ax.plot([x, x], [p.asr_before, p.asr_after], color=color, lw=0.8, alpha=0.7, zorder=2, clip_on=False)
            ax.scatter([x], [p.asr_before], marker="s" if ref else "o", s=45, facecolor="white", edgecolor=color,
                       linewidth=1.4, zorder=3, clip_on=False)  # fmt: skip
        ax.errorbar([x], [p.asr_after], yerr=[_err(p.asr_after_std)], fmt="s" if ref else "o", ms=8, capsize=3,
                    color=color, mec="black" if ref else color, zorder=4, clip_on=False)  # fmt: skip
        text = f"{p.label} (cost 0)" if zero else p.label
        span = (math.log10(hi * 3) - math.log10(left)) if log_x else hi * 1.2
        pos_x = math.log10(x) if log_x else x
        taken = {lv for px, py, lv in placed if abs(pos_x - px) < 0.12 * span and abs(p.asr_after - py) < 0.06}
        level = min(k for k in range(len(placed) + 1) if k not in taken)  # the first free line below the point
        placed.append((pos_x, p.asr_after, level))
        ax.annotate(text, (x, p.asr_after), textcoords="offset points", xytext=(7, 5 - 12 * level), fontsize=9,
                    zorder=5)  # fmt: skip
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(left, hi * 3)
    else:
        ax.set_xlim(left, hi * 1.15)
    ys = [p.asr_after + _err(p.asr_after_std) for p in points]
    ax.set_ylim(-0.03, max(1.0, *ys, 0.0) + 0.05)
    ax.set_xlabel("measured cost of producing the model (s" + (", log" if log_x else "") + ")")
    ax.set_ylabel("ASR seen after the relearning attack")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    handles = [
        ax.scatter([], [], marker="o", s=45, color="#666666", label="after the attack (mean ± std over seeds)"),
        ax.scatter([], [], marker="o", s=45, facecolor="white", edgecolor="#666666", label="before the attack"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    return to_png(fig)


def calibration_curves(runs: Sequence[tuple[str, dict[str, Any]]], colors: dict[str, str] | None = None) -> bytes:
    """The calibrated schedule's measurements (:mod:`rapidun.calibrate`), one line per run, against the step.

    Three panels sharing the step axis: the held-out utility ratio ``u = exp(h − h₀)`` with the budget (dashed),
    the forget signal ``s`` (measured at the probe's end and at main-run checks within the budget) with the target
    (dashed), and the learning rate at each check (log scale). The kept state (``best_step``) is starred.

    Args:
        runs: ``(label, record)`` pairs, ``record`` a result.json ``calibration`` (``curve``: a list of checks with
            ``step``, ``lr``, ``utility_ratio``, ``signal``; ``budget``, ``target``, ``best_step``).
        colors: optional label → colour.
    """
    colors = colors or {}
    fig = _figure(7.0, 7.4)
    ax_u, ax_s, ax_r = fig.subplots(3, 1, sharex=True)
    fallback = palette(max(1, len(runs)))
    for i, (label, rec) in enumerate(runs):
        color = colors.get(label, fallback[i])
        curve = [c for c in rec.get("curve", []) if isinstance(c, dict) and c.get("step") is not None]
        u = [(c["step"], c["utility_ratio"]) for c in curve if c.get("utility_ratio") is not None]
        s = [(c["step"], c["signal"]) for c in curve if c.get("signal") is not None and math.isfinite(c["signal"])]
        r = [(c["step"], c["lr"]) for c in curve if c.get("lr")]
        if u:
            ax_u.plot(*zip(*u, strict=True), marker="o", ms=3, lw=1.2, color=color, label=label)
        if s:
            ax_s.plot(*zip(*s, strict=True), marker="o", ms=3, lw=1.2, color=color, label=label)
        if r:
            ax_r.plot(*zip(*r, strict=True), marker=".", lw=1.0, color=color, label=label)
        best = rec.get("best_step")
        kept = [c for c in curve if c["step"] == best and c.get("utility_ratio") is not None]
        if kept:
            ax_u.plot([best], [kept[-1]["utility_ratio"]], marker="*", ms=12, color=color, ls="none")
        if rec.get("best_signal") is not None and best is not None and math.isfinite(rec["best_signal"]):
            ax_s.plot([best], [rec["best_signal"]], marker="*", ms=12, color=color, ls="none")
    budgets = {rec.get("budget") for _, rec in runs if rec.get("budget") is not None}
    targets = {rec.get("target") for _, rec in runs if rec.get("target") is not None}
    for b in budgets:
        ax_u.axhline(b, ls="--", color="0.4", lw=1.0, label=f"budget {b:g}")
    for t in targets:
        ax_s.axhline(t, ls="--", color="0.4", lw=1.0, label=f"target {t:g}")
    ax_u.set_ylabel("held-out utility ratio u")
    ax_s.set_ylabel("forget signal s (nats)")
    ax_r.set_ylabel("learning rate")
    ax_r.set_yscale("log")
    ax_r.set_xlabel("optimiser step")
    ax_u.set_title("Calibrated schedule (star: the state kept)", fontsize=10)
    for ax in (ax_u, ax_s, ax_r):
        ax.grid(alpha=0.3)
    ax_u.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    return to_png(fig)
