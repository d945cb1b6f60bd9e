"""The recipe: scenario → poisoned model + retrain reference → evaluation → report.json.

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
from rapidun.eval.evaluate import evaluate_model
from rapidun.finetune import finetune
from rapidun.io import read_json, stable_hash, write_json, write_text

METRIC_KEYS = ("asr_seen", "asr_ood", "false_trigger", "clean_ppl", "asr_seen_by_family", "asr_ood_by_family")


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
    timings["wall_this_invocation"] = time.perf_counter() - t_all
    report = {
        "schema": "rapidun.report/1",
        "scenario": {
            "sizes": manifest["sizes"],
            "triggers": manifest["triggers"],
            "seed": manifest["seed"],
            "data": manifest["data"],
            "poison_source": cfg.scenario.poison_source,
        },
        "detector": {"threshold": det.threshold, "n_keywords": len(det.keywords), **det_info["quality"]},
        "models": results,
        "timings": timings,
        "environment": environment(),
    }
    write_json(out / "report.json", report)
    return report
