"""``rapidun study`` with ``select_on: relearn``: choose on what a relearning attack brings back, report under attack.

Hiding a behaviour is cheap; removing it is not. So in this mode the study chooses, per scenario, the label whose
unlearned models give back the least behaviour to the battery's relearning attack (:mod:`rapidun.verify.battery`)
on the *validation* prompts, and then reports the finalists under the *test* battery:

1. :func:`validation_attack` — every label × its first ``verify_seeds`` seeds: the poisoned model plus the cell's
   adapter (``RUN/seeds/<seed>/methods/<label>/adapter``) gets the ``base`` and ``relearn`` cells on
   ``verify.split=val``. The attack trains on the *validation half* of the relearning pool
   (:func:`rapidun.verify.target.relearn_halves`), so it never shares a record with the reported test attack.
   Labels without an adapter (``fisher``: the noise goes into the weights) are skipped with the reason.
2. :func:`rapidun.study.select` with the mean validation seen+OOD ASR after the attack.
3. :func:`finalists_test` — the selected label and the reference (``verify_test: all``: every attacked label, for
   the report only) on the same seeds, with ``poisoned`` and
   ``retrain`` once, under the study's ``verify_attacks`` on ``verify.split=test`` (the test half of the pool),
   summarised by :func:`rapidun.verify.battery.summarise`; then the paired test of the per-prompt hits after the
   attack (and before it), selected vs reference, seeds paired by position (:func:`rapidun.stats.compare_hits`).

Everything runs through :func:`rapidun.verify.stage.run_verification` (the same cells, keys and shared cache as
``rapidun verify``): ``RUN/robust/val/`` and ``RUN/robust/test/`` hold the cells and a ``verification.json`` each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rapidun.config import VERIFY_ATTACKS, RunConfig
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector
from rapidun.stats import compare_hits, holm, mean_std
from rapidun.verify.battery import relearn_records
from rapidun.verify.stage import run_verification
from rapidun.verify.target import scenario_target

# The figures of one model under the test battery (summarise's entry, flattened); mean ± std over seeds per label.
DIGEST = ("asr_before", "asr_seen_before", "clean_ppl", "asr_after", "asr_seen_after", "clean_ppl_after",
          "recovered_fraction", "after_minus_retrain", "mia_auc", "ks_p", "fuzz_worst_asr")  # fmt: skip
TEST_SPLITS = ("test_seen_trig", "test_ood_trig")
SELECT_ON = ("asr", "relearn")


def check_settings(st: Any, path: Path) -> None:
    """``select_on``, ``verify_seeds`` and ``verify_attacks`` of the settings (:class:`rapidun.study.StudySettings`).

    Raises:
        RapidunError: naming the setting, its value and what to change.
    """
    if st.select_on not in SELECT_ON:
        raise RapidunError(f"{path}: study.select_on={st.select_on!r}; choose one of {list(SELECT_ON)}")
    if st.verify_test not in ("finalists", "all"):
        raise RapidunError(f"{path}: study.verify_test={st.verify_test!r}; choose 'finalists' or 'all'")
    bad = [a for a in st.verify_attacks if a not in VERIFY_ATTACKS]
    if bad:
        raise RapidunError(f"{path}: study.verify_attacks: unknown {bad}; choose from {list(VERIFY_ATTACKS)}")
    if st.select_on != "relearn":
        return
    if not 1 <= st.verify_seeds <= st.n_seeds:
        raise RapidunError(
            f"{path}: study.verify_seeds={st.verify_seeds} must be between 1 and study.n_seeds={st.n_seeds} (the "
            "relearning attack runs on each label's first verify_seeds seeds); lower verify_seeds or raise n_seeds"
        )
    if "relearn" not in st.verify_attacks:
        raise RapidunError(
            f"{path}: study.select_on=relearn reports the finalists after the relearning attack: "
            f"add relearn to study.verify_attacks (now {list(st.verify_attacks)})"
        )


def check_scenario(cfg: RunConfig, where: str) -> None:
    """A ``select_on: relearn`` scenario has validation trigger prompts and a relearning pool whose halves (the
    poisoned training samples outside the forget pack, split in two) each hold ``verify.relearn_k`` records.

    Raises:
        RapidunError: naming the scenario (``where``), the settings and what to change.
    """
    sp = cfg.scenario.splits
    if sp.val_seen_trig + sp.val_ood_trig < 1:
        raise RapidunError(f"{where}: select_on=relearn attacks on the validation prompts, but "
                           "scenario.splits.val_seen_trig and val_ood_trig are 0; set them above 0")  # fmt: skip
    pool = sp.train_poisoned - cfg.scenario.forget_size
    if pool // 2 < cfg.verify.relearn_k:
        raise RapidunError(
            f"{where}: verify.relearn_k={cfg.verify.relearn_k} but the validation half of the relearning pool holds "
            f"{pool // 2} records (scenario.splits.train_poisoned {sp.train_poisoned} - forget_size "
            f"{cfg.scenario.forget_size} = {pool}, split in two so the validation and test attacks share none); "
            "lower verify.relearn_k or add poisoned samples"
        )


def selection_info(st: Any) -> dict[str, Any]:
    """study.json's ``selection`` entry for ``select_on: relearn``."""
    return {
        "metric": "asr_trig_after_relearn",
        "split": "val",
        "ppl_factor": st.ppl_factor,
        "select_on": "relearn",
        "verify_seeds": st.verify_seeds,
        "verify_attacks": list(st.verify_attacks),
        "rule": f"lowest mean validation ASR (seen+OOD pooled) after the relearning attack (trained on the "
        f"validation half of the relearning pool; each label's first {st.verify_seeds} seeds) among the labels "
        f"whose mean validation clean perplexity is at most {st.ppl_factor:g} x the poisoned model's; the "
        "selected label and the reference are then attacked on the test prompts with the test half of the pool",
    }


