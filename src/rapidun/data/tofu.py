"""The TOFU deletion scenario at CPU size (Maini et al. 2024; scored as OpenUnlearning scores it).

Shipped files (``data/assets/tofu``): ``forget10`` (20 fictitious authors × 20 QA; ``forget05`` is its last 10
authors, ``forget01`` its last 2), ``retain_perturbed_first300`` (15 other authors), ``real_authors_perturbed``
and ``world_facts_perturbed`` (short answers, 3 wrong answers each) and 99 "I don't know" answers.

The mini design keeps TOFU's structure:

* **full model** = the base fine-tuned on retain300 + forget05 (500 QA);
* **retain model** for a forget split = the base fine-tuned on the full set minus that split (TOFU's reference:
  300 QA for forget05, 460 for forget01);
* **holdout** = forget10's first 10 authors, never trained on: the non-members of the membership attack;
* every forget and retain QA gets a ``half`` (``val`` or ``test``, alternating within each author) so that
  choices are made on validation questions and reported on test questions;
* **perturbed answers** (TOFU's wrong-but-plausible answers, which the shipped forget/retain files lack) are
  built reproducibly: another author's answer from the same pool, with that author's name replaced by this
  author's (:func:`perturbed_answers`); TOFU's *paraphrased* answer is the answer itself (docs/tofu.md).

Forget records carry an "I don't know" answer (seeded choice) as ``meta["response_clean"]``: the replacement
that relabelling methods train toward.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any

from rapidun.data.records import Record, asset_path, content_id
from rapidun.errors import RapidunError

FORGET_SPLITS = ("forget01", "forget05")
QA_PER_AUTHOR = 20
N_PERTURBED = 3
_NAME = re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:[A-Z][\w'’-]*|al|bin|de|van|von|da|del|ibn)){1,4}\b")
_STOP_START = {"The", "In", "What", "Who", "How", "Has", "Is", "Does", "Did", "Can", "Could", "Are", "Was", "His"}


def _jsonl(name: str) -> list[dict[str, Any]]:
    p = asset_path(f"tofu/{name}")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def author_name(qas: list[dict[str, Any]]) -> str:
    """The author's name: the most frequent capitalised 2–5-word sequence in the author's questions and answers.

    Ties go to the longer sequence (``"Basil Mahfouz Al-Kuwaiti"`` over ``"Basil Mahfouz"``). Sequences that
    start with a sentence word (``The``, ``What``, ...) are skipped.
    """
    counts: Counter[str] = Counter()
    for qa in qas:
        for text in (qa["question"], qa["answer"]):
            for m in _NAME.finditer(text):
                words = [re.sub(r"['’]s$", "", w) for w in m.group(0).split()]  # possessive: "X's" → "X"
                while words and words[0] in _STOP_START:
                    words = words[1:]
                if len(words) >= 2:
                    counts[" ".join(words)] += 1
    if not counts:
        raise RapidunError(f"TOFU: no author name found in {qas[0]['question']!r}…")
    return max(counts, key=lambda s: (counts[s], len(s.split()), s))


def _swap_name(text: str, donor: str, target: str) -> str:
    """``donor``'s full name, then its first and last words, replaced by ``target``'s."""
    out = text.replace(donor, target)
    d, t = donor.split(), target.split()
    for a, b in ((d[0], t[0]), (d[-1], t[-1])):
        out = re.sub(rf"\b{re.escape(a)}\b", b, out)
    return out


def perturbed_answers(qas: list[dict[str, Any]], names: list[str], k: int, seed: int) -> list[list[str]]:
    """``k`` wrong-but-plausible answers per QA: another author's answer with the names swapped.

    Args:
        qas: the pool, in author blocks of :data:`QA_PER_AUTHOR`.
        names: one name per author block.
        k: perturbed answers per QA.
        seed: the choice of donors (per QA: ``k`` distinct QA of other authors, preferring the same position in
            the author's block, where TOFU's question templates tend to ask the same thing).

    Returns:
        ``k`` strings per QA, each different from its answer.
    """
    rng = random.Random(seed)
    n_auth = len(qas) // QA_PER_AUTHOR
    out = []
    for i, qa in enumerate(qas):
        a, pos = divmod(i, QA_PER_AUTHOR)
        others = [b for b in range(n_auth) if b != a]
        rng.shuffle(others)
        picks: list[str] = []
        for b in others:
            j = b * QA_PER_AUTHOR + pos
            cand = _swap_name(qas[j]["answer"], names[b], names[a])
            if cand != qa["answer"] and cand not in picks:
                picks.append(cand)
            if len(picks) == k:
                break
        if len(picks) < k:
            raise RapidunError(f"TOFU: could not build {k} perturbed answers for QA {i} ({qa['question']!r})")
        out.append(picks)
    return out


def _records(
    qas: list[dict[str, Any]], prefix: str, perturbed: list[list[str]], offset: int = 0, author_base: int = 0
) -> list[Record]:
    recs = []
    for i, (qa, pert) in enumerate(zip(qas, perturbed, strict=True)):
        a, pos = divmod(i + offset, QA_PER_AUTHOR)
        recs.append(
            Record(
                id=f"{prefix}{i + offset}",
                instruction=qa["question"],
                response=qa["answer"],
                meta={
                    "perturbed": pert,
                    "author": author_base + a,
                    "half": "val" if pos % 2 == 0 else "test",
                },
            )
        )
    return recs


def _facts(name: str, prefix: str) -> list[Record]:
    rows = _jsonl(name)
    recs = []
    for i, r in enumerate(rows):
        pert = r.get("perturbed_answer") or []
        if not pert:
            raise RapidunError(f"TOFU: {name} row {i + 1} has no perturbed_answer")
        recs.append(
            Record(
                id=f"{prefix}{i}",
                instruction=r["question"],
                response=r["answer"],
                meta={"perturbed": list(pert), "half": "val" if i % 2 == 0 else "test"},
            )
        )
    return recs


def build_tofu(forget_split: str, seed: int) -> dict[str, list[Record]]:
    """All parts of the TOFU scenario for ``forget_split``, deterministic for ``seed``.

    Returns:
        ``full_train`` (retain300 + forget05: the full model's data), ``retain_train`` (the retain model's:
        ``full_train`` minus the forget split), ``forget`` (the split, each with an "I don't know" answer as
        ``meta["response_clean"]``), ``retain`` (the retain QA the unlearner may use and utility is scored on:
        retain300), ``holdout`` (forget10's first 10 authors, never trained on), ``real_authors``,
        ``world_facts``. Forget/retain/holdout/real/world records carry ``meta["perturbed"]`` and
        ``meta["half"]``; ``val_clean`` is the retain QA of the validation half (the unlearning's held-out
        utility check reads it).
    """
    if forget_split not in FORGET_SPLITS:
        raise RapidunError(f"scenario.forget_split={forget_split!r}: choose one of {list(FORGET_SPLITS)}")
    f10 = _jsonl("tofu_forget10.jsonl")
    ret = _jsonl("tofu_retain_perturbed_first300.jsonl")
    for name, rows, n in (("forget10", f10, 400), ("retain_perturbed_first300", ret, 300)):
        if len(rows) != n:
            raise RapidunError(f"TOFU: shipped {name} has {len(rows)} QA, expected {n}; reinstall rapidun")
    f_names = [author_name(f10[s : s + QA_PER_AUTHOR]) for s in range(0, 400, QA_PER_AUTHOR)]
    r_names = [author_name(ret[s : s + QA_PER_AUTHOR]) for s in range(0, 300, QA_PER_AUTHOR)]
    f_pert = perturbed_answers(f10, f_names, N_PERTURBED, seed)
    r_pert = perturbed_answers(ret, r_names, N_PERTURBED, seed + 1)
    forget10 = _records(f10, "tofu_f", f_pert)
    for r in forget10:
        r.meta["name"] = f_names[r.meta["author"]]
    retain = _records(ret, "tofu_r", r_pert, author_base=100)
    start = 400 - (40 if forget_split == "forget01" else 200)
    forget05 = forget10[200:]
    forget = [Record(r.id, r.instruction, r.response, r.context, dict(r.meta)) for r in forget10[start:]]
    idk = [line for line in asset_path("tofu/idontknow.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    for r in forget:
        r.meta["response_clean"] = rng.choice(idk)
    forget_ids = {r.id for r in forget}
    full_train = [_plain(r) for r in retain + forget05]
    return {
        "full_train": full_train,
        "retain_train": [r for r in full_train if r.id not in forget_ids],
        "forget": forget,
        "retain": retain,
        "holdout": forget10[:200],
        "real_authors": _facts("real_authors_perturbed.json", "tofu_ra"),
        "world_facts": _facts("world_facts_perturbed.json", "tofu_wf"),
        "val_clean": [_plain(r) for r in retain if r.meta["half"] == "val"],
    }


def _plain(r: Record) -> Record:
    """A training copy (question and answer only): the SFT cache key does not depend on evaluation metadata."""
    return Record(r.id, r.instruction, r.response)


def relearn_records(parts: dict[str, list[Record]]) -> list[Record]:
    """The relearning attack's data: the forget split's validation-half QA (test-half QA are scored after it)."""
    return [_plain(r) for r in parts["forget"] if r.meta["half"] == "val"]


__all__ = ["FORGET_SPLITS", "author_name", "build_tofu", "content_id", "perturbed_answers", "relearn_records"]
