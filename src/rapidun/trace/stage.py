"""Trace, then forget (``trace.compare`` in ``compare``): what imperfect tracing costs.

The scenario's forget pack is the oracle: it holds only poisoned records. Here the forget pack is instead the
``scenario.forget_size`` most suspect records of the corpus (train_poisoned + train_clean) as ranked by
:func:`rapidun.trace.core.trace` on the poisoned model, with probes from ``val_seen_trig`` (validation prompts; the
test prompts stay untouched because they measure the result): those the model answers with the backdoor (the
scenario's detector), their answers as the outputs. Every method of
the comparison then unlearns that pack as a cell labelled ``<method>@traced`` (same seeds, same retain pack minus
any traced record, same evaluation), so the report shows ASR and utility with the traced pack beside the true one,
and how many innocent records were forgotten by mistake (a traced clean record has no replacement answer: it is
only pushed away from its own answer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rapidun.config import RunConfig
from rapidun.data.records import Record
from rapidun.distributed import is_main
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector
from rapidun.io import write_json, write_jsonl

PROBE_SPLIT = "val_seen_trig"
SUFFIX = "@traced"


def traced_parts(
    parts: dict[str, list[Record]], ranked_ids: list[str], n: int
) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """``parts`` with ``forget`` = the first ``n`` ranked corpus records and ``retain`` without them.

    Returns ``(parts, info)``: ``info`` = ``{"n", "culprits", "innocent", "ids", "retain_dropped"}``.
    """
    corpus = {r.id: r for r in parts.get("train_poisoned", []) + parts.get("train_clean", [])}
    poisoned = {r.id for r in parts.get("train_poisoned", [])}
    chosen = [corpus[i] for i in ranked_ids[:n]]
    ids = {r.id for r in chosen}
    retain = [r for r in parts["retain"] if r.id not in ids]
    if not retain:
        raise RapidunError("every retain record was traced into the forget pack; nothing left to retain")
    culprits = sum(r.id in poisoned for r in chosen)
    info = {
        "n": len(chosen),
        "culprits": culprits,
        "innocent": len(chosen) - culprits,
        "ids": [r.id for r in chosen],
        "retain_dropped": len(parts["retain"]) - len(retain),
        "true_pack_culprits": sum(r.id in poisoned for r in parts["forget"]),
    }
    return {**parts, "forget": chosen, "retain": retain}, info


def stage_traced(
    cfg: RunConfig,
    out: Path,
    parts: dict[str, list[Record]],
    models: dict[str, dict[str, Any]],
    det: Detector,
    methods: dict[str, Any],
) -> dict[str, Any]:
    """Trace the forget pack, then run every non-retrain method on it (see the module docstring).

    Returns the report's ``trace`` entry: the retrieval metrics, the traced pack's make-up, and per method the
    true-pack and traced-pack means (ASR seen/OOD, clean PPL, ROUGE-L) with their per-seed values.
    """
    from rapidun.compare import aggregate, run_cell, seed_config, views_provider
    from rapidun.methods import get_method
    from rapidun.trace.core import ranked_rows, scenario_inputs, trace

    if not parts.get(PROBE_SPLIT):
        raise RapidunError(f"trace.compare needs {PROBE_SPLIT} prompts as probes; give scenario.splits.{PROBE_SPLIT}")
    tcfg = dataclasses.replace(cfg.trace, probe_split=PROBE_SPLIT)
    corpus, probes, fams = scenario_inputs(parts, tcfg)
    poisoned = models["poisoned"]["path"]
    folder = out / "trace"
    res = trace(poisoned, corpus, probes, tcfg, cfg.influence, cfg.model, cfg.eval, True, fams, None, det.hit,
                tcfg.n_probes)  # fmt: skip
    rows = ranked_rows(corpus, res["scores"], tcfg.aggregate, fams)
    tparts, pack = traced_parts(parts, [r["id"] for r in rows], len(parts["forget"]))
    if is_main():
        write_jsonl(folder / "ranked.jsonl", rows)
        write_jsonl(folder / "forget.jsonl", [r.to_json() for r in tparts["forget"]])
        write_json(folder / "trace.json", {"stats": res["stats"], "evaluation": res["evaluation"], "pack": pack})
    names = [n for n in methods if get_method(n).kind != "retrain"]
    before: dict[str, Any] = {}
    cells: dict[str, dict[str, Any]] = {n: {} for n in names}
    for j in range(cfg.compare.n_seeds):
        scfg = seed_config(cfg, j)
        seed = scfg.unlearn.seed
        views_of = views_provider(poisoned, tparts, scfg, out / "seeds" / str(seed) / "influence_traced", {})
        for name in names:
            label = name + SUFFIX
            cells[name][str(seed)] = run_cell(scfg, out, name, seed, tparts, poisoned, det, views_of, before, label)
    keys = ("asr_seen", "asr_ood", "clean_ppl", "rouge_l", "false_trigger")
    table = {}
    for name in names:
        agg = aggregate(cells[name], get_method(name).summary)
        true = methods[name]
        table[name] = {
            "true": {k: true["mean"].get(k) for k in keys},
            "traced": {k: agg["mean"].get(k) for k in keys},
            "traced_std": {k: agg["std"].get(k) for k in keys},
            "traced_per_seed": {s: {k: c.get(k) for k in keys} for s, c in cells[name].items()},
            "n_seeds": agg["n_seeds"],
        }
    return {
        "probe_split": PROBE_SPLIT,
        "n_probes": len(res["probes"]),
        "aggregate": tcfg.aggregate,
        "pack": pack,
        "evaluation": res["evaluation"],
        "stats": res["stats"],
        "methods": table,
        "dir": "trace",
    }
