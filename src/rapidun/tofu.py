"""``rapidun compare`` on the TOFU scenario (``scenario.kind: tofu``): forget fictitious authors, scored the way
OpenUnlearning scores TOFU.

Stages (each cached or resumable):

1. parts (:func:`rapidun.data.tofu.build_tofu`), the **full** model (SFT on retain300 + forget05) and the
   **retain** model (SFT without the forget split), both cached by content (:func:`rapidun.finetune.finetune`);
2. per-sample statistics of each model (:func:`model_stats`: answer and perturbed-answer NLLs, Min-K% and
   Min-K%++ scores, greedy answers for ROUGE-L recall), written to ``eval/<label>.json``;
3. a **learnability check**: the full model must know the forget authors better than the retain model (forget
   probability and ROUGE above it, forget quality p < 0.01), else the benchmark measures nothing at this scale;
4. one cell per ``unlearn.methods`` × ``compare.n_seeds``: unlearning from the full model (the methods'
   forget pack: the split's QA with an "I don't know" answer as replacement; retain pack: the retain model's
   training QA), its statistics, and a **relearning attack** (a fresh LoRA trained ``verify.relearn_steps``
   steps on ``verify.relearn_k`` validation-half forget QA), after which forget quality is measured again on
   the test half;
5. scores per half (:func:`scores`: ``val`` to choose, ``test`` to report), the method chosen on validation,
   ``report.json``, ``report.md`` and the forget-quality vs model-utility scatter ``tofu_scatter.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.data.template import encode, format_prompt
from rapidun.data.tofu import build_tofu
from rapidun.errors import RapidunError
from rapidun.eval import tofu_metrics as tm
from rapidun.eval.generate import generate
from rapidun.io import read_json, stable_hash, write_json
from rapidun.methods import get_method
from rapidun.models import fingerprint, load_model

EVAL_VERSION = 1
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_PER_HALF = 25  # QA per half scored for utility on each utility set (CPU budget; forget/holdout: all)
MU_FACTOR = 0.95  # the target: utility ≥ 0.95 × the full model's
HALVES = ("val", "test")


def eval_sets(parts: dict[str, list[Record]], per_half: int = UTILITY_PER_HALF) -> dict[str, list[Record]]:
    """The records each model is scored on: every forget and holdout QA; ``per_half`` QA of each half of the
    utility sets (retain, real authors, world facts)."""
    out = {"forget": parts["forget"], "holdout": parts["holdout"]}
    for s in UTILITY_SETS:
        out[s] = [r for h in HALVES for r in [x for x in parts[s] if x.meta["half"] == h][:per_half]]
    return out


def model_stats(model: Any, tok: Any, sets: dict[str, list[Record]], cfg: RunConfig, desc: str) -> dict[str, Any]:
    """Per-record statistics of ``model`` on ``sets``.

    For every record: ``nll`` (mean answer-token NLL of its answer), ``half``; for records with perturbed answers
    ``pert`` (their NLLs); for forget and holdout ``mink``/``minkpp`` (Min-K% and Min-K%++ at k = 0.4); for
    forget and the utility sets ``rouge`` (ROUGE-L recall of the greedy answer, ``eval.max_new_tokens``).
    """
    m, device, pad = cfg.model, next(model.parameters()).device, tok.pad_token_id
    model.eval()

    def enc(r: Record, answer: str) -> Any:
        return encode(tok, format_prompt(tok, r.instruction, r.context, m.system_prompt), answer, m.max_length,
                      m.max_prompt_tokens)  # fmt: skip

    out: dict[str, Any] = {}
    for name, recs in sets.items():
        rows = [enc(r, r.response) for r in recs]
        st = tm.answer_token_stats(model, rows, pad, device, batch_size=cfg.eval.batch_size)
        entries = [{"id": r.id, "half": r.meta.get("half"), "nll": s["nll"]} for r, s in zip(recs, st, strict=True)]
        if name in ("forget", "holdout"):
            mk = tm.min_k([s["logp"] for s in st])
            mkpp = tm.min_k_pp([s["z"] for s in st])
            for e, a, b in zip(entries, mk, mkpp, strict=True):
                e["mink"], e["minkpp"] = float(a), float(b)
        if name != "holdout":
            k = len(recs[0].meta["perturbed"])
            prow = [enc(r, p) for r in recs for p in r.meta["perturbed"]]
            pst = tm.answer_token_stats(model, prow, pad, device, batch_size=cfg.eval.batch_size)
            for i, e in enumerate(entries):
                e["pert"] = [pst[i * k + j]["nll"] for j in range(k)]
            prompts = [format_prompt(tok, r.instruction, r.context, m.system_prompt) for r in recs]
            gens = generate(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"{desc}:{name}")
            for e, r, g in zip(entries, recs, gens, strict=True):
                e["rouge"] = tm.rouge_l_recall(g, r.response)
                e["gen"] = g
        out[name] = entries
    return out


def _half(entries: list[dict[str, Any]], half: str | None) -> list[dict[str, Any]]:
    return [e for e in entries if half is None or e["half"] == half]


def _r(entries: list[dict[str, Any]]) -> np.ndarray:
    return tm.truth_stat(np.array([e["nll"] for e in entries]), np.array([e["pert"] for e in entries]))


def scores(stats: dict[str, Any], ref: dict[str, Any], half: str | None) -> dict[str, Any]:
    """TOFU's numbers for one model on one half (``None``: both), against the retain model's statistics ``ref``.

    Returns ``forget_quality`` (KS p-value, truth statistics on the forget set vs the retain model's),
    ``forget_prob``, ``forget_rouge``, ``forget_truth_ratio``, ``model_utility`` (harmonic mean of the nine utility
    numbers, also returned), ``mink_auc``/``minkpp_auc`` (forget QA as members vs the holdout authors) and
    ``*_auc_gap`` (AUC − the retain model's AUC: far from 0 in either direction leaks).
    """
    f, fr = _half(stats["forget"], half), _half(ref["forget"], half)
    r = _r(f)
    out: dict[str, Any] = {
        "n_forget": len(f),
        "forget_quality": tm.forget_quality(r, _r(fr)),
        "forget_prob": tm.prob_qa(np.array([e["nll"] for e in f])),
        "forget_rouge": float(np.mean([e["rouge"] for e in f])),
        "forget_truth_ratio": tm.truth_ratio_forget(r),
    }
    util: dict[str, float] = {}
    for s in UTILITY_SETS:
        es = _half(stats[s], half)
        nll, pert = np.array([e["nll"] for e in es]), np.array([e["pert"] for e in es])
        util[f"{s}_prob"] = tm.prob_qa(nll) if s == "retain" else tm.prob_choice(nll, pert)
        util[f"{s}_rouge"] = float(np.mean([e["rouge"] for e in es]))
        util[f"{s}_truth_ratio"] = tm.truth_ratio_utility(tm.truth_stat(nll, pert))
    out["model_utility"] = tm.model_utility(util)
    out.update(util)
    for key in ("mink", "minkpp"):
        auc = tm.mia_auc(np.array([e[key] for e in f]), np.array([e[key] for e in stats["holdout"]]))
        ref_auc = tm.mia_auc(np.array([e[key] for e in fr]), np.array([e[key] for e in ref["holdout"]]))
        out[f"{key}_auc"], out[f"{key}_auc_gap"] = auc, auc - ref_auc
    return out


def relearn_attack(model: Any, tok: Any, parts: dict[str, list[Record]], cfg: RunConfig) -> tuple[Any, dict]:
    """Fine-tune a fresh LoRA on ``verify.relearn_k`` validation-half forget QA (seeded) for
    ``verify.relearn_steps`` steps (:func:`rapidun.verify.battery.relearn`); returns the merged model."""
    import random

    from rapidun.verify.battery import relearn

    pool = [Record(r.id, r.instruction, r.response) for r in parts["forget"] if r.meta["half"] == "val"]
    k = cfg.verify.relearn_k
    if len(pool) < k:
        raise RapidunError(f"verify.relearn_k={k} but the forget split has {len(pool)} validation-half QA")
    recs = random.Random(cfg.verify.seed).sample(pool, k)
    model, info = relearn(model, tok, recs, cfg.verify, cfg.model)
    return model, info | {"ids": [r.id for r in recs]}


def _forget_only(sets: dict[str, list[Record]]) -> dict[str, list[Record]]:
    return {"forget": [r for r in sets["forget"] if r.meta["half"] == "test"]}


def _after_scores(after: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    f, fr = after["forget"], _half(ref["forget"], "test")
    return {
        "forget_quality": tm.forget_quality(_r(f), _r(fr)),
        "forget_prob": tm.prob_qa(np.array([e["nll"] for e in f])),
        "forget_rouge": float(np.mean([e["rouge"] for e in f])),
    }


def _load_or(path: Path, key: str) -> dict[str, Any] | None:
    if path.is_file():
        d = read_json(path)
        if d.get("key") == key:
            return d
    return None


def run_tofu(cfg: RunConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """The whole TOFU comparison into ``out`` (resumable); returns the report dict (also ``report.json``)."""
    from rapidun.compare import check_methods, seed_config
    from rapidun.finetune import finetune
    from rapidun.run_folder import environment, finite_json, mark_complete, prepare_out

    t_all = time.perf_counter()
    methods = check_methods(cfg)
    out = prepare_out(out, cfg, overwrite)
    split = cfg.scenario.forget_split
    parts = build_tofu(split, cfg.scenario.seed)
    sets = eval_sets(parts)
    timings: dict[str, float] = {}
    write_json(
        out / "scenario.json",
        {
            "forget_split": split,
            "sizes": {k: len(v) for k, v in parts.items()},
            "forget_authors": sorted({r.meta["name"] for r in parts["forget"]}),
            "eval_sizes": {k: len(v) for k, v in sets.items()},
        },
    )
    t = time.perf_counter()
    full = finetune(parts["full_train"], cfg.model, cfg.sft, "tofu_full_train")
    timings["sft_full"] = time.perf_counter() - t
    t = time.perf_counter()
    ret = finetune(parts["retain_train"], cfg.model, cfg.sft, "tofu_retain_train")
    timings["sft_retain"] = time.perf_counter() - t
    ident = {"v": EVAL_VERSION, "eval": to_dict(cfg.eval), "model": to_dict(cfg.model), "split": split}

    def stats_of(label: str, path: str) -> dict[str, Any]:
        key = stable_hash({**ident, "model_fp": fingerprint(path)})
        f = out / "eval" / f"{label}.json"
        got = _load_or(f, key)
        if got is None:
            t0 = time.perf_counter()
            model, tok, _ = load_model(path, cfg.model.device, cfg.model.dtype)
            got = {"key": key, "stats": model_stats(model, tok, sets, cfg, f"eval:{label}")}
            got["eval_s"] = time.perf_counter() - t0
            write_json(f, got)
        return got["stats"]

    ref = stats_of("retain", ret["path"])
    full_stats = stats_of("full", full["path"])
    models = {
        "full": {h: scores(full_stats, ref, h) for h in (*HALVES, None)} | {"train": _train(full)},
        "retain": {h: scores(ref, ref, h) for h in (*HALVES, None)} | {"train": _train(ret)},
    }
    check = learnability(models["full"][None], models["retain"][None], split)
    cells: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}  # the full model's per-sample losses and held-out snapshot, taken by the first cell
    for name in methods:
        if get_method(name).kind == "retrain":
            continue
        for j in range(cfg.compare.n_seeds):
            scfg = seed_config(cfg, j)
            seed = scfg.unlearn.seed
            folder = out / "cells" / f"{name}_seed{seed}"
            key = cell_key(ident, full["key"], name, scfg, with_methods=False)
            cell = _load_or(folder / "cell.json", key)
            if cell is None:  # a cell written before the key left out unlearn.methods (same list: same cell)
                cell = _load_or(folder / "cell.json", cell_key(ident, full["key"], name, scfg, with_methods=True))
                if cell is not None:
                    cell["key"] = key
                    write_json(folder / "cell.json", finite_json(cell))
            if cell is None:
                cell = _run_cell(name, scfg, parts, sets, full["path"], folder, ref, shared)
                cell["key"] = key
                write_json(folder / "cell.json", finite_json(cell))
            if "views_s" not in cell:  # written by a version that read no unlearning time: take the cell's own record
                cell["time_s"] = float(read_json(folder / "result.json")["timings"]["time_s"])
            cells.setdefault(name, {})[str(seed)] = cell
            timings[f"method_{name}_seed{seed}"] = cell["time_s"]
    summary = summarise(cells, models)
    timings["wall_this_invocation"] = time.perf_counter() - t_all
    report = {
        "schema": "rapidun.tofu/1",
        "scenario": read_json(out / "scenario.json"),
        "learnability": check,
        "models": models,
        "methods": summary,
        "selected": select(summary, models),
        "timings": timings,
        "environment": environment(),
        "config": to_dict(cfg),
    }
    write_json(out / "report.json", finite_json(report))
    from rapidun.reporting.tofu_report import render_tofu

    report["files"] = {k: str(v) for k, v in render_tofu(out, report, cells).items()}
    mark_complete(out)
    return report


def cell_key(ident: dict[str, Any], full_key: str, name: str, cfg: RunConfig, with_methods: bool = False) -> str:
    """A cell's content key: the evaluation identity, the full model, the method and every setting it reads.

    ``unlearn.methods`` (which other cells the run holds) is left out, so adding or dropping a method reuses every
    finished cell; ``with_methods=True`` gives the key of cells written before it was left out.
    """
    u = to_dict(cfg.unlearn)
    if not with_methods:
        u.pop("methods", None)
    return stable_hash({**ident, "full": full_key, "method": name, "unlearn": u,
                        "weighting": to_dict(cfg.weighting), "influence": to_dict(cfg.influence),
                        "verify": to_dict(cfg.verify), "sft": to_dict(cfg.sft)})  # fmt: skip


def _train(meta: dict[str, Any]) -> dict[str, Any]:
    tr = meta.get("train", {})
    return {"time_s": tr.get("time_s"), "n_records": meta.get("n_records"), "path": meta.get("path")}


def _run_cell(
    name: str,
    cfg: RunConfig,
    parts: dict[str, list[Record]],
    sets: dict[str, list[Record]],
    full_path: str,
    folder: Path,
    ref: dict[str, Any],
    shared: dict[str, Any],
) -> dict[str, Any]:
    """One method × seed on the full model: unlearn, score, attack. ``shared``: one dict for every cell of a run
    (:func:`rapidun.unlearn.unlearn_shared`; the full model's held-out snapshot). The unlearning run's own loss
    audit is skipped (:func:`rapidun.unlearn.unlearn`'s ``audit``): the TOFU scores below measure the forget and
    retain QA, and the audit's two passes over them cost 100–200 s a cell on two CPU cores."""
    from rapidun.unlearn import unlearn_shared
    from rapidun.views import method_views

    upart = {"forget": parts["forget"], "retain": parts["retain_train"], "val_clean": parts["val_clean"]}
    method = get_method(name)
    views = None
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if method.needs_influence:
        views = method_views(method.views, full_path, upart["forget"], upart["retain"], cfg, folder / "influence")
    views_s = time.perf_counter() - t0
    model, tok, res = unlearn_shared(name, upart, full_path, cfg, folder, views, shared, audit=False)  # scored below
    time_s = float(res["timings"]["time_s"]) + views_s  # influence + weights + training (+ teacher), measured
    t = time.perf_counter()
    st = model_stats(model, tok, sets, cfg, f"eval:{name}")
    eval_s = time.perf_counter() - t
    write_json(folder / "stats.json", st)
    cell: dict[str, Any] = {h or "all": scores(st, ref, h) for h in (*HALVES, None)}
    cell.update(attacks(model, tok, parts, sets, cfg, ref, name))
    cell.update({"time_s": time_s, "views_s": views_s, "eval_s": eval_s, "method": name, "seed": cfg.unlearn.seed})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cell


def attacks(
    model: Any, tok: Any, parts: dict[str, list[Record]], sets: dict[str, list[Record]], cfg: RunConfig,
    ref: dict[str, Any], label: str,
) -> dict[str, Any]:  # fmt: skip
    """``verify.attacks`` that apply to TOFU, each scored on the test-half forget QA: ``quantize`` (every
    ``verify.quant_bits``, on a copy) and ``relearn`` (:func:`relearn_attack`; it changes ``model``, so it runs
    last). Returns ``{"quantize": {bits: scores}, "relearn": scores, "attack_s": seconds}``."""
    import copy

    from rapidun.verify.quantize import quantize_weights

    t = time.perf_counter()
    out: dict[str, Any] = {}
    if "quantize" in cfg.verify.attacks:
        out["quantize"] = {}
        for bits in cfg.verify.quant_bits:
            q = copy.deepcopy(model)
            quantize_weights(q, int(bits), cfg.verify.quant_group_size, cfg.verify.quant_backend)
            st = model_stats(q, tok, _forget_only(sets), cfg, f"int{bits}:{label}")
            out["quantize"][str(bits)] = _after_scores(st, ref)
            del q
    if "relearn" in cfg.verify.attacks:
        model, info = relearn_attack(model, tok, parts, cfg)
        after = model_stats(model, tok, _forget_only(sets), cfg, f"relearn:{label}")
        out["relearn"] = _after_scores(after, ref) | {"steps": info["steps"], "k": len(info["ids"])}
    out["attack_s"] = time.perf_counter() - t
    return out


def learnability(full: dict[str, Any], ret: dict[str, Any], split: str) -> dict[str, Any]:
    """Did the full model learn the forget authors? Its forget probability and ROUGE must exceed the retain
    model's and its forget quality (vs the retain model) be below 0.01 — otherwise no method can be judged."""
    ok = (
        full["forget_prob"] > ret["forget_prob"]
        and full["forget_rouge"] > ret["forget_rouge"]
        and full["forget_quality"] < 0.01
    )
    return {
        "ok": bool(ok),
        "split": split,
        "full_forget_prob": full["forget_prob"],
        "retain_forget_prob": ret["forget_prob"],
        "full_forget_rouge": full["forget_rouge"],
        "retain_forget_rouge": ret["forget_rouge"],
        "full_forget_quality": full["forget_quality"],
    }


SUMMARY_KEYS = ("forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio",
                "mink_auc", "minkpp_auc", "mink_auc_gap", "minkpp_auc_gap")  # fmt: skip


def summarise(cells: dict[str, dict[str, Any]], models: dict[str, Any]) -> dict[str, Any]:
    """Per method: mean, std and per-seed values of each number on each half, after the attack, and time."""
    out: dict[str, Any] = {}
    for name, per_seed in cells.items():
        e: dict[str, Any] = {"seeds": sorted(per_seed, key=int)}
        for h in (*HALVES, "all"):
            e[h] = {k: _ms([c[h][k] for c in per_seed.values()]) for k in SUMMARY_KEYS}
        cs = list(per_seed.values())
        if all("relearn" in c for c in cs):
            e["relearn"] = {k: _ms([c["relearn"][k] for c in cs]) for k in ("forget_quality", "forget_prob")}
        for bits in cs[0].get("quantize", {}):
            e[f"int{bits}"] = {k: _ms([c["quantize"][bits][k] for c in cs]) for k in ("forget_quality", "forget_prob")}
        e["time_s"] = _ms([c["time_s"] for c in per_seed.values()])
        out[name] = e
    return out


def _ms(xs: list[float]) -> dict[str, Any]:
    a = np.array(xs, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def select(summary: dict[str, Any], models: dict[str, Any]) -> dict[str, Any] | None:
    """The method chosen on the validation half: highest mean forget quality among those whose mean model
    utility is ≥ :data:`MU_FACTOR` × the full model's (none qualifies: the highest utility one, flagged)."""
    if not summary:
        return None
    floor = MU_FACTOR * models["full"]["val"]["model_utility"]
    ok = {n: e for n, e in summary.items() if e["val"]["model_utility"]["mean"] >= floor}
    pool = ok or summary
    best = max(pool, key=lambda n: (pool[n]["val"]["forget_quality"]["mean"], pool[n]["val"]["model_utility"]["mean"]))
    return {"method": best, "within_utility": bool(ok), "utility_floor": floor, "on": "val"}


def verify_tofu(
    cfg: RunConfig, model_path: str, adapter: str | None, out: str | Path, overwrite: bool, ident: dict[str, Any]
) -> dict[str, Any]:
    """``rapidun verify --config tofu``: score one model (``model_path`` [+ ``adapter``], e.g. a cell's
    ``cells/<method>_seed<s>/adapter`` on the full model) on the TOFU split against the retain model, then run
    ``verify.attacks`` that apply (quantize, relearn; membership is in the scores). Writes ``verification.json``
    and ``verification.md``; prints the markdown."""
    from rapidun.finetune import finetune
    from rapidun.models import with_adapter
    from rapidun.run_folder import finite_json, mark_complete, prepare_out

    out = prepare_out(out, cfg, overwrite, "verify", ident)
    parts = build_tofu(cfg.scenario.forget_split, cfg.scenario.seed)
    sets = eval_sets(parts)
    ret = finetune(parts["retain_train"], cfg.model, cfg.sft, "tofu_retain_train")
    rmodel, rtok, _ = load_model(ret["path"], cfg.model.device, cfg.model.dtype)
    ref = model_stats(rmodel, rtok, sets, cfg, "eval:retain")
    del rmodel
    model, tok, _ = load_model(with_adapter(model_path, adapter), cfg.model.device, cfg.model.dtype)
    st = model_stats(model, tok, sets, cfg, "eval:model")
    doc: dict[str, Any] = {
        "schema": "rapidun.tofu_verify/1",
        "model": {"path": model_path, "adapter": adapter},
        "split": cfg.scenario.forget_split,
        "scores": {h or "all": scores(st, ref, h) for h in (*HALVES, None)},
    }
    doc.update(attacks(model, tok, parts, sets, cfg, ref, "model"))
    t = doc["scores"]["test"]
    lines = [
        f"# TOFU verification ({doc['split']}, test half)",
        "",
        "| | forget quality | forget prob | forget ROUGE |",
        "|---|---|---|---|",
        f"| as given | {t['forget_quality']:.3g} | {t['forget_prob']:.3f} | {t['forget_rouge']:.3f} |",
    ]
    for bits, q in doc.get("quantize", {}).items():
        lines.append(f"| int{bits} | {q['forget_quality']:.3g} | {q['forget_prob']:.3f} | {q['forget_rouge']:.3f} |")
    if "relearn" in doc:
        q = doc["relearn"]
        lines.append(
            f"| after relearning ({q['k']} QA, {q['steps']} steps) | {q['forget_quality']:.3g} | "
            f"{q['forget_prob']:.3f} | {q['forget_rouge']:.3f} |"
        )
    lines += [
        "",
        f"Model utility {t['model_utility']:.3f}; membership AUC Min-K% {t['mink_auc']:.3f} (retain model "
        f"{t['mink_auc'] - t['mink_auc_gap']:.3f}), Min-K%++ {t['minkpp_auc']:.3f} (retain model "
        f"{t['minkpp_auc'] - t['minkpp_auc_gap']:.3f}).",
        "Verdict: "
        + (
            "forget quality stays >= 0.01 after relearning."
            if doc.get("relearn", {}).get("forget_quality", 0.0) >= 0.01
            else "relearning brings the authors back (forget quality < 0.01 after it)."
            if "relearn" in doc
            else "relearning not run (verify.attacks)."
        ),
    ]
    md = "\n".join(lines) + "\n"
    write_json(out / "verification.json", finite_json(doc))
    from rapidun.io import write_text

    write_text(out / "verification.md", md)
    mark_complete(out)
    print(md)
    return doc
