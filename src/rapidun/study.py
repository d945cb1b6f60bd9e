"""``rapidun study``: scenarios × methods (a method plus overrides) × seeds, to settle "does weighting help here".

A study file (YAML)::

    study:                       # every key optional
      reference: uniform         # every other method is paired against it
      n_seeds: 5                 # seed j: unlearn.seed + j, influence.seed + j (as `rapidun compare`)
      ppl_factor: 1.10           # matched utility: val clean perplexity ≤ factor × the poisoned model's
      n_boot: 2000
      select_on: asr             # or relearn: choose on the ASR left after a relearning attack (below)
      verify_seeds: 3            # relearn: the first N seeds of each label are attacked (≤ n_seeds)
      verify_attacks: [relearn, forget_quality]   # relearn: the finalists' test battery
    scenarios:                   # each a run config (path relative to the study file) plus overrides
      - {name: demo, config: ../src/rapidun/configs/demo.yaml, overrides: [scenario.splits.val_seen_trig=80]}
    methods:                     # a registered name, or a label with a method and overrides
      - uniform
      - {label: rapidun_t2, method: rapidun, overrides: [weighting.tau_forget=2.0]}

Each scenario is an ordinary run folder ``OUT/<scenario>/`` (scenario, cached SFT models, evaluations) and each
(label, seed) an ordinary resumable cell of :func:`rapidun.compare.run_cell`, so a killed study resumes.
Selection is made on validation only: per scenario the label with the lowest mean ``val_asr_trig`` among those
whose mean validation clean perplexity stays within ``ppl_factor`` × the poisoned model's. Test figures are
reported for every label, paired against the reference with bootstrap CIs and prompt-level sign-flip p-values,
Holm-adjusted over the labels of a (scenario, split, metric) family.

``select_on: relearn`` chooses on removal rather than on hiding (:mod:`rapidun.study_robust`): every label's first
``verify_seeds`` seeds get the verification battery's relearning attack on the validation prompts (trained on the
validation half of the relearning pool), the label with the lowest mean validation seen+OOD ASR *after the attack*
within the same perplexity limit is selected, and the finalists (selected and reference) get the test battery
(``verify_attacks``, the other half of the pool) with ``poisoned`` and ``retrain``, plus a paired test of the
per-prompt hits after the attack. ``study.json`` then holds ``robust`` per scenario; every other key is as with
``select_on: asr``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rapidun.compare import aggregate, paired_tests, run_cell, seed_config, views_provider
from rapidun.config import UTILITY_BUDGET, RunConfig, apply_overrides, from_dict, load_config, to_dict, yaml_load
from rapidun.errors import RapidunError
from rapidun.io import stable_hash, write_json
from rapidun.methods import get_method
from rapidun.pipeline import stage_base
from rapidun.run_folder import claim_out, finite_json
from rapidun.stats import holm
from rapidun.study_robust import check_pools, check_scenario, check_settings, run_robust, selection_info

SCHEMA = "rapidun.study/1"
METHOD_SECTIONS = ("unlearn", "weighting", "influence")  # what a method entry may override
METRICS = ("asr_trig", "asr_seen", "asr_ood")  # paired metrics, on each split
TEST_KEYS = {"asr_seen": "asr_seen", "asr_ood": "asr_ood", "asr_trig": "asr_trig", "false_trigger": "false_trigger",
             "clean_ppl": "clean_ppl", "rouge_l": "rouge_l"}  # fmt: skip
VAL_KEYS = {"asr_seen": "val_asr_seen", "asr_ood": "val_asr_ood", "asr_trig": "val_asr_trig",
            "clean_ppl": "val_clean_ppl"}  # fmt: skip


@dataclass
class StudyScenario:
    name: str
    config: str
    overrides: list = field(default_factory=list)


@dataclass
class StudyMethod:
    label: str
    method: str
    overrides: list = field(default_factory=list)


@dataclass
class StudySettings:
    reference: str = "uniform"
    n_seeds: int = 5
    ppl_factor: float = UTILITY_BUDGET
    n_boot: int = 2000
    select_on: str = "asr"  # "asr": validation ASR; "relearn": validation ASR after the relearning attack
    verify_seeds: int = 3  # relearn: the first N seeds of each label are attacked on validation (≤ n_seeds)
    verify_attacks: list = field(default_factory=lambda: ["relearn", "forget_quality"])  # relearn: finalists' test
    verify_test: str = "finalists"  # relearn: the test battery on the finalists, or on "all" attacked labels (report)


@dataclass
class StudySpec:
    path: Path
    settings: StudySettings
    scenarios: list[StudyScenario]
    methods: list[StudyMethod]


def _label_ok(s: str) -> bool:
    return bool(s) and all(c.isalnum() or c in "_-." for c in s)


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file (module docstring); every scenario config is loaded here, so a bad file
    fails before any work."""
    path = Path(path)
    if not path.is_file():
        raise RapidunError(f"study file {path} does not exist; see configs/study.yaml for an example")
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RapidunError(f"study file {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RapidunError(f"study file {path}: expected a mapping with 'scenarios' and 'methods'")
    unknown = sorted(set(data) - {"study", "scenarios", "methods"})
    if unknown:
        raise RapidunError(f"study file {path}: unknown key(s) {unknown}; valid keys: methods, scenarios, study")
    settings = from_dict(StudySettings, data.get("study"), f"{path}: study")
    if settings.n_seeds < 1 or settings.n_boot < 1 or settings.ppl_factor <= 0:
        raise RapidunError(f"{path}: study.n_seeds and n_boot must be >= 1 and ppl_factor > 0")
    check_settings(settings, path)
    for key in ("scenarios", "methods"):
        if not isinstance(data.get(key) or [], list):
            raise RapidunError(f"study file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
    scen = []
    for i, s in enumerate(data.get("scenarios") or []):
        _require(s, ("name", "config"), f"{path}: scenarios[{i}]")
        sc = from_dict(StudyScenario, s, f"{path}: scenarios[{i}]")
        if not _label_ok(sc.name):
            raise RapidunError(f"{path}: scenarios[{i}].name {sc.name!r}: use letters, digits, '_', '-', '.'")
        scen.append(sc)
    meths = []
    for i, m in enumerate(data.get("methods") or []):
        if isinstance(m, str):
            m = {"label": m, "method": m}
        elif isinstance(m, dict) and "label" not in m and "method" in m:
            m = {**m, "label": m["method"]}
        _require(m, ("method",), f"{path}: methods[{i}]")
        sm = from_dict(StudyMethod, m, f"{path}: methods[{i}]")
        if not _label_ok(sm.label):
            raise RapidunError(f"{path}: methods[{i}].label {sm.label!r}: use letters, digits, '_', '-', '.'")
        try:
            kind = get_method(sm.method).kind
        except RapidunError as e:
            raise RapidunError(f"{path}: methods[{i}] ({sm.label}): {e}") from None
        bad = [o for o in sm.overrides if str(o).split("=", 1)[0].split(".", 1)[0] not in METHOD_SECTIONS]
        if bad:
            raise RapidunError(
                f"{path}: methods[{i}] ({sm.label}): override(s) {bad} change the scenario, model or evaluation, "
                f"which every label shares; a method may override only {', '.join(METHOD_SECTIONS)} "
                "(put other changes in a scenario's overrides)"
            )
        if kind == "retrain":
            raise RapidunError(f"{path}: methods[{i}]: 'retrain' is each scenario's reference model, not a method")
        meths.append(sm)
    if not scen or not meths:
        raise RapidunError(f"{path}: a study needs at least one scenario and one method")
    for what, names in (("scenario name", [s.name for s in scen]), ("method label", [m.label for m in meths])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RapidunError(f"{path}: duplicate {what}(s) {dup}")
    if settings.reference not in [m.label for m in meths]:
        raise RapidunError(f"{path}: study.reference {settings.reference!r} is not one of the method labels")
    spec = StudySpec(path, settings, scen, meths)
    for sc in scen:  # fail now on a bad config or override, not after an hour of work
        try:
            base = scenario_config(spec, sc)
        except RapidunError as e:
            raise RapidunError(f"{path}: scenario {sc.name}: {e}") from None
        if settings.select_on == "relearn":
            check_scenario(base, f"{path}: scenario {sc.name}")
        for i, m in enumerate(meths):
            try:
                with_overrides(base, m.overrides, "overrides")
            except RapidunError as e:
                raise RapidunError(f"{path}: methods[{i}] ({m.label}): {e}") from None
    return spec


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if isinstance(entry, dict):
        missing = [k for k in keys if k not in entry]
        if missing:
            raise RapidunError(f"{where}: missing required key(s) {missing}")


def scenario_config(spec: StudySpec, sc: StudyScenario) -> RunConfig:
    """The scenario's run config (its path is relative to the study file)."""
    p = Path(sc.config)
    p = p if p.is_absolute() else spec.path.parent / p
    return load_config(p, list(sc.overrides))


def with_overrides(cfg: RunConfig, overrides: list[str], where: str = "method overrides") -> RunConfig:
    """``cfg`` with dotted overrides applied, validated as a whole config: types (:func:`from_dict`) and every
    field's range and relation (:func:`rapidun.config_checks.validate`), so ``unlearn.lr=-1`` fails here."""
    if not overrides:
        return cfg
    from rapidun.config_checks import validate

    return validate(from_dict(RunConfig, apply_overrides(to_dict(cfg), list(overrides)), where), where)


def _split_stats(agg: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    return {
        "mean": {k: agg["mean"].get(src) for k, src in keys.items()},
        "std": {k: agg["std"].get(src) for k, src in keys.items()},
    }


def _model_stats(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "val": {k: r.get(src) for k, src in VAL_KEYS.items()},
        "test": {k: r.get(src) for k, src in TEST_KEYS.items()},
    }


def tests_by_split(raw: dict[str, Any]) -> dict[str, Any]:
    """Paired tests (``compare.paired_tests``) regrouped as ``{split: {label: {metric: {...}}}}`` with Holm p."""
    out: dict[str, Any] = {"val": {}, "test": {}}
    for split, prefix in (("val", "val_"), ("test", "")):
        for label, t in raw.items():
            out[split][label] = {}
            for metric in METRICS:
                r = t.get(prefix + metric)
                if r is None:
                    continue
                b = r["bootstrap"]
                out[split][label][metric] = {
                    "diff": b["diff"],
                    "ci_low": b["ci_low"],
                    "ci_high": b["ci_high"],
                    "p": r["prompt_test"]["p"],
                    "p_mcnemar": r["mcnemar"]["p"],
                    "p_holm": None,
                    "n_prompts": b["n_prompts"],
                    "n_seeds": b["n_seeds"],
                    "only_ref": r["mcnemar"]["only_a"],
                    "only_method": r["mcnemar"]["only_b"],
                }
        for metric in METRICS:  # Holm over the labels of this (split, metric) family
            labels = [lab for lab in out[split] if metric in out[split][lab]]
            adj = holm([out[split][lab][metric]["p"] for lab in labels])
            for lab, p in zip(labels, adj, strict=True):
                out[split][lab][metric]["p_holm"] = p
    return out


def select(
    methods: dict[str, Any], ppl_limit: float | None, reference: str | None = None,
    after: dict[str, float | None] | None = None,
) -> tuple[str | None, str]:  # fmt: skip
    """The label with the lowest mean validation ``asr_trig`` within the validation perplexity limit (a tie goes
    to ``reference``: a variant must do strictly better on validation to be chosen over it).

    ``after`` (``select_on: relearn``): ``{label: mean validation asr_trig after the relearning attack}``; that
    figure is then the one minimised, and a label without it (not attacked) cannot be selected.
    """
    ok = []
    for label, m in methods.items():
        asr, ppl = m["val"]["mean"].get("asr_trig"), m["val"]["mean"].get("clean_ppl")
        if after is not None:
            asr = after.get(label)
        if asr is None:
            continue
        if ppl_limit is not None and (ppl is None or not ppl <= ppl_limit):  # NaN fails too
            continue
        ok.append((asr, label))
    what = "validation ASR" if after is None else "validation ASR after the relearning attack"
    if not ok:
        return None, f"no label has {what} within the validation perplexity limit"
    asr = min(a for a, _ in ok)
    best = [lab for a, lab in ok if a == asr]
    label = reference if reference in best else best[0]  # a tie goes to the reference, then the first listed
    ties = [lab for lab in best if lab != label]
    what = "lowest mean validation ASR" if after is None else "lowest mean validation ASR after the relearning attack"
    return label, (
        f"{what} (seen+OOD pooled) {asr:.3f} among {len(ok)} of {len(methods)} labels within the "
        f"validation perplexity limit" + (f"; tied with {', '.join(ties)}" if ties else "")
    )


def run_scenario(spec: StudySpec, sc: StudyScenario, out: Path, overwrite: bool) -> dict[str, Any]:
    """One scenario of the study: base stages, every (label, seed) cell, aggregates, tests, selection."""
    st = spec.settings
    cfg = scenario_config(spec, sc)
    run_dir = claim_out(out / sc.name, cfg, overwrite)
    base = stage_base(cfg, run_dir)
    parts, models, det, results = base["parts"], base["models"], base["det"], base["results"]
    poisoned = models["poisoned"]["path"]
    if st.select_on == "relearn":  # both attack halves big enough, before any unlearning
        check_pools(parts, det, cfg)
    before: dict[str, Any] = {}
    cells: dict[str, dict[str, Any]] = {m.label: {} for m in spec.methods}
    files: dict[str, list[Path]] = {m.label: [] for m in spec.methods}
    for j in range(st.n_seeds):
        providers: dict[str, Any] = {}
        for m in spec.methods:
            scfg = seed_config(with_overrides(cfg, m.overrides), j)
            seed = scfg.unlearn.seed
            # Views depend on the influence, weighting-free settings only; share them when those are unchanged.
            ikey = stable_hash([to_dict(scfg.influence), scfg.unlearn.ascent_alpha, scfg.unlearn.descent_beta], 8)
            if ikey not in providers:
                sub = "influence" if not providers else f"influence-{ikey}"
                providers[ikey] = views_provider(poisoned, parts, scfg, run_dir / "seeds" / str(seed) / sub, {})
            cells[m.label][str(seed)] = run_cell(
                scfg, run_dir, m.method, seed, parts, poisoned, det, providers[ikey], before, label=m.label
            )
            files[m.label].append(run_dir / "seeds" / str(seed) / "eval" / f"{m.label}.generations.jsonl")
    methods: dict[str, Any] = {}
    for m in spec.methods:
        agg = aggregate(cells[m.label], get_method(m.method).summary)
        methods[m.label] = {
            "method": m.method,
            "overrides": list(m.overrides),
            "n_seeds": agg["n_seeds"],
            "val": _split_stats(agg, VAL_KEYS),
            "test": _split_stats(agg, TEST_KEYS),
            "diagnostics": agg["diagnostics"],
            "by_family": agg["by_family"],
            "time_s": agg["mean"].get("time_s"),
        }
    metrics = tuple(p + k for p in ("", "val_") for k in METRICS)
    tests = tests_by_split(paired_tests(parts, files, st.reference, st.n_boot, metrics))
    pm = _model_stats(results["poisoned"])
    limits = {s: (st.ppl_factor * pm[s]["clean_ppl"] if pm[s]["clean_ppl"] else None) for s in ("val", "test")}
    robust = None
    if st.select_on == "relearn":
        labels = {m.label: (m.method, list(cells[m.label])[: st.verify_seeds]) for m in spec.methods}
        robust = run_robust(
            st, cfg, run_dir, base, labels, lambda after: select(methods, limits["val"], st.reference, after)
        )
        selected, reason = robust.pop("selected"), robust.pop("reason")
    else:
        selected, reason = select(methods, limits["val"], st.reference)
    rm = _model_stats(results["retrain"]) | {"train_time_s": results["retrain"].get("train_time_s")}
    entry = {
        "config": str(sc.config),
        "overrides": list(sc.overrides),
        "run_dir": str(run_dir),
        "sizes": base["manifest"]["sizes"],
        "models": {"poisoned": pm, "retrain": rm},
        "ppl_limit": limits,
        "methods": methods,
        "tests": tests,
        "selected": selected,
        "selected_reason": reason,
        "seeds": [seed_config(cfg, j).unlearn.seed for j in range(st.n_seeds)],
    }
    return entry if robust is None else entry | {"robust": robust}


def _verdict(t: dict[str, Any], ppl: float | None, lim: float | None, robust: bool) -> str:
    """What a paired test result says (Holm p < 0.05), utility (the test perplexity limit) included."""
    significant = t["p_holm"] is not None and t["p_holm"] < 0.05
    sig = significant and t["diff"] < 0
    within = lim is not None and ppl is not None and ppl <= lim
    asr = "ASR after the attack" if robust else "ASR"
    why = "" if robust else " (validation chose it for its perplexity)"
    return (
        f"a lower {asr} than the reference at matched utility."
        if sig and within
        else f"a lower {asr}; utility not checked (no perplexity limit)."
        if sig and lim is None
        else f"a lower {asr}, but over the perplexity limit."
        if sig
        else f"a significantly higher {asr} than the reference{why}."
        if significant and t["diff"] > 0
        else "not a significant difference from the reference."
    )


def decision(study: dict[str, Any]) -> str:
    """A neutral summary of the selected label per scenario against the reference, on the test prompts.

    A ``select_on: relearn`` scenario (``robust`` in its entry) says so: the choice was made on the validation ASR
    after the relearning attack, and the test comparison is the paired one after the same attack on the test half
    of the relearning pool (``robust.test_tests``).
    """
    ref = study["reference"]
    lines = []
    for name, sc in study["scenarios"].items():
        sel = sc["selected"]
        robust = "robust" in sc
        who = "validation on the ASR after the relearning attack selects" if robust else "validation selects"
        if sel is None:
            lines.append(f"{name}: nothing selected ({sc['selected_reason']}).")
            continue
        if sel == ref:
            other = "no other label" if robust else "no weighted variant"
            lines.append(f"{name}: {who} the reference {ref} itself; {other} is chosen.")
            continue
        if robust:
            t = (sc["robust"].get("test_tests") or {}).get(sel, {}).get("asr_after")
        else:
            t = sc["tests"]["test"].get(sel, {}).get("asr_trig")
        ppl = sc["methods"][sel]["test"]["mean"].get("clean_ppl")
        lim = sc["ppl_limit"]["test"]
        if t is None:
            lines.append(f"{name}: {who} {sel}; no paired test result.")
            continue
        p_s = "–" if t["p_holm"] is None else f"{t['p_holm']:.3g}"
        ppl_s = "–" if ppl is None else f"{ppl:.2f}"
        lim_s = "none" if lim is None else f"{lim:.2f}"
        where = "after the same attack (test half of the relearning pool) " if robust else ""
        lines.append(
            f"{name}: {who} {sel}; on the test prompts {where}its seen+OOD ASR minus {ref}'s is "
            f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], Holm-adjusted p {p_s} (prompt-level "
            "sign-flip), "
            f"test clean perplexity {ppl_s} (limit {lim_s}): {_verdict(t, ppl, lim, robust)}"
        )
    return " ".join(lines)


def run_study(
    path: str | Path, out: str | Path, overwrite: bool = False, only: list[str] | None = None
) -> dict[str, Any]:
    """Run (or resume) the study of ``path`` into ``out``; writes ``study.json``, ``study.md``, ``study.html``.

    ``only``: run just these scenarios (names from the study file); the report then covers only them.
    """
    spec = load_study(path)
    if only:
        names = [s.name for s in spec.scenarios]
        bad = [n for n in only if n not in names]
        if bad:
            raise RapidunError(f"--only {bad}: not a scenario of {path}; its scenarios: {names}")
        spec = dataclasses.replace(spec, scenarios=[s for s in spec.scenarios if s.name in only])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = spec.settings
    study: dict[str, Any] = {
        "schema": SCHEMA,
        "study_file": str(spec.path),
        "only": list(only) if only else None,
        "reference": st.reference,
        "seeds": None,
        "selection": {
            "metric": "asr_trig",
            "split": "val",
            "ppl_factor": st.ppl_factor,
            "rule": f"lowest mean validation ASR (seen+OOD pooled) among the labels whose mean validation clean "
            f"perplexity is at most {st.ppl_factor:g} x the poisoned model's; test prompts are only reported",
        }
        if st.select_on == "asr"
        else selection_info(st),
        "scenarios": {},
    }
    for sc in spec.scenarios:
        study["scenarios"][sc.name] = run_scenario(spec, sc, out, overwrite)
    study["seeds"] = next(iter(study["scenarios"].values()))["seeds"]  # each scenario also lists its own
    study["decision"] = decision(study)
    from rapidun.distributed import is_main

    if is_main():
        write_json(out / "study.json", finite_json(study))
        from rapidun.reporting.study_report import render_study

        study["files"] = {k: str(v) for k, v in render_study(out).items()}
    return study
