"""The comparison: every method of ``unlearn.methods`` × ``compare.n_seeds`` seeds on one poisoned model.

Seed j uses ``unlearn.seed + j`` and ``influence.seed + j``; the influence views are computed once per seed and
shared by its influence methods. Each (method, seed) cell is ``RUN/seeds/<seed>/methods/<name>/`` and is reused
when finished (:func:`run_cell`), so a killed comparison resumes. Per method: mean ± std over seeds
(:func:`aggregate`) and paired tests against ``compare.reference`` (:func:`paired_tests`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.diagnostics import seed_stability
from rapidun.distributed import barrier, broadcast, is_main
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector
from rapidun.eval.evaluate import METRIC_KEYS, METRICS_VERSION, evaluate_loaded
from rapidun.io import fault_point, read_json, stable_hash, write_json
from rapidun.memory import PeakMemory
from rapidun.methods import get_method, views_kind
from rapidun.models import fingerprint
from rapidun.stats import compare_hits, mean_std
from rapidun.unlearn import unlearn
from rapidun.views import method_views

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


def seed_config(cfg: RunConfig, j: int) -> RunConfig:
    """The config of the comparison's seed ``j``: ``unlearn.seed + j`` and ``influence.seed + j``."""
    return dataclasses.replace(
        cfg,
        unlearn=dataclasses.replace(cfg.unlearn, seed=cfg.unlearn.seed + j),
        influence=dataclasses.replace(cfg.influence, seed=cfg.influence.seed + j),
    )


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
    """One (method, seed) cell: unlearning + evaluation into ``out/seeds/<seed>/methods/<label>``.

    A finished cell (``metrics.json`` with the same content key) is reused, so a rerun after a kill skips it.
    ``views_of(kind)`` returns the seed's influence views of that kind (computed on first use); ``before`` caches
    the poisoned model's per-sample losses between cells. ``label`` (default ``name``) names the cell, so one
    method can run under several settings side by side (``rapidun study``).
    """
    fault_point("compare:cell")
    m = get_method(name)
    label = label or name
    rel = f"seeds/{seed}/methods/{label}"
    key = method_key(cfg, name, poisoned, parts, det) + ("" if label == name else f"-{stable_hash(label, 8)}")
    f = out / rel / "metrics.json"
    gen = out / "seeds" / str(seed) / "eval" / f"{label}.generations.jsonl"
    hit = broadcast(f.is_file() and gen.is_file() and read_json(f).get("key") == key)
    if hit:
        saved = read_json(f)
        return _cell_entry(saved["metrics"], saved["result"], rel, True)
    kind = views_kind(name, cfg.unlearn.distill_teacher)
    views = views_of(kind) if kind else None
    with PeakMemory() as peak:
        merged, tok, res = unlearn(name, parts, poisoned, cfg, out / rel, views, before.get("losses"))
        if not m.expand:  # cover's losses are those of its own, grown packs: not the next cell's
            before["losses"] = res["audit_before"]
        metrics = evaluate_loaded(merged, tok, parts, det, cfg.eval, cfg.model, gen, label)
        del merged
    metrics["peak_mem_mb"], metrics["peak_mem_kind"] = peak.peak_mb, peak.kind
    if is_main():
        write_json(f, {"key": key, "result": res, "metrics": metrics})
        for w in res.get("warnings", []):  # e.g. the held-out utility check; also in the cell's result.json
            print(f"warning: {rel}: {w}", file=sys.stderr)
    return _cell_entry(metrics, res, rel, False)


def _hits(path: Path, split: str) -> dict[str, bool]:
    """``{prompt id: hit}`` of one split from a ``*.generations.jsonl`` file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: bool(r["hit"]) for r in rows if r["split"] == split}


def hit_matrix(files: list[Path], splits: str | tuple[str, ...], ids: list[str]) -> np.ndarray:
    """(S, P) 0/1 matrix: file s (one seed) × prompt ``ids`` of ``splits``, from the generation files."""
    splits = (splits,) if isinstance(splits, str) else splits
    rows = []
    for f in files:
        h: dict[str, bool] = {}
        for split in splits:
            h |= _hits(f, split)
        missing = [i for i in ids if i not in h]
        if missing:
            raise RapidunError(f"{f}: no generation for prompt(s) {missing[:3]} of {splits}; re-run the comparison")
        rows.append([h[i] for i in ids])
    return np.asarray(rows, dtype=np.float64)


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
    """Paired comparison of every method with ``ref`` on the same prompts and seeds (see :mod:`rapidun.stats`)."""
    tests: dict[str, Any] = {}
    if ref not in files:
        return tests
    for name, fs in files.items():
        if name == ref:
            continue
        t: dict[str, Any] = {"vs": ref}
        for metric in metrics:
            splits = TESTED[metric]
            ids = [r.id for s in splits for r in parts.get(s, [])]
            if not ids:
                continue
            a, b = hit_matrix(files[ref], splits, ids), hit_matrix(fs, splits, ids)
            t[metric] = compare_hits(a, b, n_boot=n_boot, seed=0)
        tests[name] = t
    return tests


def aggregate(entry_by_seed: dict[str, dict[str, Any]], summary: str) -> dict[str, Any]:
    """One method over seeds: per-seed values, means and sample stds (:func:`rapidun.stats.mean_std`)."""
    cells = list(entry_by_seed.values())
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for k in SCALARS:
        vals = [c[k] for c in cells if c.get(k) is not None]
        ms = mean_std(vals) if vals else {"mean": None, "std": None}
        mean[k], std[k] = ms["mean"], ms["std"]
    by_family: dict[str, Any] = {}
    for k in ("asr_seen", "asr_ood"):
        fams = sorted({f for c in cells for f in c[f"{k}_by_family"]})
        by_family[k] = {f: mean_std([c[f"{k}_by_family"][f] for c in cells if f in c[f"{k}_by_family"]]) for f in fams}
    tkeys = sorted(
        {k for c in cells for k, v in c.get("timings", {}).items() if k.endswith("_s") and isinstance(v, (int, float))}
    )
    timings_mean = {k: mean_std([c["timings"][k] for c in cells if k in c["timings"]])["mean"] for k in tkeys}
    diagnostics = mean_diagnostics([c.get("diagnostics") for c in cells])
    vecs = [c.pop("weight_vectors", None) for c in cells]
    if diagnostics is not None and all(v is not None for v in vecs) and len(vecs) > 1:
        diagnostics["weight_stability_spearman"] = {
            g: seed_stability([v[g] for v in vecs])
            for g in ("forget", "retain")  # type: ignore[index]
        }
    scale_keys = sorted({k for c in cells for k in (c.get("speedup_vs_retrain_at_scale") or {})})
    at_scale = {
        k: mean_std([c["speedup_vs_retrain_at_scale"][k] for c in cells if c["speedup_vs_retrain_at_scale"].get(k)])[
            "mean"
        ]
        for k in scale_keys
    }
    return {
        "summary": summary,
        "n_seeds": len(cells),
        "seeds": list(entry_by_seed),
        "mean": mean,
        "std": std,
        "by_family": by_family,
        "timings_mean": timings_mean,
        "speedup_vs_retrain_at_scale": {k: v if v is not None and v > 0 else None for k, v in at_scale.items()},
        "complete": all(c.get("complete", True) for c in cells),
        "cached": all(c.get("cached", False) for c in cells),
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


def views_provider(
    poisoned: str, parts: dict[str, list[Record]], scfg: RunConfig, folder: Path, box: dict[str, Any]
) -> Any:
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
