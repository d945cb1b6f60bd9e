"""The comparison engine both ``rapidun compare`` paths run on: cells, aggregation over seeds, paired tests.

A comparison is methods × seeds. Seed j uses ``unlearn.seed + j`` and ``influence.seed + j`` (:func:`seed_config`);
the influence views of one seed are computed on first use and shared by its methods (:func:`views_provider`).
Each (method, seed) is a *cell*: a folder with the unlearning outputs, ``metrics.json`` (its content key, the
unlearning result and the evaluation's metrics) and a per-prompt generation file; a finished cell whose key matches
is reused (:func:`reuse_or_run`, :func:`method_cell`), so a killed comparison resumes. What is evaluated is plugged
in: the scenario's splits (:func:`rapidun.compare.run_cell`) or a user's probes
(:func:`rapidun.user_compare.compare_user`); each path computes its own content key.

Per method, every value is summarised over seeds as mean ± sample std (:func:`over_seeds`); each method is paired
with the reference on the same prompts and seeds (:func:`paired_tests`: paired bootstrap CI and the prompt-level
sign-flip p, :func:`rapidun.stats.compare_hits`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rapidun.config import RunConfig
from rapidun.data.records import Record
from rapidun.distributed import broadcast, is_main
from rapidun.errors import RapidunError
from rapidun.io import fault_point, read_json, write_json
from rapidun.memory import PeakMemory
from rapidun.methods import get_method, views_kind
from rapidun.stats import compare_hits, mean_std
from rapidun.unlearn import unlearn_shared
from rapidun.views import method_views


def seed_config(cfg: RunConfig, j: int) -> RunConfig:
    """The config of the comparison's seed ``j``: ``unlearn.seed + j`` and ``influence.seed + j``."""
    return dataclasses.replace(
        cfg,
        unlearn=dataclasses.replace(cfg.unlearn, seed=cfg.unlearn.seed + j),
        influence=dataclasses.replace(cfg.influence, seed=cfg.influence.seed + j),
    )


def views_provider(
    poisoned: str, parts: dict[str, list[Record]], scfg: RunConfig, folder: Path, box: dict[str, Any]
) -> Callable[[str], dict[str, Any]]:
    """``views_of(kind)`` for one seed: :func:`rapidun.views.method_views` computed on first use, kept in ``box``
    (``box[kind]``; ``box["peak_mem_mb"]``: the sketch stage's peak memory, also written to ``peak_mem.json``)."""

    def views_of(kind: str) -> dict[str, Any]:
        if kind not in box:
            with PeakMemory() as peak:
                box[kind] = method_views(kind, poisoned, parts["forget"], parts["retain"], scfg, folder)
            if kind == "sketch":
                box["peak_mem_mb"] = peak.peak_mb
                if is_main():
                    write_json(folder / "peak_mem.json", {"peak_mem_mb": peak.peak_mb, "kind": peak.kind})
        return box[kind]

    return views_of


def reuse_or_run(
    f: Path, key: str, compute: Callable[[], dict[str, Any]], needs: Iterable[Path] = ()
) -> tuple[dict[str, Any], bool]:
    """The one run-or-reuse rule: ``f`` (``{"key": key, **payload}``) is reused when its key matches and every
    file of ``needs`` exists; otherwise ``compute()`` gives the payload and rank 0 writes it (atomically).

    Returns:
        ``(payload, cached)``.
    """
    hit = broadcast(f.is_file() and all(p.is_file() for p in needs) and read_json(f).get("key") == key)
    if hit:
        saved = read_json(f)
        saved.pop("key")
        return saved, True
    payload = compute()
    if is_main():
        write_json(f, {"key": key, **payload})
    return payload, False


