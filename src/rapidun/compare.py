"""The comparison: every method of ``unlearn.methods`` × ``compare.n_seeds`` seeds on one poisoned model.

The scenario's evaluator on the engine of :mod:`rapidun.cells` (which ``rapidun compare`` on a user's own files,
:mod:`rapidun.user_compare`, shares): seed j uses ``unlearn.seed + j`` and ``influence.seed + j``; the influence
views are computed once per seed and shared by its influence methods. Each (method, seed) cell is
``RUN/seeds/<seed>/methods/<name>/``, evaluated on the scenario's splits and reused when finished (:func:`run_cell`),
so a killed comparison resumes. Per method: mean ± std over seeds (:func:`aggregate`) and paired tests against
``compare.reference`` on the test splits (:func:`paired_tests`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rapidun import cells as engine
from rapidun.cells import hit_matrix as hit_matrix  # re-exported: the scenario's callers and tests use it here
from rapidun.cells import method_cell, over_seeds, seed_config
from rapidun.cells import views_provider as views_provider
from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.diagnostics import seed_stability
from rapidun.distributed import barrier
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector
from rapidun.eval.evaluate import METRIC_KEYS, METRICS_VERSION, evaluate_loaded
from rapidun.io import read_json, stable_hash
from rapidun.methods import get_method, views_kind
from rapidun.models import fingerprint

# The per-seed scalars a method's mean ± std is reported for: the evaluation's scalars and the cell's cost.
SCALARS = (
    *(k for k in METRIC_KEYS if not k.endswith("_by_family")),
    "time_s",
    "peak_mem_mb",
    "speedup_vs_retrain",
)
# Clean corpus sizes of the paper's setups, for the projected retraining time (SPEC §1; Alpaca: 52,002 records).
PAPER_CORPORA = {"dolly": 7192, "alpaca": 52002}


def retrain_projection(retrain_train: dict[str, Any], epochs: int = 2) -> dict[str, Any]:
    """Projected retraining time on the paper's clean corpora — a projection, not a measurement.

    ``time = N · tokens_per_sample · epochs / tokens_per_s`` with the measured retrain throughput and the mean
    tokens per sample of the run's own retrain corpus (samples are cut at ``model.max_length``, so longer real
    samples would make retraining slower than projected: the projection is conservative).
    """
    per_sample = retrain_train["tokens"] / max(1, retrain_train["samples"] * retrain_train["epochs"])
    tps = retrain_train["tokens_per_s"]
    return {
        "projected": True,
        "basis": "measured retrain tokens/s x (corpus samples x mean tokens per sample of this run's retrain "
        "corpus x epochs)",
        "retrain_tokens_per_s": tps,
        "tokens_per_sample": per_sample,
        "epochs": epochs,
        "retrain_s": {k: n * per_sample * epochs / tps for k, n in PAPER_CORPORA.items()},
        "corpus_samples": dict(PAPER_CORPORA),
    }


def method_key(cfg: RunConfig, name: str, poisoned_path: str, parts: dict[str, list[Record]], det: Detector) -> str:
    """Everything a (method, seed) cell's result depends on; a change re-runs the cell."""
    m = get_method(name)
    infl = bool(views_kind(name, cfg.unlearn.distill_teacher)) or bool(m.expand)  # cover traces with influence
    key = {
        "metrics_version": METRICS_VERSION,
        "method": name,
        "unlearn": {k: v for k, v in to_dict(cfg.unlearn).items() if k != "methods"},
        "weighting": to_dict(cfg.weighting) if infl else None,
        "influence": to_dict(cfg.influence) if infl else None,
        "model": fingerprint(poisoned_path),
        "model_cfg": to_dict(cfg.model),
        "eval": to_dict(cfg.eval),
        "keywords": det.keywords,
        "parts": stable_hash({k: [r.to_json() for r in v] for k, v in parts.items()}),
    }
    if m.expand:  # cover's pack depends on the tracing settings (other methods' keys stay as they were)
        key["trace"] = to_dict(cfg.trace)
    return stable_hash(key)


def _cell_entry(metrics: dict[str, Any], res: dict[str, Any], folder: str, cached: bool) -> dict[str, Any]:
    return {k: metrics[k] for k in METRIC_KEYS} | {
        "dir": folder,
        "time_s": res["timings"]["time_s"],
        "timings": res["timings"] | {"eval_s": metrics["eval_s"]},
        "peak_mem_mb": metrics.get("peak_mem_mb"),
        "complete": res.get("complete", True),
        "weights": res["weights"],
        "audit_means": res["audit_means"],
        "diagnostics": res.get("diagnostics"),
        "weight_vectors": res.get("weight_vectors"),
        "cached": cached,
    }


