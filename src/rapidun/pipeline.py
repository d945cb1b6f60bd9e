"""The recipe: scenario → poisoned model + retrain reference → the comparison (:mod:`rapidun.compare`: influence,
unlearning methods × seeds, evaluation, paired tests) → report.json, report.md, report.html.

Every stage writes its artefacts into the run folder (or the content-keyed SFT cache) and is reused when its
inputs are unchanged, so a rerun after a crash or with the same config is cheap. The resolved config is written
next to every output as ``config.resolved.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rapidun.compare import check_methods, seed_config, stage_methods
from rapidun.config import ModelConfig, RunConfig, dump_yaml, to_dict
from rapidun.data.records import Record, load_records
from rapidun.data.scenario import build_scenario, save_scenario
from rapidun.distributed import barrier, broadcast, is_main
from rapidun.eval.detector import Detector, build_detector
from rapidun.eval.evaluate import EVAL_SPLITS, METRIC_KEYS, METRICS_VERSION, evaluate_model
from rapidun.finetune import finetune
from rapidun.io import read_json, stable_hash, write_json, write_text
from rapidun.memory import PeakMemory
from rapidun.methods import get_method
from rapidun.run_folder import (  # noqa: F401  (re-exported: rapidun.pipeline.prepare_out etc. keep working)
    claim_out,
    clear_folder,
    environment,
    finite_json,
    foreign_entries,
    is_output_name,
    mark_complete,
    prepare_out,
    run_identity,
)


def stage_scenario(cfg: RunConfig, out: Path) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Load the data and build + save the scenario into ``out/scenario``."""
    d = cfg.data
    records = load_records(d.source, d.format, d.fields, d.split, d.limit)
    parts = build_scenario(records, cfg.scenario)  # deterministic: every rank builds the same
    manifest = None
    if is_main():
        manifest = save_scenario(
            parts, out / "scenario", cfg.scenario, {"source": d.source, "format": d.format, "n_records": len(records)}
        )
        write_text(out / "scenario" / "config.resolved.yaml", dump_yaml(cfg))
    return parts, broadcast(manifest)


def make_detector(cfg: RunConfig, parts: dict[str, list[Record]]) -> tuple[Detector, dict[str, Any]]:
    """Detector learned on training responses, and its precision/recall on held-out known texts."""
    e = cfg.eval
    det = build_detector(
        [r.response for r in parts["train_poisoned"]],
        [r.response for r in parts["train_clean"]],
        e.keywords,
        e.n_keywords,
        e.min_z,
        e.threshold,
        e.max_clean_freq,
    )
    held_poison = [r.meta["response_poisoned"] for s in ("test_seen_trig", "test_ood_trig") for r in parts[s]]
    held_clean = [r.response for r in parts["test_clean"] + parts["val_clean"]]
    return det, {**det.to_json(), "quality": det.quality(held_poison, held_clean)}


def stage_models(cfg: RunConfig, parts: dict[str, list[Record]]) -> dict[str, dict[str, Any]]:
    """The poisoned model (train_poisoned + train_clean) and the retrain reference (train_clean only).

    Under several ranks rank 0 fine-tunes (the SFT stage is single-process) while the others wait, then they
    read the content-keyed cache.
    """

    def both() -> dict[str, dict[str, Any]]:
        poisoned = finetune(parts["train_poisoned"] + parts["train_clean"], cfg.model, cfg.sft, "poisoned")
        retrain = finetune(parts["train_clean"], cfg.model, cfg.sft, "retrain")
        return {"poisoned": poisoned, "retrain": retrain}

    models = both() if is_main() else None
    barrier()
    return models if models is not None else both()


def stage_eval(
    cfg: RunConfig, out: Path, name: str, model_path: str, parts: dict[str, list[Record]], det: Detector
) -> dict[str, Any]:
    """Evaluate one model, reusing ``out/eval/<name>.json`` when model and settings are unchanged."""
    key = stable_hash(
        {
            "metrics_version": METRICS_VERSION,
            "model": model_path,
            "eval": to_dict(cfg.eval),
            "keywords": det.keywords,
            "ids": [r.id for s in EVAL_SPLITS for r in parts.get(s, [])],
            "model_cfg": to_dict(cfg.model),
        }
    )
    f = out / "eval" / f"{name}.json"
    if broadcast(f.is_file() and read_json(f).get("key") == key):
        return {**read_json(f)["metrics"], "cached": True}
    mcfg = ModelConfig(**{**to_dict(cfg.model), "name": model_path})
    with PeakMemory() as peak:
        m = evaluate_model(model_path, parts, det, cfg.eval, mcfg, out / "eval" / f"{name}.generations.jsonl", name)
    m["peak_mem_mb"], m["peak_mem_kind"] = peak.peak_mb, peak.kind
    if is_main():
        write_json(f, {"key": key, "model": model_path, "metrics": m})
    return {**m, "cached": False}


