"""The recipe: scenario → poisoned model + retrain reference → influence → unlearning methods → evaluation →
report.json.

Every stage writes its artefacts into the run folder (or the content-keyed SFT cache) and is reused when its
inputs are unchanged, so a rerun after a crash or with the same config is cheap. The resolved config is written
next to every output as ``config.resolved.yaml``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from rapidun import __version__
from rapidun.config import ModelConfig, RunConfig, dump_yaml, to_dict
from rapidun.data.records import Record, load_records
from rapidun.data.scenario import build_scenario, save_scenario
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector, build_detector
from rapidun.eval.evaluate import evaluate_loaded, evaluate_model
from rapidun.finetune import finetune
from rapidun.io import read_json, stable_hash, write_json, write_text
from rapidun.methods import get_method
from rapidun.models import fingerprint
from rapidun.unlearn import influence_views, unlearn

METRIC_KEYS = ("asr_seen", "asr_ood", "false_trigger", "clean_ppl", "asr_seen_by_family", "asr_ood_by_family")
# Clean corpus sizes of the paper's setups, for the projected retraining time (SPEC §1; Alpaca: 52,002 records).
PAPER_CORPORA = {"dolly": 7192, "alpaca": 52002}


def prepare_out(out: str | Path, cfg: RunConfig, overwrite: bool) -> Path:
    """Create/claim the run folder. A folder holding a different run is refused unless ``overwrite``."""
    out = Path(out)
    marker = out / "run.json"
    h = stable_hash(to_dict(cfg))
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            if not overwrite:
                raise RapidunError(
                    f"output folder {out} is not empty and holds no rapidun run; choose another "
                    "--out or pass --overwrite"
                )
        elif read_json(marker).get("config_hash") != h and not overwrite:
            raise RapidunError(
                f"output folder {out} holds a run with a different config; choose another --out, "
                "or pass --overwrite to replace its results"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"config_hash": h, "rapidun": __version__})
    write_text(out / "config.resolved.yaml", dump_yaml(cfg))
    return out


def stage_scenario(cfg: RunConfig, out: Path) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Load the data and build + save the scenario into ``out/scenario``."""
    d = cfg.data
    records = load_records(d.source, d.format, d.fields, d.split, d.limit)
    parts = build_scenario(records, cfg.scenario)
    manifest = save_scenario(
        parts, out / "scenario", cfg.scenario, {"source": d.source, "format": d.format, "n_records": len(records)}
    )
    write_text(out / "scenario" / "config.resolved.yaml", dump_yaml(cfg))
    return parts, manifest


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
    """The poisoned model (train_poisoned + train_clean) and the retrain reference (train_clean only)."""
    poisoned = finetune(parts["train_poisoned"] + parts["train_clean"], cfg.model, cfg.sft, "poisoned")
    retrain = finetune(parts["train_clean"], cfg.model, cfg.sft, "retrain")
    return {"poisoned": poisoned, "retrain": retrain}


def stage_eval(
    cfg: RunConfig, out: Path, name: str, model_path: str, parts: dict[str, list[Record]], det: Detector
) -> dict[str, Any]:
    """Evaluate one model, reusing ``out/eval/<name>.json`` when model and settings are unchanged."""
    key = stable_hash(
        {
            "model": model_path,
            "eval": to_dict(cfg.eval),
            "keywords": det.keywords,
            "ids": [r.id for s in ("test_seen_trig", "test_ood_trig", "test_clean") for r in parts[s]],
            "model_cfg": to_dict(cfg.model),
        }
    )
    f = out / "eval" / f"{name}.json"
    if f.is_file() and read_json(f).get("key") == key:
        return {**read_json(f)["metrics"], "cached": True}
    mcfg = ModelConfig(**{**to_dict(cfg.model), "name": model_path})
    m = evaluate_model(model_path, parts, det, cfg.eval, mcfg, out / "eval" / f"{name}.generations.jsonl", name)
    write_json(f, {"key": key, "model": model_path, "metrics": m})
    return {**m, "cached": False}


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
    """Everything a method's result depends on; a change re-runs the method."""
    m = get_method(name)
    return stable_hash(
        {
            "method": name,
            "unlearn": {k: v for k, v in to_dict(cfg.unlearn).items() if k != "methods"},
            "weighting": to_dict(cfg.weighting) if m.needs_influence else None,
            "influence": to_dict(cfg.influence) if m.needs_influence else None,
            "model": fingerprint(poisoned_path),
            "model_cfg": to_dict(cfg.model),
            "eval": to_dict(cfg.eval),
            "keywords": det.keywords,
            "parts": stable_hash({k: [r.to_json() for r in v] for k, v in parts.items()}),
        }
    )