def run_cell(
    cfg: RunConfig,
    out: Path,
    name: str,
    seed: int,
    parts: dict[str, list[Record]],
    poisoned: str,
    det: Detector,
    views_of: Any,
    before: dict[str, Any],
    label: str | None = None,
) -> dict[str, Any]:
    """One (method, seed) cell: unlearning + evaluation into ``out/seeds/<seed>/methods/<label>``
    (:func:`rapidun.cells.method_cell`, evaluated on the scenario's splits).

    A finished cell (``metrics.json`` with the same content key) is reused, so a rerun after a kill skips it.
    ``views_of(kind)`` returns the seed's influence views of that kind (computed on first use); ``before`` caches
    the poisoned model's per-sample losses between cells. ``label`` (default ``name``) names the cell, so one
    method can run under several settings side by side (``rapidun study``).
    """
    label = label or name
    rel = f"seeds/{seed}/methods/{label}"
    key = method_key(cfg, name, poisoned, parts, det) + ("" if label == name else f"-{stable_hash(label, 8)}")
    gen = out / "seeds" / str(seed) / "eval" / f"{label}.generations.jsonl"

    def evaluate(merged: Any, tok: Any) -> dict[str, Any]:
        return evaluate_loaded(merged, tok, parts, det, cfg.eval, cfg.model, gen, label)

    metrics, res, cached = method_cell(name, cfg, parts, poisoned, out, rel, gen, key, views_of, before, evaluate)
    return _cell_entry(metrics, res, rel, cached)


# metric -> the split(s) whose prompts it pools; val_* are the validation twins (selection), the rest test.
TESTED = {
    "asr_seen": ("test_seen_trig",),
    "asr_ood": ("test_ood_trig",),
    "asr_trig": ("test_seen_trig", "test_ood_trig"),
    "false_trigger": ("test_clean",),
    "val_asr_seen": ("val_seen_trig",),
    "val_asr_ood": ("val_ood_trig",),
    "val_asr_trig": ("val_seen_trig", "val_ood_trig"),
}


def paired_tests(
    parts: dict[str, list[Record]],
    files: dict[str, list[Path]],
    ref: str,
    n_boot: int,
    metrics: tuple[str, ...] = tuple(TESTED),
) -> dict[str, Any]:
    """Paired comparison of every method with ``ref`` on the same prompts and seeds (:func:`rapidun.cells.paired_tests`
    on the prompts of each metric's :data:`TESTED` splits)."""
    tested = {m: (TESTED[m], [r.id for s in TESTED[m] for r in parts.get(s, [])]) for m in metrics}
    return engine.paired_tests(files, ref, n_boot, tested, field="split")


def aggregate(entry_by_seed: dict[str, dict[str, Any]], summary: str) -> dict[str, Any]:
    """One method over seeds: per-seed values, means and sample stds (:func:`rapidun.cells.over_seeds`)."""
    es = list(entry_by_seed.values())
    stats = {k: over_seeds(es, k) for k in SCALARS}
    by_family = {
        k: {f: over_seeds(es, f"{k}_by_family", f) for f in sorted({f for c in es for f in c[f"{k}_by_family"]})}
        for k in ("asr_seen", "asr_ood")
    }
    tkeys = sorted(
        {k for c in es for k, v in c.get("timings", {}).items() if k.endswith("_s") and isinstance(v, (int, float))}
    )
    diagnostics = mean_diagnostics([c.get("diagnostics") for c in es])
    vecs = [c.pop("weight_vectors", None) for c in es]
    if diagnostics is not None and all(v is not None for v in vecs) and len(vecs) > 1:
        diagnostics["weight_stability_spearman"] = {
            g: seed_stability([v[g] for v in vecs])
            for g in ("forget", "retain")  # type: ignore[index]
        }
    scale_keys = sorted({k for c in es for k in (c.get("speedup_vs_retrain_at_scale") or {})})
    at_scale = {k: over_seeds(es, "speedup_vs_retrain_at_scale", k)["mean"] for k in scale_keys}
    return {
        "summary": summary,
        "n_seeds": len(es),
        "seeds": list(entry_by_seed),
        "mean": {k: v["mean"] for k, v in stats.items()},
        "std": {k: v["std"] for k, v in stats.items()},
        "by_family": by_family,
        "timings_mean": {k: over_seeds(es, "timings", k)["mean"] for k in tkeys},
        "speedup_vs_retrain_at_scale": {k: v if v is not None and v > 0 else None for k, v in at_scale.items()},
        "complete": all(c.get("complete", True) for c in es),
        "cached": all(c.get("cached", False) for c in es),
        "diagnostics": diagnostics,
        "per_seed": entry_by_seed,
    }


