"""Render a finished run folder into ``report.md``, a self-contained ``report.html`` and ``plots/*.png``.

Usage::

    from rapidun.reporting import render_report
    paths = render_report("runs/demo")   # {"md": ..., "html": ..., "<plot name>": plots/<plot name>.png, ...}

or ``python -m rapidun.reporting RUN_DIR``. Input: ``RUN_DIR/report.json`` (schema ``rapidun.report/4``) and the
per-seed files it points to; absent optional pieces are skipped with a note in the report.
"""

from __future__ import annotations

from pathlib import Path

from rapidun.io import atomic_path, write_text
from rapidun.reporting.build import build
from rapidun.reporting.doc import Block, Figure
from rapidun.reporting.html import render_html
from rapidun.reporting.load import SCHEMA, RunData
from rapidun.reporting.markdown import render_markdown

PLOT_NAMES = (
    "asr_vs_utility", "asr_by_family", "weights", "influence_views", "loss_curves", "calibration", "timings",
)  # fmt: skip


def report_blocks(run_dir: str | Path) -> list[Block]:
    """The report's blocks for ``run_dir`` (nothing written)."""
    return build(RunData(run_dir))


def render_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/<name>.png`` into ``run_dir``, each atomically.

    Plots of this module that are not produced this time (skipped section) are removed from ``plots/`` so the
    folder never holds a stale figure.

    Args:
        run_dir: a finished run folder holding ``report.json``.

    Returns:
        ``{"md": report.md, "html": report.html, <plot name>: plots/<plot name>.png for each plot drawn}``.

    Raises:
        FileNotFoundError: no ``report.json`` in ``run_dir``.
        ValueError: ``report.json`` is not a JSON object.
    """
    run = RunData(run_dir)
    blocks = build(run)
    out: dict[str, Path] = {}
    plot_dir = run.root / "plots"
    figures = [b for b in blocks if isinstance(b, Figure)]
    for fig in figures:
        path = plot_dir / f"{fig.name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(fig.png)
        out[fig.name] = path
    for name in PLOT_NAMES:
        stale = plot_dir / f"{name}.png"
        if name not in out and stale.is_file():
            stale.unlink()
    title = f"RapidUn report: {run.root.name}"
    out["md"] = run.root / "report.md"
    write_text(out["md"], render_markdown(blocks))
    out["html"] = run.root / "report.html"
    write_text(out["html"], render_html(blocks, title))
    return out


__all__ = ["PLOT_NAMES", "SCHEMA", "render_report", "report_blocks"]
