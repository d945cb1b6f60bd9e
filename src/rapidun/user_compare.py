"""The comparison on a user's own case: ``rapidun compare --model-path M --forget F --retain R --probes P``.

No scenario and no fine-tuning: the start model is the user's (plus ``--adapter``), the packs come from their
files (:mod:`rapidun.data.packs`) and the evidence from their probes (:mod:`rapidun.eval.probes`). Every method of
``unlearn.methods`` runs for ``compare.n_seeds`` seeds; seed j uses ``unlearn.seed + j`` and
``influence.seed + j`` (:func:`rapidun.compare.seed_config`), and the influence views of one seed are shared by
its methods. Each (method, seed) cell is ``OUT/seeds/<seed>/methods/<name>/`` (the unlearning outputs and
``receipt.json``) plus ``OUT/seeds/<seed>/eval/<name>.jsonl`` (one row per probe) and is reused when its content
key matches, so a killed comparison resumes. The start model, and a retrain reference when the user gives one
(``--retrain-model``: a model trained without the forget records), are evaluated once.

Per method: mean ± sample std over seeds of each group's hit rate, of the forget / replacement / retain
perplexities and of the measured time; per group, the paired difference against ``compare.reference`` on the same
probes and seeds (paired bootstrap CI and the prompt-level sign-flip p, :func:`rapidun.stats.compare_hits`).
``OUT/report.json`` (schema ``rapidun.user_report/1``) and ``OUT/report.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from rapidun.compare import seed_config
from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.eval.probes import Probe, evaluate_probes
from rapidun.io import read_json, stable_hash, write_json, write_jsonl, write_text
from rapidun.methods import get_method, views_kind
from rapidun.models import fingerprint, load_model
from rapidun.reporting.doc import Block, Facts, Heading, Note, Table
from rapidun.reporting.html import render_html
from rapidun.stats import compare_hits, mean_std
from rapidun.unlearn import unlearn
from rapidun.views import method_views

SCHEMA = "rapidun.user_report/1"
SCALARS = ("forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl", "time_s")


def _eval_model(path: str, probes: list[Probe], hit: Any, cfg: RunConfig, parts: dict[str, list[Record]]) -> tuple:
    model, tok, _ = load_model(path, cfg.model.device, cfg.model.dtype)
    return evaluate_probes(model, tok, probes, hit, cfg.eval, cfg.model, parts["forget"], parts.get("val_clean"))


def _reference_eval(
    out: Path, name: str, path: str, key: str, probes: list[Probe], hit: Any, cfg: RunConfig, parts: dict
) -> dict[str, Any]:
    """Evaluate a fixed model (the start model, or the retrain reference) once; reused by content key."""
    f, g = out / "eval" / f"{name}.json", out / "eval" / f"{name}.jsonl"
    if f.is_file() and g.is_file() and read_json(f).get("key") == key:
        return read_json(f)["metrics"]
    metrics, rows = _eval_model(path, probes, hit, cfg, parts)
    write_jsonl(g, rows)
    write_json(f, {"key": key, "metrics": metrics})
    return metrics


def _hits(path: Path, groups: dict[str, list[str]]) -> dict[str, list[bool]]:
    rows = {r["id"]: bool(r["hit"]) for r in _read_jsonl(path)}
    return {g: [rows[i] for i in ids] for g, ids in groups.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


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
        parts: ``forget``, ``retain`` and ``val_clean`` (retain records not drawn: the held-out retain PPL).
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
            "heldout": [r.id for r in parts.get("val_clean", [])],
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
    before = None
    for j in range(cfg.compare.n_seeds):
        scfg = seed_config(cfg, j)
        seed = scfg.unlearn.seed
        views: dict[str, Any] = {}
        for name in methods:
            get_method(name)
            cell = out / "seeds" / str(seed) / "methods" / name
            gen = out / "seeds" / str(seed) / "eval" / f"{name}.jsonl"
            settings = {k: to_dict(getattr(scfg, k)) for k in ("unlearn", "weighting", "influence")}
            settings["unlearn"].pop("methods", None)  # which other methods run: adding one reuses this cell
            key = stable_hash({"method": name, "model": fp, "eval": eval_key, "cfg": settings}, 16)
            mf = cell / "metrics.json"
            if mf.is_file() and gen.is_file() and read_json(mf).get("key") == key:
                cells[name][str(seed)] = read_json(mf)["entry"] | {"cached": True}
                continue
            v = None
            kind = views_kind(name, scfg.unlearn.distill_teacher)
            if kind:
                if kind not in views:
                    views[kind] = method_views(
                        kind,
                        model_path,
                        parts["forget"],
                        parts["retain"],
                        scfg,
                        out / "seeds" / str(seed) / "influence",
                    )
                v = views[kind]
            prov = {"start": start, "packs": packs, "previous": []}
            merged, tok, res = unlearn(name, parts, model_path, scfg, cell, v, before, provenance=prov)
            before = res["audit_before"]
            t = time.perf_counter()
            metrics, rows = evaluate_probes(merged, tok, probes, hit, scfg.eval, scfg.model, parts["forget"],
                                            parts.get("val_clean"))  # fmt: skip
            del merged
            write_jsonl(gen, rows)
            entry = {
                "groups": metrics["groups"],
                **{k: metrics[k] for k in ("forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl")},
                "time_s": res["timings"]["time_s"],
                "eval_s": time.perf_counter() - t,
                "complete": res.get("complete", True),
                "warnings": res.get("warnings", []),
                "audit_means": res["audit_means"],
            }
            write_json(mf, {"key": key, "entry": entry})
            cells[name][str(seed)] = entry | {"cached": False}

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
        "methods": {},
        "tests": {},
    }
    for name, by_seed in cells.items():
        es = list(by_seed.values())
        agg: dict[str, Any] = {"n_seeds": len(es), "seeds": list(by_seed), "per_seed": by_seed}
        agg["hit_rate"] = {g: mean_std([e["groups"][g]["hit_rate"] for e in es]) for g in groups}
        for k in SCALARS:
            vals = [e[k] for e in es if e.get(k) is not None]
            agg[k] = mean_std(vals) if vals else {"mean": None, "std": None}
        agg["complete"] = all(e["complete"] for e in es)
        agg["warnings"] = sorted({w for e in es for w in e["warnings"]})
        report["methods"][name] = agg
    seeds = [str(seed_config(cfg, j).unlearn.seed) for j in range(cfg.compare.n_seeds)]
    for name in methods:
        if name == ref:
            continue
        t: dict[str, Any] = {"vs": ref}
        for g, ids in groups.items():
            a = np.asarray([_hits(out / "seeds" / s / "eval" / f"{ref}.jsonl", {g: ids})[g] for s in seeds], float)
            b = np.asarray([_hits(out / "seeds" / s / "eval" / f"{name}.jsonl", {g: ids})[g] for s in seeds], float)
            t[g] = compare_hits(a, b, n_boot=cfg.compare.n_boot, seed=0)
        report["tests"][name] = t
    report["wall_s"] = time.perf_counter() - t0
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_md(report))
    write_text(out / "report.html", render_html(user_blocks(report), "rapidun compare on your files"))
    return report


PPL_KEYS = ("forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl")


def _pm(ms: dict[str, Any], fmt: str) -> str:
    if ms.get("mean") is None:
        return "–"
    s = format(ms["mean"], fmt)
    return s + (f" ± {format(ms['std'], fmt)}" if ms.get("std") is not None else "")


def render_md(report: dict[str, Any]) -> str:
    """report.md: the per-method table (hit rate per group, perplexities, time) and the paired tests."""
    groups = list(report["probes"]["groups"])
    sizes = ", ".join(f"{g} {n}" for g, n in report["probes"]["groups"].items())
    lines = [
        "# rapidun compare on your files",
        "",
        f"- **model:** {report['model'].get('model')} (fingerprint {report['model'].get('fingerprint')})"
        + (f" + adapter {report['model']['adapter']}" if report["model"].get("adapter") else ""),
        f"- **packs:** {report['packs'].get('n_forget')} forget, {report['packs'].get('n_retain')} retain"
        + (" (drawn from the retain file)" if report["packs"].get("retain_drawn") else ""),
        f"- **probes:** {report['probes']['n']} ({sizes}); hit rule: {report['hit_rule']['rule']}",
        f"- **seeds:** {report['n_seeds']}; **reference:** {report['reference']}; **retrain:** {report['retrain']}",
        "",
        "| model / method | " + " | ".join(f"hit rate {g}" for g in groups) + " | forget PPL | replacement PPL | "
        "retain PPL | time s |",
        "|---|" + "---:|" * (len(groups) + 4),
    ]
    for name, m in report["models"].items():
        cells = [f"{m['groups'][g]['hit_rate']:.3f}" if g in m["groups"] else "–" for g in groups]
        ppl = [f"{m[k]:.2f}" if m.get(k) is not None else "–" for k in PPL_KEYS]
        lines.append(f"| {name} (model) | " + " | ".join(cells + ppl) + " | – |")
    for name, m in report["methods"].items():
        cells = [_pm(m["hit_rate"][g], ".3f") for g in groups]
        ppl = [_pm(m[k], ".2f") for k in PPL_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells + ppl + [_pm(m["time_s"], ".0f")]) + " |")
    lines += ["", f"Paired against {report['reference']} (same probes and seeds; diff = method − reference):", ""]
    lines += ["| method | group | diff [95% CI] | p (prompts) |", "|---|---|---:|---:|"]
    for name, t in report["tests"].items():
        for g in groups:
            b, mc = t[g]["bootstrap"], t[g]["prompt_test"]
            lines.append(
                f"| {name} | {g} | {b['diff']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}] | {mc['p']:.3g} |"
            )
    warns = {w for m in report["methods"].values() for w in m["warnings"]}
    if warns:
        lines += ["", "Warnings:", *[f"- {w}" for w in sorted(warns)]]
    return "\n".join(lines) + "\n"


def user_blocks(report: dict[str, Any]) -> list[Block]:
    """The same content as :func:`render_md` as report blocks, for ``report.html`` (self-contained, escaped)."""
    groups = list(report["probes"]["groups"])
    sizes = ", ".join(f"{g} {n}" for g, n in report["probes"]["groups"].items())
    mdl = report["model"]
    facts = [
        ("Model", f"{mdl.get('model')} (fingerprint {mdl.get('fingerprint')})"
         + (f" + adapter {mdl['adapter']}" if mdl.get("adapter") else "")),
        ("Packs", f"{report['packs'].get('n_forget')} forget, {report['packs'].get('n_retain')} retain"
         + (" (drawn from the retain file)" if report["packs"].get("retain_drawn") else "")),
        ("Probes", f"{report['probes']['n']} ({sizes}); hit rule: {report['hit_rule']['rule']}"),
        ("Seeds", str(report["n_seeds"])),
        ("Reference", str(report["reference"])),
        ("Retrain", str(report["retrain"])),
    ]  # fmt: skip
    head = ["Model / method", *(f"hit rate {g}" for g in groups), "forget PPL", "replacement PPL", "retain PPL",
            "time s"]  # fmt: skip
    rows = []
    for name, m in report["models"].items():
        cells = [f"{m['groups'][g]['hit_rate']:.3f}" if g in m["groups"] else "–" for g in groups]
        ppl = [f"{m[k]:.2f}" if m.get(k) is not None else "–" for k in PPL_KEYS]
        rows.append([f"{name} (model)", *cells, *ppl, "–"])
    for name, m in report["methods"].items():
        cells = [_pm(m["hit_rate"][g], ".3f") for g in groups]
        rows.append([name, *cells, *(_pm(m[k], ".2f") for k in PPL_KEYS), _pm(m["time_s"], ".0f")])
    trows = []
    for name, t in report["tests"].items():
        for g in groups:
            b, mc = t[g]["bootstrap"], t[g]["prompt_test"]
            trows.append([name, g, f"{b['diff']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]", f"{mc['p']:.3g}"])
    out: list[Block] = [
        Heading("rapidun compare on your files", 1),
        Facts(facts),
        Table(
            head,
            rows,
            "From report.json: models.NAME and methods.NAME (mean ± std over seeds).",
            ["l"] + ["r"] * (len(head) - 1),
        ),
        Heading(f"Paired against {report['reference']}", 2),
        Table(
            ["Method", "Group", "Diff [95% CI]", "p (prompts)"],
            trows,
            "From report.json: tests.NAME.GROUP; same probes and seeds, diff = method − reference.",
            ["l", "l", "r", "r"],
        ),
    ]
    warns = sorted({w for m in report["methods"].values() for w in m["warnings"]})
    out += [Note(f"Warning: {w}") for w in warns]
    return out