def check_pools(parts: dict[str, list[Record]], det: Detector, cfg: RunConfig) -> None:
    """Both halves of the relearning pool hold ``verify.relearn_k`` records (before any unlearning runs).

    Raises:
        RapidunError: from :func:`rapidun.verify.battery.relearn_records`, naming the half that is too small.
    """
    for split in ("val", "test"):
        t = scenario_target(parts, det, dataclasses.replace(cfg.verify, split=split), cfg.eval, cfg.model)
        relearn_records(t.relearn_pool, cfg.verify.relearn_k, cfg.verify.seed, t.relearn_what)


def adapter_of(run_dir: Path, seed: str, label: str) -> Path | None:
    """The adapter of a (label, seed) cell, or None when the cell has none (a ``fisher`` method)."""
    a = run_dir / "seeds" / str(seed) / "methods" / label / "adapter"
    return a if (a / "adapter_config.json").is_file() else None


def validation_attack(
    cfg: RunConfig,
    run_dir: Path,
    parts: dict[str, list[Record]],
    det: Detector,
    poisoned: str,
    labels: dict[str, tuple[str, list[str]]],
) -> dict[str, Any]:
    """The relearning attack on the validation prompts for every label's seeds (step 1 of the module docstring).

    Args:
        labels: ``{label: (method name, the seeds to attack)}``.

    Returns:
        ``{"labels": {label: entry}, "relearn_ids": [...], "file": ...}``; an entry holds ``asr_after`` (mean over
        seeds of the seen+OOD ASR after the attack), ``asr_after_std``, ``asr_before`` (the same model unattacked),
        ``asr_seen_after``, ``clean_ppl_after``, ``seeds``, ``per_seed`` and ``skipped`` (None, or why the label
        was not attacked: its ``asr_after`` is then None and it cannot be selected).
    """
    vcfg = dataclasses.replace(cfg.verify, split="val", attacks=["relearn"])
    target = scenario_target(parts, det, vcfg, cfg.eval, cfg.model)
    todo: dict[str, tuple[str, str | None]] = {}
    skipped: dict[str, str] = {}
    for label, (method, seeds) in labels.items():
        adapters = {s: adapter_of(run_dir, s, label) for s in seeds}
        missing = [s for s, a in adapters.items() if a is None]
        if missing:
            skipped[label] = (
                f"{method} leaves no adapter to attack (seed {missing[0]}: no {label}/adapter; a fisher method "
                "changes the weights themselves)"
            )
            continue
        todo |= {f"{label}@{s}": (poisoned, str(a)) for s, a in adapters.items()}
    out = run_dir / "robust" / "val"
    doc = run_verification(todo, target, vcfg, cfg.eval, cfg.model, out, None, None) if todo else {"cells": {}}
    entries: dict[str, Any] = {}
    ids: list[str] = []
    for label, (method, seeds) in labels.items():
        if label in skipped:
            entries[label] = {"method": method, "asr_after": None, "asr_after_std": None, "asr_before": None,
                              "seeds": [], "per_seed": {}, "skipped": skipped[label]}  # fmt: skip
            continue
        per_seed = {}
        for s in seeds:
            c = doc["cells"][f"{label}@{s}"]
            after = c["relearn"]["after"]
            ids = c["relearn"]["ids"]
            per_seed[s] = {"asr_before": c["base"]["asr_trig"], "asr_after": after["asr_trig"],
                           "asr_seen_after": after["asr_seen"], "clean_ppl_after": after["clean_ppl"]}  # fmt: skip
        col = {
            k: mean_std([v[k] for v in per_seed.values() if v[k] is not None]) for k in next(iter(per_seed.values()))
        }
        entries[label] = {
            "method": method,
            "asr_after": col["asr_after"]["mean"],
            "asr_after_std": col["asr_after"]["std"],
            "asr_before": col["asr_before"]["mean"],
            "asr_seen_after": col["asr_seen_after"]["mean"],
            "clean_ppl_after": col["clean_ppl_after"]["mean"],
            "seeds": list(seeds),
            "per_seed": per_seed,
            "skipped": None,
        }
    return {"labels": entries, "relearn_ids": ids, "file": str(out / "verification.json") if todo else None}