def method_cell(
    name: str,
    cfg: RunConfig,
    parts: dict[str, list[Record]],
    model_path: str,
    out: Path,
    rel: str,
    gen: Path,
    key: str,
    views_of: Callable[[str], dict[str, Any]],
    before: dict[str, Any],
    evaluate: Callable[[Any, Any], dict[str, Any]],
    provenance: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """One (method, seed) cell: :func:`rapidun.unlearn.unlearn` into ``out/rel``, then ``evaluate``.

    Args:
        name: the registered method.
        cfg: the seed's config (:func:`seed_config`).
        parts: the packs (``forget``, ``retain``, ...), as :func:`rapidun.unlearn.unlearn` takes them.
        model_path: the start model.
        out, rel: the comparison's folder and the cell's folder inside it (``seeds/<seed>/methods/<label>``).
        gen: the per-prompt generation file ``evaluate`` writes (the paired tests read it); a cell without it
            is re-run.
        key: the cell's content key (everything its result depends on; not the list of other methods).
        views_of: the seed's influence views by kind (:func:`views_provider`).
        before: ``before["losses"]``, the start model's per-sample losses, and ``before["start"]``, its held-out
            snapshot (``start_cache`` of :func:`rapidun.unlearn.unlearn`), shared by every cell (filled by the
            first cell that runs).
        evaluate: ``evaluate(model, tokenizer) -> metrics`` on the unlearned model; writes ``gen``.
        provenance: for the receipt (:func:`rapidun.unlearn.unlearn`).

    Returns:
        ``(metrics, result, cached)``: the evaluation's metrics (plus ``peak_mem_mb``/``peak_mem_kind``), the
        unlearning result, and whether the cell was reused.
    """
    fault_point("compare:cell")
    get_method(name)  # an unknown name fails here, before any work

    def compute() -> dict[str, Any]:
        kind = views_kind(name, cfg.unlearn.distill_teacher)
        views = views_of(kind) if kind else None
        with PeakMemory() as peak:
            merged, tok, res = unlearn_shared(name, parts, model_path, cfg, out / rel, views, before, provenance)
            metrics = evaluate(merged, tok)
            del merged
        metrics["peak_mem_mb"], metrics["peak_mem_kind"] = peak.peak_mb, peak.kind
        return {"result": res, "metrics": metrics}

    saved, cached = reuse_or_run(out / rel / "metrics.json", key, compute, needs=[gen])
    if not cached and is_main():
        for w in saved["result"].get("warnings", []):  # e.g. the held-out utility check; also in result.json
            print(f"warning: {rel}: {w}", file=sys.stderr)
    return saved["metrics"], saved["result"], cached


def over_seeds(cells: list[dict[str, Any]], *path: str) -> dict[str, Any]:
    """Mean and sample std over seeds of ``cell[path[0]][path[1]]...`` (:func:`rapidun.stats.mean_std`).

    Cells without the value (missing, or None) are left out; ``{"mean": None, "std": None}`` when none has it.
    """
    vals = []
    for c in cells:
        v: Any = c
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return mean_std(vals) if vals else {"mean": None, "std": None}


def read_hits(path: Path, field: str, within: tuple[str, ...]) -> dict[str, bool]:
    """``{prompt id: hit}`` of the rows of a generation file whose ``field`` is one of ``within``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: bool(r["hit"]) for r in rows if r[field] in within}


def hit_matrix(files: list[Path], within: str | tuple[str, ...], ids: list[str], field: str = "split") -> np.ndarray:
    """(S, P) 0/1 matrix: file s (one seed) × prompt ``ids``, from the rows whose ``field`` is in ``within``
    (the scenario's splits, or a user's probe groups with ``field="group"``).

    Raises:
        RapidunError: a file has no row for one of ``ids``.
    """
    within = (within,) if isinstance(within, str) else within
    rows = []
    for f in files:
        h = read_hits(f, field, within)
        missing = [i for i in ids if i not in h]
        if missing:
            raise RapidunError(f"{f}: no generation for prompt(s) {missing[:3]} of {within}; re-run the comparison")
        rows.append([h[i] for i in ids])
    return np.asarray(rows, dtype=np.float64)  # (S, P)


def paired_tests(
    files: dict[str, list[Path]],
    ref: str,
    n_boot: int,
    tested: dict[str, tuple[tuple[str, ...], list[str]]],
    field: str = "split",
) -> dict[str, Any]:
    """Every method of ``files`` paired with ``ref`` on the same prompts and seeds (:func:`rapidun.stats.compare_hits`).

    Args:
        files: method → its generation files, one per seed (a single file: one run, paired with every seed).
        ref: the reference method; no tests when it has no files.
        n_boot: bootstrap resamples.
        tested: metric → ``(values of field, prompt ids)`` it pools; metrics without prompts are left out.
        field: the row field ``tested`` selects on (``split`` or ``group``).

    Returns:
        ``{method: {"vs": ref, metric: compare_hits(...)}}`` for every method but ``ref``.
    """
    tests: dict[str, Any] = {}
    if ref not in files:
        return tests
    for name, fs in files.items():
        if name == ref:
            continue
        t: dict[str, Any] = {"vs": ref}
        for metric, (within, ids) in tested.items():
            if not ids:
                continue
            a, b = hit_matrix(files[ref], within, ids, field), hit_matrix(fs, within, ids, field)
            t[metric] = compare_hits(a, b, n_boot=n_boot, seed=0)
        tests[name] = t
    return tests
