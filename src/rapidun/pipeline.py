"""The recipe: scenario → poisoned model + retrain reference → the comparison (:mod:`rapidun.compare`: influence,
unlearning methods × seeds, evaluation, paired tests) → report.json, report.md, report.html.

Every stage writes its artefacts into the run folder (or the content-keyed SFT cache) and is reused when its
inputs are unchanged, so a rerun after a crash or with the same config is cheap. The resolved config is written
next to every output as ``config.resolved.yaml``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rapidun import __version__
from rapidun.compare import check_methods, seed_config, stage_methods
from rapidun.config import ModelConfig, RunConfig, dump_yaml, to_dict
from rapidun.data.records import Record, load_records
from rapidun.data.scenario import build_scenario, save_scenario
from rapidun.distributed import barrier, broadcast, is_main, rank_world
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector, build_detector
from rapidun.eval.evaluate import EVAL_SPLITS, METRIC_KEYS, METRICS_VERSION, evaluate_model
from rapidun.finetune import finetune
from rapidun.io import is_atomic_temp, read_json, stable_hash, write_json, write_text
from rapidun.memory import PeakMemory
from rapidun.methods import get_method


def run_identity(cfg: RunConfig) -> str:
    """What makes a run folder "the same run": the config without ``compare.*``, ``verify.*``, ``trace.*`` and
    ``unlearn.methods``, so more seeds, methods or checks extend a run (finished cells are reused; each cell has
    its own content key)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("compare", "verify", "trace")}
    d["unlearn"] = {k: v for k, v in d["unlearn"].items() if k != "methods"}
    return stable_hash(d)


def prepare_out(
    out: str | Path, cfg: RunConfig, overwrite: bool, kind: str = "run", inputs: dict[str, Any] | None = None
) -> Path:
    """Create/claim the output folder: ``run.json`` says what it holds (``kind``, config and input identity).

    A folder holding a different run (another kind, config or inputs) is refused unless ``overwrite``; with
    ``overwrite`` everything the replaced run wrote is removed first, so no stale file (an old ``merged/``, an old
    ``eval/``) survives beside the new ones. A non-empty folder that holds no rapidun run is never deleted, not even
    with ``overwrite``. The same run is resumed (its finished parts are reused). The marker's ``complete`` stays
    false until :func:`mark_complete` at the command's very end.

    ``compare.*`` and ``unlearn.methods`` are not part of a pipeline run's identity (:func:`run_identity`): a rerun
    with more seeds or methods extends the same run (finished cells are reused).
    Single-process (call it on rank 0; :func:`claim_out` broadcasts its outcome).

    Args:
        out: The output folder.
        cfg: The resolved config.
        overwrite: Replace a different run's folder.
        kind: What the command writes: ``run`` (scenario/poison/compare/demo, which extend one another), or
            ``unlearn``, ``eval``, ``influence``, ``compare-user``, ...
        inputs: What else identifies the output (input paths and their content fingerprints, the method).
    """
    out = Path(out)
    marker = out / "run.json"
    base = run_identity(cfg)
    h = base if kind == "run" and not inputs else stable_hash([base, kind, inputs or {}])
    legacy = (
        stable_hash({k: v for k, v in to_dict(cfg).items() if k not in ("compare", "verify", "trace")}),
        stable_hash({k: v for k, v in to_dict(cfg).items() if k not in ("verify", "trace")}),
    )
    if out.exists() and not out.is_dir():
        raise RapidunError(f"--out {out} is a file; give a folder")
    if out.exists() and any(not is_atomic_temp(p) for p in out.iterdir()):  # a killed first write leaves a temp
        if not marker.is_file():
            raise RapidunError(
                f"output folder {out} is not empty and holds no rapidun run; rapidun never deletes files it did not "
                "write (not even with --overwrite): choose another --out or empty it"
            )
        try:
            old = read_json(marker)
        except (OSError, ValueError):
            old = {}
        old_kind = old.get("kind", "run")
        same = old_kind == kind and old.get("config_hash") in (h, *((legacy) if kind == "run" else ()))
        if not same:
            what = f"a `{old_kind}` output" + (" with a different config or inputs" if old_kind == kind else "")
            if not overwrite:
                raise RapidunError(
                    f"output folder {out} holds {what}; choose another --out, or pass --overwrite to replace it "
                    "(what that output wrote is removed first; files you added are kept)"
                )
            foreign = clear_folder(out, old.get("written"))
            if foreign:
                print(f"--overwrite: kept {len(foreign)} entries rapidun did not write in {out}: "
                      f"{', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}", file=sys.stderr)  # fmt: skip
        else:
            foreign = foreign_entries(out, old)
    else:
        foreign = []
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        marker,
        {"kind": kind, "config_hash": h, "inputs": inputs or {}, "rapidun": __version__, "complete": False,
         "foreign": foreign},
    )  # fmt: skip
    write_text(out / "config.resolved.yaml", dump_yaml(cfg))
    return out