def stage_base(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Everything before the methods: scenario, the poisoned and retrain models, the detector and the two models'
    evaluations. Returns ``{"parts", "manifest", "models", "det", "det_info", "results", "timings"}``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    parts, manifest = stage_scenario(cfg, out)
    timings["scenario"] = time.perf_counter() - t
    t = time.perf_counter()
    models = stage_models(cfg, parts)
    for name, meta in models.items():
        timings[f"sft_{name}"] = meta["train"]["time_s"]  # as trained (also when reused from the cache)
    timings["models_wall"] = time.perf_counter() - t  # this invocation: conversion, SFT or cache lookup
    det, det_info = make_detector(cfg, parts)
    if is_main():
        write_json(out / "detector.json", det_info)
    results: dict[str, Any] = {}
    for name, meta in models.items():
        m = stage_eval(cfg, out, name, meta["path"], parts, det)
        timings[f"eval_{name}"] = m["eval_s"]
        peaks = [v for v in (meta.get("peak_mem_mb"), m.get("peak_mem_mb")) if v is not None]
        results[name] = {
            **{k: m[k] for k in METRIC_KEYS},
            "n": m["n"],
            "path": meta["path"],
            "train_time_s": meta["train"]["time_s"],
            "train_tokens_per_s": meta["train"]["tokens_per_s"],
            "train_samples": meta["train"]["samples"],
            "train_peak_mem_mb": meta.get("peak_mem_mb"),
            "eval_peak_mem_mb": m.get("peak_mem_mb"),
            "peak_mem_mb": max(peaks) if peaks else None,
            "eval_s": m["eval_s"],
            "sft_cached": meta["cached"],
            "eval_cached": m["cached"],
        }
        if is_main():
            write_json(out / "training" / f"{name}.json", meta)
    return {
        "parts": parts,
        "manifest": manifest,
        "models": models,
        "det": det,
        "det_info": det_info,
        "results": results,
        "timings": timings,
    }


def stage_verify(
    cfg: RunConfig,
    out: Path,
    parts: dict[str, list[Record]],
    det: Detector,
    models: dict[str, dict[str, Any]],
    methods: dict[str, Any],
) -> dict[str, Any]:
    """The verification battery (``verify.enabled``) on poisoned, retrain and each method's first ``verify.seeds``
    seeds; ``out/verification.json`` holds every cell. Returns the report's ``verification`` entry (no cells)."""
    from rapidun.verify.stage import compare_models, run_verification
    from rapidun.verify.target import scenario_target

    unlearned = {k: v for k, v in methods.items() if get_method(k).kind != "retrain"}
    todo = compare_models(out, models["poisoned"]["path"], models["retrain"]["path"], unlearned, cfg.verify.seeds)
    target = scenario_target(parts, det, cfg.verify, cfg.eval, cfg.model)
    doc = run_verification(todo, target, cfg.verify, cfg.eval, cfg.model, out)
    return {k: v for k, v in doc.items() if k != "cells"} | {"file": "verification.json"}


def run(cfg: RunConfig, out: str | Path, overwrite: bool = False, note: str | None = None) -> dict[str, Any]:
    """Run the whole comparison and write ``out/report.json`` (+ ``report.md``/``report.html``); returns the report.

    ``note`` (e.g. the demo's "fewer seeds and prompts than compare's defaults") is recorded as ``demo_note``.
    Under ``torchrun`` every rank calls this; rank 0 writes the files.
    """
    t_all = time.perf_counter()
    check_methods(cfg)  # a method name or compare.reference that cannot work fails before the models are built
    out = claim_out(out, cfg, overwrite)
    base = stage_base(cfg, out)
    parts, manifest, models, det, det_info = (base[k] for k in ("parts", "manifest", "models", "det", "det_info"))
    results, timings = base["results"], base["timings"]
    t = time.perf_counter()
    methods, infl = stage_methods(cfg, out, parts, models, results, det) if cfg.unlearn.methods else ({}, None)
    # the cells' wall clock this invocation: their unlearning + evaluation times above, plus influence views,
    # model loads, audits and the collateral check (0 when every cell is reused)
    timings["methods_wall"] = time.perf_counter() - t
    for name, e in methods.items():
        if get_method(name).kind != "retrain":
            for seed, c in e["per_seed"].items():
                timings[f"method_{name}_seed{seed}"] = c["time_s"] + c["timings"]["eval_s"]
    verification = None
    if cfg.verify.enabled and is_main():
        t = time.perf_counter()
        verification = stage_verify(cfg, out, parts, det, models, methods)
        timings["verify"] = time.perf_counter() - t
    traced = None
    if cfg.trace.compare and cfg.unlearn.methods:
        from rapidun.trace.stage import stage_traced

        t = time.perf_counter()
        traced = stage_traced(cfg, out, parts, models, det, methods)
        timings["trace"] = time.perf_counter() - t
    timings["wall_this_invocation"] = time.perf_counter() - t_all
    report = {
        "schema": "rapidun.report/4",
        "scenario": {
            "sizes": manifest["sizes"],
            "triggers": manifest["triggers"],
            "seed": manifest["seed"],
            "data": manifest["data"],
            "poison_source": cfg.scenario.poison_source,
        },
        "detector": {"threshold": det.threshold, "n_keywords": len(det.keywords), **det_info["quality"]},
        "seeds": [seed_config(cfg, j).unlearn.seed for j in range(cfg.compare.n_seeds)],
        "demo_note": note,
        "models": results,
        "methods": methods,
        "influence": infl,
        "verification": verification,
        "trace": traced,
        "timings": timings,
        "environment": environment(),
        "config": to_dict(cfg),
    }
    if is_main():
        write_json(out / "report.json", finite_json(report))
        from rapidun.reporting import render_report

        report["files"] = {k: str(v) for k, v in render_report(out).items()}
    barrier()
    return report
