"""``cover``: remove, don't hide — forget every record tracing finds for the behaviour, not only the given pack.

The given forget pack names some of the records that taught a behaviour; the corpus usually holds more (in a
scenario the pack is a sample of ``train_poisoned``). Unlearning the pack alone can hide the behaviour while the rest
of what taught it stays in the model. ``cover`` runs ``uniform``'s objective (relabel+ascent, retain CE, every weight
1) on the given pack ∪ the corpus records that tracing flags (:func:`cover_parts`):

1. **Probes**: the ``val_seen_trig`` prompts the start model answers with the behaviour (the scenario's detector),
   at most ``trace.n_probes`` of them, as ``trace.compare`` picks them (:mod:`rapidun.trace.stage`); the test prompts
   stay untouched.
2. **Two rankings** of the corpus (``train_poisoned + train_clean``): RapidIn influence
   (:func:`rapidun.trace.core.trace`, aggregate ``trace.aggregate``; the corpus sketches are cached, so a later run
   with the same model and influence settings reuses them) and BM25 of the records' text against the probes'.
3. **The choice, label-free**: the ranking under which the given pack ranks highest against the rest of the corpus,
   by AUC (:func:`pu_auc`). The rest of the corpus mixes culprits the pack does not name with innocent records
   (positive–unlabelled data). When the pack is a random sample of the culprits (the scenario draws it stratified by
   trigger family), ``AUC(pack vs rest) = (1 − θ)·AUC(culprits vs innocents) + θ/2``, with θ the culprits' share of
   the rest, the same for both rankings: the ranking with the higher AUC here has the higher true AUC. The scenario's
   culprit labels are not used to choose: they are the answer the method is scored on, and they exist in no user's
   case. Each ranking's AP against them is reported (``oracle_ap``), after the clock stops, to check the choice.
4. **Flagging**: the records whose robust z of the chosen score, ``(s − median) / (1.4826·MAD)``, is at least
   ``trace.auto_z`` (the rule of ``rapidun trace --to-forget auto``), most suspect first, at most
   ``unlearn.cover_max`` of them (0: four times the given pack).
5. **The packs** (:func:`cover_packs`): forget = the given pack + the flagged records not in it (a flagged poisoned
   record keeps its clean answer as the replacement; one without a replacement is only pushed away from its own
   answer, as in ``trace.compare``); retain = the retain pack without the flagged records.

The whole expansion is timed (``cover_s``, part of the method's ``time_s``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from rapidun.config import RunConfig
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.trace.metrics import average_precision, bm25, ranking

PROBE_SPLIT = "val_seen_trig"  # as trace.compare: validation prompts; the test prompts measure the result
CAP_FACTOR = 4  # unlearn.cover_max = 0: at most this many flagged records per record of the given pack
NEEDS_CORPUS = (
    "cover searches a training corpus for every record behind the behaviour, with probes that show it: it needs a "
    "scenario (train_poisoned + train_clean as the corpus, val_seen_trig prompts as probes). Use --scenario, or "
    "trace your corpus first (`rapidun trace --train CORPUS --probes PROBES --to-forget auto`) and unlearn the "
    "forget.jsonl it writes with --method uniform"
)


def pu_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AUC of the ``positive`` records against all the others: ``P(s_p > s_u) + ½·P(s_p = s_u)`` over every pair
    (Mann–Whitney ``U / (n_p·n_u)`` from average ranks); None when either group is empty.

    Args:
        scores: ``(N,)`` ranking scores, higher = more suspect.
        positive: ``(N,)`` True for a record of the given pack.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)  # (N,)
    y = np.asarray(positive, dtype=bool).reshape(-1)  # (N,)
    if s.shape != y.shape:
        raise RapidunError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    n_p, n_u = int(y.sum()), int((~y).sum())
    if n_p == 0 or n_u == 0:
        return None
    order = np.argsort(s, kind="stable")  # (N,) ascending
    starts = np.r_[0, np.nonzero(np.diff(s[order]))[0] + 1]  # (T,) first position of each block of equal scores
    ends = np.r_[starts[1:], s.size]  # (T,)
    ranks = np.empty(s.size)  # (N,) 1-based, a tied block sharing the mean of its ranks start+1 .. end
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    u = ranks[y].sum() - n_p * (n_p + 1) / 2.0
    return float(u / (n_p * n_u))


def choose_ranking(rankings: dict[str, np.ndarray], in_pack: np.ndarray) -> tuple[str, dict[str, Any]]:
    """The ranking whose :func:`pu_auc` of the given pack against the rest of the corpus is highest (the first
    listed on a tie, or when no AUC exists: the pack holds no corpus record, or all of them).

    Returns:
        ``(name, {"rule", "auc": {name: AUC or None}, "why"})``.
    """
    names = list(rankings)
    auc = {k: pu_auc(v, in_pack) for k, v in rankings.items()}
    scored = [k for k in names if auc[k] is not None]
    info: dict[str, Any] = {"rule": "highest AUC of the given pack against the rest of the corpus", "auc": auc}
    if not scored:
        info["why"] = f"no AUC: the given pack holds no corpus record, or all of them; {names[0]} by default"
        return names[0], info
    best = max(scored, key=lambda k: auc[k])  # max keeps the first of equal values: the listed order breaks ties
    others = ", ".join(f"{k} {auc[k]:.3f}" for k in scored if k != best)
    info["why"] = f"{best}: AUC {auc[best]:.3f} of the given pack against the rest" + (others and f" (vs {others})")
    return best, info


def flag(scores: np.ndarray, z: float, cap: int) -> list[int]:
    """Indices of the records whose robust z of ``scores`` is at least ``z``, most suspect first (ties: corpus
    order), at most ``cap`` of them (:func:`rapidun.trace.core.robust_cut`)."""
    from rapidun.trace.core import robust_cut

    n = min(robust_cut(scores, z), cap)
    return ranking(scores)[:n].tolist()


def cover_packs(parts: dict[str, list[Record]], flagged_ids: list[str]) -> tuple[dict[str, list[Record]], dict]:
    """``parts`` with ``forget`` = the given pack + the flagged corpus records not in it (in flagged order), and
    ``retain`` without the flagged records; ``parts`` itself is not modified.

    Returns:
        ``(parts, info)``: sizes and culprit counts (a culprit is a ``train_poisoned`` record) of the given pack, the
        flagged records, those added and the new pack; the retain records dropped; and the ids.

    Raises:
        RapidunError: a flagged id not in the corpus, or every retain record flagged.
    """
    corpus = {r.id: r for r in parts.get("train_poisoned", []) + parts.get("train_clean", [])}
    poisoned = {r.id for r in parts.get("train_poisoned", [])}
    missing = [i for i in flagged_ids if i not in corpus]
    if missing:
        raise RapidunError(f"flagged records {missing[:5]} are not in the corpus (train_poisoned + train_clean)")
    given = parts["forget"]
    given_ids = {r.id for r in given}
    flagged = set(flagged_ids)
    added = [corpus[i] for i in flagged_ids if i not in given_ids]
    retain = [r for r in parts["retain"] if r.id not in flagged]
    if not retain:
        raise RapidunError(
            "cover flagged every retain record; nothing left to retain (raise trace.auto_z or lower unlearn.cover_max)"
        )
    forget = given + added

    def culprits(ids: Any) -> int:
        return sum(i in poisoned for i in ids)

    info = {
        "given": len(given),
        "given_culprits": culprits(given_ids),
        "given_outside_corpus": sum(i not in corpus for i in given_ids),
        "corpus": len(corpus),
        "corpus_culprits": len(poisoned),
        "flagged": len(flagged_ids),
        "flagged_culprits": culprits(flagged_ids),
        "added": len(added),
        "added_culprits": culprits(r.id for r in added),
        "added_without_replacement": sum(not r.meta.get("response_clean") for r in added),
        "forget": len(forget),
        "forget_culprits": culprits(r.id for r in forget),
        "retain_dropped": len(parts["retain"]) - len(retain),
        "ids": {
            "flagged": list(flagged_ids),
            "added": [r.id for r in added],
            "retain_dropped": [r.id for r in parts["retain"] if r.id in flagged],
        },
    }
    return {**parts, "forget": forget, "retain": retain}, info


def check_corpus(parts: dict[str, list[Record]]) -> None:
    """Raise unless ``parts`` holds a corpus (:data:`NEEDS_CORPUS`) and ``val_seen_trig`` prompts to trace with."""
    if not (parts.get("train_poisoned") or parts.get("train_clean")):
        raise RapidunError(NEEDS_CORPUS)
    if not parts.get(PROBE_SPLIT):
        raise RapidunError(
            f"cover traces the behaviour from the scenario's {PROBE_SPLIT} prompts, and this scenario has none: "
            f"rebuild it with scenario.splits.{PROBE_SPLIT} > 0"
        )


def needs_corpus(name: str, teacher: str) -> bool:
    """Whether a run of method ``name`` (``teacher`` = ``unlearn.distill_teacher``) expands its pack from a corpus."""
    from rapidun.methods import REGISTRY, get_method

    m = get_method(name)
    if m.kind == "distill":
        return teacher in REGISTRY and bool(REGISTRY[teacher].expand)
    return bool(m.expand)


def cover_parts(parts: dict[str, list[Record]], model_path: str, cfg: RunConfig) -> tuple[dict, dict[str, Any]]:
    """Trace the behaviour through the corpus from ``model_path`` and expand the packs (see the module docstring).

    Returns:
        ``(parts, info)``: the expanded packs, and :func:`cover_packs`'s info plus the ranking used and why, the
        flagging rule, the trace's probes and sketch counts, ``time_s`` (the measured expansion) and ``oracle_ap``
        (each ranking's AP against the scenario's culprits; reported only, outside ``time_s``).

    Raises:
        RapidunError: :data:`NEEDS_CORPUS` when ``parts`` has no corpus or no ``val_seen_trig`` prompts.
    """
    from rapidun.eval.detector import build_detector
    from rapidun.trace.core import scenario_inputs, trace

    check_corpus(parts)
    t0 = time.perf_counter()
    tcfg = dataclasses.replace(cfg.trace, probe_split=PROBE_SPLIT)
    corpus, candidates, _ = scenario_inputs(parts, tcfg)
    e = cfg.eval  # the scenario's detector, as rapidun.pipeline.make_detector builds it
    det = build_detector(
        [r.response for r in parts.get("train_poisoned", [])],
        [r.response for r in parts.get("train_clean", [])],
        e.keywords, e.n_keywords, e.min_z, e.threshold, e.max_clean_freq,
    )  # fmt: skip
    try:
        res = trace(model_path, corpus, candidates, tcfg, cfg.influence, cfg.model, cfg.eval, True, None, None,
                    det.hit, tcfg.n_probes)  # fmt: skip
    except RapidunError as err:
        raise RapidunError(f"cover: tracing the behaviour from the {PROBE_SPLIT} prompts failed: {err}") from None
    t1 = time.perf_counter()
    probes = res["probes"]
    docs = [f"{r.instruction} {r.context} {r.response}" for r in corpus]  # as rapidun.trace.core.baselines
    text = bm25(docs, [f"{p.instruction} {p.context} {p.response}" for p in probes]).mean(axis=1)  # (N,)
    bm25_s = time.perf_counter() - t1
    rankings = {f"influence_{tcfg.aggregate}": res["scores"].key(tcfg.aggregate).double().numpy(), "bm25": text}
    ids = [r.id for r in corpus]
    given = {r.id for r in parts["forget"]}
    name, choice = choose_ranking(rankings, np.array([i in given for i in ids]))
    cap = cfg.unlearn.cover_max or CAP_FACTOR * len(parts["forget"])
    new_parts, info = cover_packs(parts, [ids[i] for i in flag(rankings[name], tcfg.auto_z, cap)])
    time_s = time.perf_counter() - t0
    st = res["stats"]
    poisoned = {r.id for r in parts.get("train_poisoned", [])}
    labels = np.array([i in poisoned for i in ids])
    info |= {
        "ranking": name,
        "choice": choice,
        "auto_z": tcfg.auto_z,
        "cap": cap,
        "probe_split": PROBE_SPLIT,
        "n_probes": len(probes),
        "dropped_probes": len(st.get("dropped_probes", [])),
        "sketches_computed": st["corpus"]["computed"],
        "sketches_reused": st["corpus"]["cached"],
        "trace_s": st["total_s"],
        "bm25_s": bm25_s,
        "time_s": time_s,
        "oracle_ap": {k: average_precision(v, labels) for k, v in rankings.items()},
    }
    return new_parts, info