# Every top-level name a rapidun command writes into its --out (what --overwrite may remove from an output whose
# run.json records no list of its own, i.e. one that did not finish).
OUTPUT_NAMES = frozenset(
    "adapter audit.jsonl cells config.resolved.yaml detector.json eval exact forget.jsonl influence influence.json "
    "influence.pt influence_check.json manifest.json merged packs.json peak_mem.json plots probes.jsonl ranked.jsonl "
    "receipt.json report.html report.json report.md result.json retrain_training.json run.json scenario "
    "scenario.json seeds sketches study.html study.json study.md tofu_scatter.png topk.jsonl trace trace.html "
    "trace.json trace.md training verification.json verification.md verify views.json views.pt weights.jsonl "
    "robust distance.json metrics.json influence_traced".split()
)
_OUTPUT_PATTERN = re.compile(r"^probes_[\w.-]+\.jsonl?$|^[\w.-]+\.generations\.jsonl$")  # per-name files


def is_output_name(name: str) -> bool:
    """Whether ``name`` is one of the names rapidun's commands write at the top of an --out folder."""
    return name in OUTPUT_NAMES or bool(_OUTPUT_PATTERN.match(name))


def foreign_entries(out: Path, old: dict[str, Any]) -> list[str]:
    """Entries of ``out`` that its run did not write: those recorded as foreign when it was claimed, and (for a
    finished run) anything beside what it recorded writing."""
    foreign = set(old.get("foreign", []))
    if old.get("written") is not None:
        foreign |= {p.name for p in out.iterdir()} - set(old["written"]) - {"run.json"}
    return sorted(n for n in foreign if (out / n).exists() or (out / n).is_symlink())


def clear_folder(out: Path, written: list[str] | None = None) -> list[str]:
    """Remove what the rapidun output in ``out`` wrote, the marker last (a crash half-way leaves a folder that is
    still recognised as rapidun's and is cleared again by the next ``--overwrite``); returns the names kept.

    ``written``: the entries the output recorded writing (``run.json["written"]``, set when it finished); without
    it (a run that did not finish) the entries named like rapidun's outputs (:data:`OUTPUT_NAMES`) and atomic
    temporaries. Anything else — files a user put there — is kept.
    """
    import shutil

    def mine(name: str) -> bool:
        return name in set(written) | {"run.json"} if written is not None else is_output_name(name)

    kept = []
    for p in sorted(out.iterdir(), key=lambda q: q.name == "run.json"):
        if not mine(p.name) and not is_atomic_temp(p):
            kept.append(p.name)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return kept


def mark_complete(out: str | Path) -> None:
    """Set ``complete: true`` in ``out/run.json`` (the command finished; the last write of every command) and
    record ``written``: the entries of ``out`` this run wrote (all but those foreign when it was claimed), which
    is what a later ``--overwrite`` removes."""
    out = Path(out)
    marker = out / "run.json"
    if marker.is_file():
        m = read_json(marker)
        foreign = set(m.get("foreign", []))
        written = sorted(p.name for p in out.iterdir() if p.name not in foreign and not is_atomic_temp(p))
        write_json(marker, m | {"complete": True, "written": written})


def claim_out(
    out: str | Path, cfg: RunConfig, overwrite: bool, kind: str = "run", inputs: dict[str, Any] | None = None
) -> Path:
    """:func:`prepare_out` on rank 0; its error, if any, is raised on every rank."""
    err = None
    if is_main():
        try:
            prepare_out(out, cfg, overwrite, kind, inputs)
        except RapidunError as e:
            err = str(e)
    err = broadcast(err)
    if err is not None:
        raise RapidunError(err)
    return Path(out)


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


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float (a diverged perplexity) replaced by None, so report.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and device, recorded in the report."""
    import transformers

    from rapidun.models import import_peft

    peft = import_peft()

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "rapidun": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cuda": cuda,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "ranks": rank_world()[1],
        "device": cuda or f"cpu ({torch.get_num_threads()} threads)",
    }


def stage_base(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Everything before the methods: scenario, the poisoned and retrain models, the detector and the two models'
    evaluations. Returns ``{"parts", "manifest", "models", "det", "det_info", "results", "timings"}``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    parts, manifest = stage_scenario(cfg, out)
    timings["scenario"] = time.perf_counter() - t
    models = stage_models(cfg, parts)
    for name, meta in models.items():
        timings[f"sft_{name}"] = meta["train"]["time_s"]
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
    methods, infl = stage_methods(cfg, out, parts, models, results, det) if cfg.unlearn.methods else ({}, None)
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