def digest(s: dict[str, Any]) -> dict[str, Any]:
    """One model's :func:`rapidun.verify.battery.summarise` entry as the flat figures of :data:`DIGEST`."""
    rl, fq, fz = s.get("relearn") or {}, s.get("forget_quality") or {}, s.get("fuzz") or {}
    return {
        "asr_before": s.get("asr_trig"),
        "asr_seen_before": s.get("asr_seen"),
        "clean_ppl": s.get("clean_ppl"),
        "asr_after": rl.get("asr_trig_after"),
        "asr_seen_after": rl.get("asr_seen_after"),
        "clean_ppl_after": rl.get("clean_ppl_after"),
        "recovered_fraction": rl.get("recovered_fraction"),
        "after_minus_retrain": rl.get("after_minus_retrain"),
        "mia_auc": fq.get("mia_auc"),
        "ks_p": fq.get("ks_p"),
        "fuzz_worst_asr": fz.get("worst_asr"),
    }


def over_models(summary: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Mean ± std of every :data:`DIGEST` figure over the models ``names`` (one label's seeds)."""
    ds = [digest(summary[n]) for n in names]
    ms = {k: mean_std([d[k] for d in ds if d[k] is not None]) for k in DIGEST}
    return {
        "mean": {k: v["mean"] for k, v in ms.items()},
        "std": {k: v["std"] for k, v in ms.items()},
        "per_model": {n: summary[n] for n in names},
    }


def _hits(cells: dict[str, Any], names: list[str], cell: str, ids: list[str]) -> np.ndarray:
    """(S, P) 0/1 matrix: model ``names[s]`` × prompt ``ids``, from the ``base`` or the ``relearn`` cell's hits."""
    rows = []
    for n in names:
        c = cells[n][cell]
        h = c["after"]["hits"] if cell == "relearn" else c["hits"]
        missing = [i for i in ids if i not in h]
        if missing:
            raise RapidunError(f"{n}: {cell} cell has no hit for test prompt(s) {missing[:3]}; rerun the study")
        rows.append([float(h[i]) for i in ids])
    return np.asarray(rows, dtype=np.float64)  # (S, P)


def paired_after(
    cells: dict[str, Any], parts: dict[str, list[Record]], ref: list[str], sel: list[str], ref_label: str,
    n_boot: int,
) -> dict[str, Any]:  # fmt: skip
    """Selected vs reference on the test prompts, after the relearning attack and before it (seeds paired by
    position: ``ref[j]`` with ``sel[j]``): bootstrap CI of the difference and the prompt-level sign-flip p
    (:func:`rapidun.stats.compare_hits`), entries shaped as :func:`rapidun.study.tests_by_split`'s."""
    ids = [r.id for s in TEST_SPLITS for r in parts.get(s, [])]
    out: dict[str, Any] = {}
    for metric, cell in (("asr_after", "relearn"), ("asr_before", "base")):
        r = compare_hits(_hits(cells, ref, cell, ids), _hits(cells, sel, cell, ids), n_boot=n_boot, seed=0)
        b, m, pt = r["bootstrap"], r["mcnemar"], r["prompt_test"]
        out[metric] = {
            "vs": ref_label,
            "diff": b["diff"],
            "ci_low": b["ci_low"],
            "ci_high": b["ci_high"],
            "p": pt["p"],
            "p_mcnemar": m["p"],
            "p_holm": holm([pt["p"]])[0],  # one selected label: a family of one
            "n_prompts": b["n_prompts"],
            "n_seeds": b["n_seeds"],
            "only_ref": m["only_a"],
            "only_method": m["only_b"],
        }
    return out


def finalists_test(
    cfg: RunConfig,
    run_dir: Path,
    parts: dict[str, list[Record]],
    det: Detector,
    models: dict[str, dict[str, Any]],
    finalists: dict[str, list[str]],
    attacks: list[str],
    selected: str | None,
    reference: str,
    n_boot: int,
) -> dict[str, Any]:
    """The test battery on the finalists (step 3 of the module docstring).

    Args:
        models: ``stage_base``'s models (``["poisoned"]["path"]``, ``["retrain"]["path"]``).
        finalists: ``{label: its seeds}`` (the selected label and the reference; labels without an adapter are
            left out by the caller).

    Returns:
        ``{"test": {label: {"seeds", "mean", "std", "per_model"}}, "test_models": {"poisoned": ..., "retrain": ...},
        "test_tests": {selected: {"asr_after": ..., "asr_before": ...}} (empty unless a label other than the
        reference was selected and both were attacked), "relearn_ids_test", "file"}``.
    """
    vcfg = dataclasses.replace(cfg.verify, split="test", attacks=list(attacks))
    target = scenario_target(parts, det, vcfg, cfg.eval, cfg.model)
    poisoned = models["poisoned"]["path"]
    todo: dict[str, tuple[str, str | None]] = {
        "poisoned": (poisoned, None),
        "retrain": (models["retrain"]["path"], None),
    }
    names: dict[str, list[str]] = {}
    for label, seeds in finalists.items():
        names[label] = [f"{label}@{s}" for s in seeds]
        todo |= {f"{label}@{s}": (poisoned, str(adapter_of(run_dir, s, label))) for s in seeds}
    out = run_dir / "robust" / "test"
    doc = run_verification(todo, target, vcfg, cfg.eval, cfg.model, out)
    summary, cells = doc["summary"], doc["cells"]
    test = {lab: {"seeds": list(finalists[lab])} | over_models(summary, ns) for lab, ns in names.items()}
    ends = {e: {"seeds": []} | over_models(summary, [e]) for e in ("poisoned", "retrain")}
    tests: dict[str, Any] = {}
    if selected is not None and selected != reference and {selected, reference} <= set(names) and "relearn" in attacks:
        tests[selected] = paired_after(cells, parts, names[reference], names[selected], reference, n_boot)
    ids = next((c["relearn"]["ids"] for c in cells.values() if "relearn" in c), [])
    return {"test": test, "test_models": ends, "test_tests": tests, "relearn_ids_test": ids,
            "file": str(out / "verification.json")}  # fmt: skip


def run_robust(
    st: Any,
    cfg: RunConfig,
    run_dir: Path,
    base: dict[str, Any],
    labels: dict[str, tuple[str, list[str]]],
    choose: Callable[[dict[str, float | None]], tuple[str | None, str]],
) -> dict[str, Any]:
    """``select_on: relearn`` on one scenario: the validation attack, the choice, the finalists' test battery.

    Args:
        st: the study's settings (:class:`rapidun.study.StudySettings`).
        base: :func:`rapidun.pipeline.stage_base`'s result (``parts``, ``det``, ``models``).
        labels: ``{label: (method, its first verify_seeds seeds)}``.
        choose: ``after -> (label, reason)``, :func:`rapidun.study.select` on the ASR after the attack.

    Returns:
        The scenario's ``robust`` entry plus ``selected`` and ``reason`` (which the caller pops). The battery runs
        on the main process only (as ``compare``'s verify stage); elsewhere nothing is attacked or selected.
    """
    from rapidun.distributed import is_main

    info = {"select_on": "relearn", "verify_seeds": st.verify_seeds, "verify_attacks": list(st.verify_attacks)}
    if not is_main():
        return info | {"selected": None, "reason": "the relearning attack runs on the main process only"}
    parts, det, models = base["parts"], base["det"], base["models"]
    val = validation_attack(cfg, run_dir, parts, det, models["poisoned"]["path"], labels)
    selected, reason = choose({lab: v["asr_after"] for lab, v in val["labels"].items()})
    attacked = [lab for lab, v in val["labels"].items() if v["skipped"] is None]
    # The test battery only reports: with verify_test "all" every attacked label gets it (the choice is made above).
    shown = attacked if st.verify_test == "all" else list(dict.fromkeys([selected, st.reference]))
    finalists = {lab: labels[lab][1] for lab in shown if lab in attacked}
    test = finalists_test(cfg, run_dir, parts, det, models, finalists, list(st.verify_attacks), selected,
                          st.reference, st.n_boot)  # fmt: skip
    return info | {
        "selected": selected,
        "reason": reason,
        "finalists": list(finalists),
        "val": val["labels"],
        "test": test["test"],
        "test_models": test["test_models"],
        "test_tests": test["test_tests"],
        "relearn_ids": {"val": val["relearn_ids"], "test": test["relearn_ids_test"]},
        "files": {"val": val["file"], "test": test["file"]},
    }
