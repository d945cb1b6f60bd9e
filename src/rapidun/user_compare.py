"""The comparison on a user's own case: ``rapidun compare --model-path M --forget F --retain R --probes P``.

The user's evaluator on the comparison engine of :mod:`rapidun.cells` (the scenario path's: the same cells, seeds,
aggregation and paired tests). What differs from the scenario: no scenario and no fine-tuning: the start model is
the user's (plus ``--adapter``), the packs come from their files (:mod:`rapidun.data.packs`) and the evidence from
their probes (:mod:`rapidun.eval.probes`), whose groups take the place of the scenario's test splits. Every method
of ``unlearn.methods`` runs for ``compare.n_seeds`` seeds (:func:`rapidun.cells.seed_config`). Each (method, seed)
cell is ``OUT/seeds/<seed>/methods/<name>/`` (the unlearning outputs, ``receipt.json`` and ``metrics.json``) plus
``OUT/seeds/<seed>/eval/<name>.jsonl`` (one row per probe) and is reused when its content key matches
(:func:`rapidun.cells.method_cell`), so a killed comparison resumes. The start model, and a retrain reference when
the user gives one (``--retrain-model``: a model trained without the forget records), are evaluated once
(``OUT/eval/<start|retrain>.json`` and ``.jsonl``, reused by key the same way).

Per method: mean ± sample std over seeds of each group's hit rate, of the forget / replacement / retain
perplexities and of the measured time (:func:`rapidun.cells.over_seeds`); per group, the paired difference against
``compare.reference`` on the same probes and seeds (:func:`rapidun.cells.paired_tests`: paired bootstrap CI and the
prompt-level sign-flip p). ``OUT/report.json`` (schema ``rapidun.user_report/1``), ``OUT/report.md`` and
``OUT/report.html`` (the blocks of :func:`rapidun.reporting.user_report.user_blocks`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rapidun.cells import method_cell, over_seeds, paired_tests, reuse_or_run, seed_config, views_provider
from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.eval.probes import Probe, evaluate_probes
from rapidun.io import stable_hash, write_json, write_jsonl, write_text
from rapidun.methods import get_method
from rapidun.models import fingerprint, load_model
from rapidun.reporting.html import render_html
from rapidun.reporting.markdown import render_markdown
from rapidun.reporting.user_report import TITLE, user_blocks

SCHEMA = "rapidun.user_report/1"
PPL_KEYS = ("forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl")
SCALARS = (*PPL_KEYS, "time_s")
# Bumped when a cell's metrics.json changes shape, so a cell written in another shape is re-run, not misread.
CELL_FORMAT = 2


def _reference_eval(
    out: Path, name: str, path: str, key: str, probes: list[Probe], hit: Any, cfg: RunConfig, parts: dict
) -> dict[str, Any]:
    """Evaluate a fixed model (the start model, or the retrain reference) once; reused by content key."""
    gen = out / "eval" / f"{name}.jsonl"

    def compute() -> dict[str, Any]:
        model, tok, _ = load_model(path, cfg.model.device, cfg.model.dtype)
        metrics, rows = evaluate_probes(
            model, tok, probes, hit, cfg.eval, cfg.model, parts["forget"], parts.get("val_clean")
        )
        write_jsonl(gen, rows)
        return {"metrics": metrics}

    return reuse_or_run(out / "eval" / f"{name}.json", key, compute, needs=[gen])[0]["metrics"]


def train_retrain(
    cfg: RunConfig, base: str, records: list[Record], forget: list[Record]
) -> tuple[str, str, dict[str, Any]]:
    """The retrain reference from the user's clean corpus (``--retrain-data``): ``base`` fine-tuned with a LoRA by
    the ``sft.*`` settings on ``records`` minus every record whose content equals a forget record's (cached by
    content in ``$RAPIDUN_CACHE/sft``, as the scenario's models).

    Returns:
        ``(model path, note for the report, the SFT meta)``.

    Raises:
        RapidunError: nothing is left to train on.
    """
    import dataclasses

    from rapidun.data.records import content_id
    from rapidun.finetune import finetune

    bad = {content_id(r.instruction, r.context, r.response) for r in forget}
    keep = [r for r in records if content_id(r.instruction, r.context, r.response) not in bad]
    dropped = len(records) - len(keep)
    if not keep:
        raise RapidunError("--retrain-data: every record is a forget record; give the clean training corpus")
    meta = finetune(keep, dataclasses.replace(cfg.model, name=base), cfg.sft, "retrain-user")
    note = (
        f"trained here from --retrain-data on {base}: {len(keep)} records ({dropped} forget records dropped), "
        f"sft.epochs {cfg.sft.epochs}, {meta['train']['time_s']:.0f} s" + (" (cached)" if meta.get("cached") else "")
    )
    return meta["path"], note, meta


def check_user_methods(cfg: RunConfig) -> list[str]:
    """The user comparison's methods, checked before any work (the command calls it before it trains a reference
    or writes into ``--out``): registered, runnable without a scenario's corpus, ``compare.reference`` among them.

    Raises:
        RapidunError: naming the setting and what to change.
    """
    methods = [m for m in cfg.unlearn.methods if m != "retrain"]
    if not methods:
        raise RapidunError("unlearn.methods names no unlearning method (retrain is a model here: --retrain-model)")
    from rapidun.cover import NEEDS_CORPUS, needs_corpus

    for m in methods:
        get_method(m)
        if needs_corpus(m, cfg.unlearn.distill_teacher):
            raise RapidunError(f"unlearn.methods: {m}: {NEEDS_CORPUS}")
    ref = cfg.compare.reference
    if ref not in methods:
        raise RapidunError(
            f"compare.reference={ref} is not among unlearn.methods {methods}; add it or set compare.reference"
        )
    return methods


def compare_user(
    cfg: RunConfig,
    out: Path,
    model_path: str,
    start: dict[str, Any],
    parts: dict[str, list[Record]],
    packs: dict[str, Any],
    probes: list[Probe],
    hit: Any,
    rule: dict[str, Any],
    retrain_model: str | None = None,
    retrain_note: str | None = None,
) -> dict[str, Any]:
    """Run every method × seed on the user's packs and probes; write and return the report (module docstring).

    Args:
        cfg: run config (``unlearn``, ``weighting``, ``influence``, ``eval``, ``model``, ``compare``).
        out: the claimed output folder.
        model_path: the start model (``--model-path``, merged with ``--adapter`` when given).
        start: the receipt's description of the start model.
        parts: ``forget``, ``retain`` and ``val_clean`` (the held-out clean records: ``--heldout-clean``'s, else the
            retain records not drawn into the buffer; their perplexity is the report's held-out PPL).
        packs: how the packs were built (:func:`rapidun.data.packs.load_packs`).
        probes, hit, rule: the probes and the hit rule (:func:`rapidun.eval.probes.hit_rule`).
        retrain_model: a model trained without the forget records, evaluated once as the reference end.
        retrain_note: how it came to be (default "given"; ``--retrain-data``: trained here, see
            :func:`train_retrain`).
    """
    t0 = time.perf_counter()
    methods = check_user_methods(cfg)
    ref = cfg.compare.reference
    fp = fingerprint(model_path)
    probes_key = stable_hash([[p.id, p.prompt, p.context, p.group] for p in probes], 16)
    data_key = stable_hash(
        {
            "forget": [
                [r.id, r.instruction, r.context, r.response, r.meta.get("response_clean")] for r in parts["forget"]
            ],
            "retain": [[r.id, r.instruction, r.context, r.response] for r in parts["retain"]],
            "heldout": [[r.id, r.instruction, r.context, r.response] for r in parts.get("val_clean", [])],
        },
        16,
    )
    eval_key = stable_hash({"probes": probes_key, "data": data_key, "rule": rule, "eval": to_dict(cfg.eval),
                            "model_cfg": to_dict(cfg.model)}, 16)  # fmt: skip
    models = {
        "start": _reference_eval(out, "start", model_path, stable_hash([fp, eval_key], 16), probes, hit, cfg, parts)
    }
    if retrain_model:
        rkey = stable_hash([fingerprint(retrain_model), eval_key], 16)
        models["retrain"] = _reference_eval(out, "retrain", retrain_model, rkey, probes, hit, cfg, parts)
    groups: dict[str, list[str]] = {}
    for p in probes:
        groups.setdefault(p.group, []).append(p.id)

    cells: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    files: dict[str, list[Path]] = {m: [] for m in methods}
    before: dict[str, Any] = {}  # the start model's per-sample losses, shared by every cell
    prov = {"start": start, "packs": packs, "previous": []}
    for j in range(cfg.compare.n_seeds):
        scfg = seed_config(cfg, j)
        seed = scfg.unlearn.seed
        views_of = views_provider(model_path, parts, scfg, out / "seeds" / str(seed) / "influence", {})
        for name in methods:
            gen = out / "seeds" / str(seed) / "eval" / f"{name}.jsonl"
            settings = {k: to_dict(getattr(scfg, k)) for k in ("unlearn", "weighting", "influence")}
            settings["unlearn"].pop("methods", None)  # which other methods run: adding one reuses this cell
            key = stable_hash({"method": name, "model": fp, "eval": eval_key, "cfg": settings,
                               "cell": CELL_FORMAT}, 16)  # fmt: skip

            def evaluate(merged: Any, tok: Any, scfg: RunConfig = scfg, gen: Path = gen) -> dict[str, Any]:
                metrics, rows = evaluate_probes(merged, tok, probes, hit, scfg.eval, scfg.model, parts["forget"],
                                                parts.get("val_clean"))  # fmt: skip
                write_jsonl(gen, rows)
                return metrics

            rel = f"seeds/{seed}/methods/{name}"
            metrics, res, cached = method_cell(
                name, scfg, parts, model_path, out, rel, gen, key, views_of, before, evaluate, prov
            )
            cells[name][str(seed)] = _entry(metrics, res, cached)
            files[name].append(gen)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": start,
        "packs": packs,
        "probes": {"n": len(probes), "groups": {g: len(ids) for g, ids in groups.items()}},
        "hit_rule": rule,
        "reference": ref,
        "n_seeds": cfg.compare.n_seeds,
        "models": models,
        "retrain": (retrain_note or "given")
        if retrain_model
        else "none: no retrain reference (pass --retrain-model, or --retrain-data to train one)",
        "methods": {name: aggregate_user(by_seed, list(groups)) for name, by_seed in cells.items()},
        "tests": paired_tests(files, ref, cfg.compare.n_boot, {g: ((g,), ids) for g, ids in groups.items()}, "group"),
    }
    report["wall_s"] = time.perf_counter() - t0
    write_json(out / "report.json", report)
    blocks = user_blocks(report)
    write_text(out / "report.md", render_markdown(blocks))
    write_text(out / "report.html", render_html(blocks, TITLE))
    return report


def _entry(metrics: dict[str, Any], res: dict[str, Any], cached: bool) -> dict[str, Any]:
    """A cell's ``per_seed`` entry in report.json (the user_report schema)."""
    return {
        "groups": metrics["groups"],
        **{k: metrics[k] for k in PPL_KEYS},
        "time_s": res["timings"]["time_s"],
        "eval_s": metrics["eval_s"],
        "complete": res.get("complete", True),
        "warnings": res.get("warnings", []),
        "audit_means": res["audit_means"],
        "cached": cached,
    }


def aggregate_user(by_seed: dict[str, dict[str, Any]], groups: list[str]) -> dict[str, Any]:
    """One method over seeds in the user_report schema: ``hit_rate.GROUP`` and each of :data:`SCALARS` as
    ``{"mean", "std", "n"}`` (:func:`rapidun.cells.over_seeds`, as the scenario's :func:`rapidun.compare.aggregate`)."""
    es = list(by_seed.values())
    agg: dict[str, Any] = {"n_seeds": len(es), "seeds": list(by_seed), "per_seed": by_seed}
    agg["hit_rate"] = {g: over_seeds(es, "groups", g, "hit_rate") for g in groups}
    agg |= {k: over_seeds(es, k) for k in SCALARS}
    agg["complete"] = all(e["complete"] for e in es)
    agg["warnings"] = sorted({w for e in es for w in e["warnings"]})
    return agg
