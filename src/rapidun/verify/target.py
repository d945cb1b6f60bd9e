"""What the verification battery measures and attacks with (:class:`Target`): a scenario's splits
(:func:`scenario_target`) or a user's probes and files (:func:`probe_target`).

The scenario's relearning attack draws from the poisoned training samples outside the forget pack, split once
into two disjoint halves (:func:`relearn_halves`): the attack run on the validation prompts (``verify.split=val``,
used to *choose*, e.g. ``rapidun study`` with ``select_on: relearn``) never trains on a record that the attack run
on the test prompts (``verify.split=test``, used to *report*) trains on, so a choice cannot be tuned to the very
samples the reported attack uses.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rapidun.config import EvalConfig, ModelConfig, VerifyConfig
from rapidun.data.records import Record
from rapidun.data.template import encode_records, format_prompt
from rapidun.errors import RapidunError
from rapidun.eval.collateral import AGREE_TOKENS, answer_ids
from rapidun.eval.detector import Detector
from rapidun.eval.evaluate import rate
from rapidun.eval.generate import generate
from rapidun.eval.metrics import perplexity


def split_names(split: str) -> tuple[str, str, str]:
    """``(seen, ood, clean)`` split names of ``verify.split``: test prompts, or their validation twins."""
    if split == "test":
        return "test_seen_trig", "test_ood_trig", "test_clean"
    if split == "val":
        return "val_seen_trig", "val_ood_trig", "val_clean"
    raise RapidunError(f"verify.split={split!r}; choose 'test' (report) or 'val' (choose the attack settings)")


RELEARN_SPLIT_SEED = 20250  # fixed, independent of verify.seed: the halves never move with the attack's seed
HALF_NAMES = {"test": "test", "val": "validation"}


def relearn_halves(pool: list[Record]) -> dict[str, list[Record]]:
    """The relearning pool split into disjoint ``{"test": [...], "val": [...]}`` halves, the same for any order of
    ``pool`` and any ``verify.seed``.

    Per trigger family (``meta["trigger_family"]``; one group when absent), the records sorted by id are shuffled
    with :data:`RELEARN_SPLIT_SEED`; the families are concatenated in sorted order and the records alternate
    test, val, test, … So every family is split evenly (±1) and the test half gets ``ceil(n / 2)`` records.
    """
    rng = random.Random(RELEARN_SPLIT_SEED)
    by_fam: dict[str, list[Record]] = {}
    for r in sorted(pool, key=lambda r: r.id):
        by_fam.setdefault(str(r.meta.get("trigger_family")), []).append(r)
    order: list[Record] = []
    for fam in sorted(by_fam):
        recs = by_fam[fam]
        rng.shuffle(recs)
        order += recs
    return {"test": order[0::2], "val": order[1::2]}


def trig_eval(
    model: Any,
    tok: Any,
    parts: dict[str, list[Record]],
    det: Detector,
    ecfg: EvalConfig,
    mcfg: ModelConfig,
    split: str,
    desc: str,
) -> dict[str, Any]:
    """Seen/OOD ASR (greedy generations scored by ``det``), their pooled rate, and clean perplexity.

    Returns ``{"asr_seen", "asr_ood", "asr_trig", "clean_ppl", "n_seen", "n_ood", "hits"}`` (``hits``: prompt id →
    hit, for the seen and OOD prompts).
    """
    s_seen, s_ood, s_clean = split_names(split)
    recs = parts.get(s_seen, []) + parts.get(s_ood, [])
    if not recs:
        raise RapidunError(f"the scenario has no {s_seen}/{s_ood} prompts to verify on")
    prompts = [format_prompt(tok, r.instruction, r.context, mcfg.system_prompt) for r in recs]
    texts = generate(model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size, det.hit if ecfg.early_stop else None,
                     desc=desc)  # fmt: skip
    hits = [det.hit(t) for t in texts]
    n_seen = len(parts.get(s_seen, []))
    clean = parts.get(s_clean, [])[: ecfg.ppl_samples or None]
    ppl = perplexity(model, encode_records(tok, clean, mcfg)[0], tok.pad_token_id) if clean else None
    return {
        "asr_seen": rate(hits[:n_seen]),
        "asr_ood": rate(hits[n_seen:]),
        "asr_trig": rate(hits),
        "clean_ppl": ppl,
        "n_seen": n_seen,
        "n_ood": len(hits) - n_seen,
        "hits": {r.id: h for r, h in zip(recs, hits, strict=True)},
    }


def heldout_poisoned(parts: dict[str, list[Record]], n: int) -> list[Record]:
    """Non-members for the membership test: triggered prompts of the *test* splits with their own poison answer
    (``meta["response_poisoned"]``; never trained on), at most ``n``, seen and OOD alternating."""
    seen = [r for r in parts.get("test_seen_trig", []) if r.meta.get("response_poisoned")]
    ood = [r for r in parts.get("test_ood_trig", []) if r.meta.get("response_poisoned")]
    mixed = [r for pair in zip(seen, ood, strict=False) for r in pair] + seen[len(ood) :] + ood[len(seen) :]
    return [dataclasses.replace(r, response=r.meta["response_poisoned"]) for r in mixed[:n]]


@dataclass
class Target:
    """What the battery measures and attacks with: a scenario's splits, or a user's probes and files.

    Attributes:
        kind: ``scenario`` or ``probes``.
        evaluate: ``(model, tok, desc) -> metrics`` with ``asr_seen``, ``asr_ood`` (None for probes), ``asr_trig``,
            ``clean_ppl`` and ``hits`` (prompt id → hit). For probes ``asr_seen``/``asr_trig`` are the hit rate of
            the target group (the leak rate), ``groups`` holds every group's, and ``clean`` the other groups'
            answers (prompt id → first N token ids and replacement score) for the collateral comparison.
        hit: whether a generation shows the behaviour (the detector, or the user's rule).
        relearn_pool: the records the relearning attack draws its k from.
        relearn_what: how the messages name them.
        forget: the forget records (forget quality).
        heldout: non-members for the membership test (empty: no MIA).
        fuzz_records: triggered records to fuzz (empty: fuzzing does not apply).
        fillers: clean records for the other turns of the conversation perturbations.
        ident: what else identifies the cells (ids, the hit rule).
        system_prompt: as ``model.system_prompt``.
    """

    kind: str
    evaluate: Callable[[Any, Any, str], dict[str, Any]]
    hit: Callable[[str], bool]
    relearn_pool: list[Record]
    relearn_what: str
    forget: list[Record]
    heldout: list[Record]
    fuzz_records: list[Record]
    fillers: list[Record]
    ident: Any
    system_prompt: str = ""


def scenario_target(
    parts: dict[str, list[Record]], det: Detector, vcfg: VerifyConfig, ecfg: EvalConfig, mcfg: ModelConfig
) -> Target:
    """The battery's target on a scenario: triggered prompts of ``verify.split``; for the relearning attack, the
    ``verify.split`` half (:func:`relearn_halves`) of the poisoned training samples outside the forget pack, so the
    validation and test attacks never share a record; held-out poison for the membership test."""
    s_seen, _, s_clean = split_names(vcfg.split)
    forget_ids = {r.id for r in parts.get("forget", [])}
    pool = relearn_halves([r for r in parts.get("train_poisoned", []) if r.id not in forget_ids])[vcfg.split]
    other = "validation" if vcfg.split == "test" else "test"
    return Target(
        kind="scenario",
        evaluate=lambda m, t, d: trig_eval(m, t, parts, det, ecfg, mcfg, vcfg.split, d),
        hit=det.hit,
        relearn_pool=pool,
        relearn_what=f"poisoned training samples outside the forget pack in the {HALF_NAMES[vcfg.split]} half of "
        f"the relearning pool (verify.split={vcfg.split}; the {other} half is kept apart for the {other} attack)",
        forget=parts.get("forget", []),
        heldout=heldout_poisoned(parts, vcfg.mia_heldout),
        fuzz_records=parts.get(s_seen, [])[: vcfg.fuzz_prompts or None],
        fillers=parts.get(s_clean, []) or parts.get("test_clean", []),
        ident={
            "keywords": det.keywords,
            "threshold": det.threshold,
            "split": vcfg.split,
            "ids": [r.id for s in split_names(vcfg.split) for r in parts.get(s, [])],
        },
        system_prompt=mcfg.system_prompt,
    )


def probe_target(
    probes: list[Any],
    hit: Callable[[str], bool],
    rule: dict[str, Any],
    group: str,
    forget: list[Record],
    retain: list[Record],
    heldout: list[Record],
    ecfg: EvalConfig,
    mcfg: ModelConfig,
) -> Target:
    """The battery's target on a user's files: hit rate of probe group ``group`` (the leak rate of the forget
    content), the clean probes' answers (every other group; first N token ids and replacement scores, for the
    collateral comparison with the start model, :mod:`rapidun.eval.collateral`), perplexity of held-out retain
    records, relearning on k of the forget records themselves (the records the unlearning
    removed: a harder test than the scenario's fresh poison), membership of the forget records against
    ``heldout`` (records like them the model never trained on; none: no MIA). No fuzzing: the trigger is unknown.

    Raises:
        RapidunError: ``group`` is not a group of the probes.
    """
    from rapidun.eval.probes import clean_probes, evaluate_probes, replacements_of

    groups = sorted({p.group for p in probes})
    if group not in groups:
        raise RapidunError(f"verify.probe_group={group!r} is not a group of the probes ({groups}); set it to the "
                           "group whose hits are the forget content")  # fmt: skip
    clean = {p.id for p in clean_probes(probes, group)}
    reps = replacements_of(forget)
    n_tok = min(AGREE_TOKENS, ecfg.max_new_tokens)

    def evaluate(model: Any, tok: Any, desc: str) -> dict[str, Any]:
        m, rows = evaluate_probes(model, tok, probes, hit, ecfg, mcfg, None, retain, reps)
        rate_g = m["groups"][group]["hit_rate"]
        mine = [r for r in rows if r["id"] in clean]
        ids = answer_ids(tok, [r["generation"] for r in mine], n_tok)
        return {
            "asr_seen": rate_g,
            "asr_ood": None,
            "asr_trig": rate_g,
            "clean_ppl": m["retain_ppl"],
            "groups": {g: v["hit_rate"] for g, v in m["groups"].items()},
            "hits": {r["id"]: bool(r["hit"]) for r in rows},
            # the clean probes' answers, for the collateral comparison with the start model (summarise)
            "clean": {r["id"]: {"ids": x, "replacement": r.get("replacement")} for r, x in zip(mine, ids, strict=True)},
            "n_replacements": len({r for r in reps if r.strip()}),
            "tokens": n_tok,
        }

    return Target(
        kind="probes",
        evaluate=evaluate,
        hit=hit,
        relearn_pool=forget,
        relearn_what="forget records",
        forget=forget,
        heldout=heldout,
        fuzz_records=[],
        fillers=[],
        ident={
            "probes": [(p.id, p.prompt, p.context, p.group) for p in probes],
            "rule": rule,
            "group": group,
            "retain": [r.id for r in retain[: ecfg.ppl_samples or None]],
            "heldout": [r.id for r in heldout],
            "collateral": {"v": 1, "replacements": sorted(set(reps)), "tokens": n_tok},
        },
        system_prompt=mcfg.system_prompt,
    )