def stage_methods(
    cfg: RunConfig,
    out: Path,
    parts: dict[str, list[Record]],
    models: dict[str, dict[str, Any]],
    results: dict[str, Any],
    det: Detector,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run and evaluate every method of ``unlearn.methods``, reusing ``out/methods/<name>`` when unchanged.

    Returns ``(methods, influence_stats)``: the report's ``methods`` entries and the influence stage statistics
    (None when no listed method needs influence).
    """
    names = list(dict.fromkeys(cfg.unlearn.methods))
    for n in names:
        get_method(n)  # unknown names fail before any work
    poisoned = models["poisoned"]["path"]
    retrain_s = models["retrain"]["train"]["time_s"]
    proj = retrain_projection(models["retrain"]["train"], cfg.sft.epochs)
    views = None
    views_info = None
    before = None  # the poisoned model's per-sample losses, shared by every method
    methods: dict[str, Any] = {}
    for name in names:
        m = get_method(name)
        if m.kind == "retrain":
            r = results["retrain"]
            entry = {k: r[k] for k in METRIC_KEYS} | {"time_s": r["train_time_s"], "timings": {}, "cached": True}
        else:
            key = method_key(cfg, name, poisoned, parts, det)
            f = out / "methods" / name / "metrics.json"
            if f.is_file() and read_json(f).get("key") == key:
                saved = read_json(f)
                res, metrics, cached = saved["result"], saved["metrics"], True
            else:
                if m.needs_influence and views is None:
                    views = influence_views(poisoned, parts["forget"], parts["retain"], cfg, out / "influence")
                    views_info = {"cached": views["cached"], **views["stats"]}
                merged, tok, res = unlearn(name, parts, poisoned, cfg, out / "methods" / name, views, before)
                before = res["audit_before"]
                metrics = evaluate_loaded(
                    merged, tok, parts, det, cfg.eval, cfg.model, out / "eval" / f"{name}.generations.jsonl", name
                )
                del merged
                write_json(f, {"key": key, "result": res, "metrics": metrics})
                cached = False
            entry = {k: metrics[k] for k in METRIC_KEYS} | {
                "time_s": res["timings"]["time_s"],
                "timings": res["timings"] | {"eval_s": metrics["eval_s"]},
                "complete": res.get("complete", True),
                "weights": res["weights"],
                "audit_means": res["audit_means"],
                "cached": cached,
            }
            if m.needs_influence and views_info is None:  # every influence method reused: the stored stats
                vj = out / "influence" / "views.json"
                stored = read_json(vj)["stats"] if vj.is_file() else {"total_s": res["timings"]["influence_s"]}
                views_info = {**stored, "cached": True}
        entry["speedup_vs_retrain"] = retrain_s / entry["time_s"] if entry["time_s"] > 0 else None
        entry["speedup_vs_retrain_at_scale"] = {  # projected retraining time / measured time (None for retrain)
            k: v / entry["time_s"] if entry["time_s"] > 0 and m.kind != "retrain" else None
            for k, v in proj["retrain_s"].items()
        }
        methods[name] = entry
    return methods, (views_info | {"retrain_projection": proj}) if views_info else {"retrain_projection": proj}


def environment() -> dict[str, Any]:
    """Versions and device, recorded in the report."""
    import peft
    import transformers

    return {
        "rapidun": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def run(cfg: RunConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole pipeline and write ``out/report.json``; returns the report."""
    t_all = time.perf_counter()
    out = prepare_out(out, cfg, overwrite)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    parts, manifest = stage_scenario(cfg, out)
    timings["scenario"] = time.perf_counter() - t
    models = stage_models(cfg, parts)
    for name, meta in models.items():
        timings[f"sft_{name}"] = meta["train"]["time_s"]
    det, det_info = make_detector(cfg, parts)
    write_json(out / "detector.json", det_info)
    results: dict[str, Any] = {}
    for name, meta in models.items():
        m = stage_eval(cfg, out, name, meta["path"], parts, det)
        timings[f"eval_{name}"] = m["eval_s"]
        results[name] = {
            **{k: m[k] for k in METRIC_KEYS},
            "n": m["n"],
            "path": meta["path"],
            "train_time_s": meta["train"]["time_s"],
            "train_tokens_per_s": meta["train"]["tokens_per_s"],
            "train_samples": meta["train"]["samples"],
            "sft_cached": meta["cached"],
            "eval_cached": m["cached"],
        }
        write_json(out / "training" / f"{name}.json", meta)
    methods, infl = stage_methods(cfg, out, parts, models, results, det) if cfg.unlearn.methods else ({}, None)
    for name, e in methods.items():
        if get_method(name).kind != "retrain":
            timings[f"method_{name}"] = e["time_s"]
    timings["wall_this_invocation"] = time.perf_counter() - t_all
    report = {
        "schema": "rapidun.report/2",
        "scenario": {
            "sizes": manifest["sizes"],
            "triggers": manifest["triggers"],
            "seed": manifest["seed"],
            "data": manifest["data"],
            "poison_source": cfg.scenario.poison_source,
        },
        "detector": {"threshold": det.threshold, "n_keywords": len(det.keywords), **det_info["quality"]},
        "models": results,
        "methods": methods,
        "influence": infl,
        "timings": timings,
        "environment": environment(),
    }
    write_json(out / "report.json", report)
    return report