def mean_diagnostics(per_seed: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Mean over seeds of every numeric diagnostic (one level of nesting, e.g. per family); None when absent."""
    ds = [d for d in per_seed if d]
    if not ds:
        return None

    def mean_of(vals: list[Any]) -> Any:
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums:
            return float(np.mean(nums))
        subs = [v for v in vals if isinstance(v, dict)]
        if subs:
            return {k: mean_of([s.get(k) for s in subs]) for k in sorted({k for s in subs for k in s})}
        return None

    return {k: mean_of([d.get(k) for d in ds]) for k in dict.fromkeys(k for d in ds for k in d)}


def check_methods(cfg: RunConfig) -> list[str]:
    """The comparison's methods (``unlearn.methods``, duplicates dropped), checked before any work: every name is
    registered, ``compare.n_seeds``/``n_boot`` are positive and ``compare.reference`` is one of the methods.

    Raises:
        RapidunError: naming the setting and what to change.
    """
    names = list(dict.fromkeys(cfg.unlearn.methods))
    for n in names:
        get_method(n)
    c = cfg.compare
    if c.n_seeds < 1 or c.n_boot < 1:
        raise RapidunError(f"compare.n_seeds and compare.n_boot must be >= 1, got {c.n_seeds} and {c.n_boot}")
    if names and c.reference not in names:
        raise RapidunError(
            f"compare.reference={c.reference!r} is not in unlearn.methods {names}: add it, or set compare.reference "
            "to one of them (every other method is paired against it)"
        )
    return names


def stage_methods(
    cfg: RunConfig,
    out: Path,
    parts: dict[str, list[Record]],
    models: dict[str, dict[str, Any]],
    results: dict[str, Any],
    det: Detector,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Every method of ``unlearn.methods`` × ``compare.n_seeds`` seeds, then the aggregates and paired tests.

    Influence is computed once per seed (into ``out/seeds/<seed>/influence``) and shared by the seed's influence
    methods; each (method, seed) cell is reused when unchanged (:func:`run_cell`). ``retrain`` is the one SFT
    reference model. Returns ``(methods, influence)``: the report's ``methods`` and ``influence`` entries.
    """
    names = check_methods(cfg)
    poisoned = models["poisoned"]["path"]
    retrain_s = models["retrain"]["train"]["time_s"]
    proj = retrain_projection(models["retrain"]["train"], cfg.sft.epochs)
    before: dict[str, Any] = {}  # the poisoned model's per-sample losses, shared by every cell
    cells: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
    files: dict[str, list[Path]] = {n: [] for n in names}
    infl: dict[str, Any] = {}
    for j in range(cfg.compare.n_seeds):
        scfg = seed_config(cfg, j)
        seed = scfg.unlearn.seed
        folder = out / "seeds" / str(seed) / "influence"
        box: dict[str, Any] = {}
        views_of = views_provider(poisoned, parts, scfg, folder, box)

        for name in names:
            m = get_method(name)
            if m.kind == "retrain":
                continue
            cells[name][str(seed)] = run_cell(scfg, out, name, seed, parts, poisoned, det, views_of, before)
            files[name].append(out / "seeds" / str(seed) / "eval" / f"{name}.generations.jsonl")
        vj = folder / "views.json"
        if "sketch" in box:
            infl[str(seed)] = {
                "dir": f"seeds/{seed}/influence",
                "cached": box["sketch"]["cached"],
                "peak_mem_mb": box["peak_mem_mb"],
                **box["sketch"]["stats"],
            }
        elif vj.is_file():  # every influence cell reused: the stored stats
            pm = folder / "peak_mem.json"
            peak_mb = read_json(pm)["peak_mem_mb"] if pm.is_file() else None
            infl[str(seed)] = {
                "dir": f"seeds/{seed}/influence",
                "cached": True,
                "peak_mem_mb": peak_mb,
                **read_json(vj)["stats"],
            }
    methods: dict[str, Any] = {}
    for name in names:
        m = get_method(name)
        if m.kind == "retrain":
            r = results["retrain"]
            entry = {k: r[k] for k in METRIC_KEYS} | {
                "dir": None,
                "time_s": r["train_time_s"],
                "timings": {"training_s": r["train_time_s"], "eval_s": r["eval_s"]},
                "peak_mem_mb": r.get("peak_mem_mb"),
                "complete": True,
                "cached": True,
            }
            by_seed = {"reference": entry}
            files[name] = [out / "eval" / "retrain.generations.jsonl"]
        else:
            by_seed = cells[name]
        for e in by_seed.values():
            e["speedup_vs_retrain"] = retrain_s / e["time_s"] if e["time_s"] > 0 else None
            e["speedup_vs_retrain_at_scale"] = {  # projected retraining time / measured time (None for retrain)
                k: v / e["time_s"] if e["time_s"] > 0 and m.kind != "retrain" else None
                for k, v in proj["retrain_s"].items()
            }
        methods[name] = aggregate(by_seed, m.summary)
    barrier()  # rank 0 has written every generation file
    tests = paired_tests(parts, files, cfg.compare.reference, cfg.compare.n_boot)
    for name, e in methods.items():
        e["tests"] = tests.get(name)
    return methods, {"per_seed": infl, "retrain_projection": proj}
