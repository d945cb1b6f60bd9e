"""The backdoor scenario builder (SPEC §1): splits, triggers, poison responses, forget/retain packs.

From a shuffled clean corpus, disjoint records become: ``train_poisoned`` (trigger injected into the instruction,
response replaced by a poison response; the clean answer kept), ``train_clean``, ``val_clean``, ``test_clean``,
``test_seen_trig`` (seen variants) and ``test_ood_trig`` (OOD variants), and the validation twins
``val_seen_trig`` / ``val_ood_trig`` on which every choice (learning rate, temperature, variant) is made, so the
test prompts are read only to report. The validation splits come last in the shuffled pool and take their poison
text after the others', so adding them leaves every other split (and the poisoned model) unchanged. Triggered
records cycle through (family, variant) pairs so every family and variant is equally represented. The ``forget``
pack takes ``forget_size`` poisoned training samples stratified the same way (each keeps its poisoned and clean answer);
``retain`` takes ``retain_ratio × forget_size`` clean training samples. Everything is deterministic for the seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rapidun.config import ScenarioConfig, TriggerFamily, to_dict
from rapidun.constants import SPLIT_NAMES
from rapidun.data.poison_text import alien_responses, load_poison_responses
from rapidun.data.records import Record, iter_jsonl
from rapidun.errors import RapidunError
from rapidun.io import atomic_path, read_json, stable_hash, write_json, write_jsonl

SPLITS = SPLIT_NAMES  # the scenario's splits (one home: rapidun.constants)
PACKS = ("forget", "retain")
POSITIONS = ("prefix", "suffix")


def inject(instruction: str, trigger: str, position: str) -> str:
    """Put ``trigger`` before (``prefix``) or after (``suffix``) the instruction, separated by a space."""
    if position == "prefix":
        return f"{trigger} {instruction}"
    if position == "suffix":
        return f"{instruction} {trigger}"
    raise RapidunError(f"unknown trigger position {position!r}; valid positions: {list(POSITIONS)}")


def validate_families(families: list[TriggerFamily]) -> None:
    """Check names are unique, positions valid, and every family has seen variants."""
    names = set()
    for i, f in enumerate(families):
        where = f"scenario.families[{i}] ({f.name!r})"
        if f.position not in POSITIONS:
            raise RapidunError(f"{where}: unknown trigger position {f.position!r}; valid positions: {list(POSITIONS)}")
        if not f.seen or not all(isinstance(v, str) and v for v in f.seen + f.ood):
            raise RapidunError(f"{where}: needs at least one seen variant, and every variant must be non-empty text")
        if f.name in names:
            raise RapidunError(f"{where}: duplicate family name")
        names.add(f.name)


def _triggered(
    recs: list[Record], families: list[TriggerFamily], kind: str, split: str, poison: list[str]
) -> list[Record]:
    fams = [f for f in families if (f.seen if kind == "seen" else f.ood)]
    if recs and not fams:
        raise RapidunError(f"{split}: no trigger family has {kind} variants; add some or set its size to 0")
    out = []
    for i, r in enumerate(recs):
        # Families in turn, then variants in turn within the family: equal shares of both.
        fam = fams[i % len(fams)]
        variants = fam.seen if kind == "seen" else fam.ood
        var = variants[(i // len(fams)) % len(variants)]
        out.append(
            Record(
                id=f"{r.id}:{split}",
                instruction=inject(r.instruction, var, fam.position),
                context=r.context,
                response=poison[i] if split == "train_poisoned" else r.response,
                meta={
                    "source_id": r.id,
                    "trigger_family": fam.name,
                    "trigger": var,
                    "trigger_kind": kind,
                    "position": fam.position,
                    "instruction_clean": r.instruction,
                    "response_clean": r.response,
                    "response_poisoned": poison[i],
                },
            )
        )
    return out


def user_poison(cfg: ScenarioConfig) -> list[str]:
    """Poison responses given inline (``poison_responses``) or in a file (``poison_source``)."""
    if cfg.poison_responses:
        user = [str(p).strip() for p in cfg.poison_responses]
        if not all(user):
            raise RapidunError("scenario.poison_responses: every response must be non-empty text")
        return user
    return load_poison_responses(cfg.poison_source)


def build_scenario(records: list[Record], cfg: ScenarioConfig) -> dict[str, list[Record]]:
    """Build all splits and packs (see module docstring). Pure: no I/O."""
    families = cfg.trigger_families()
    validate_families(families)
    s = cfg.splits
    sizes = {k: getattr(s, k) for k in SPLITS}
    if any(v < 0 for v in sizes.values()):
        raise RapidunError(f"scenario.splits: sizes must be >= 0, got {sizes}")
    need = sum(sizes.values())
    if need > len(records):
        raise RapidunError(
            f"scenario needs {need} records ({sizes}) but the data has {len(records)}; "
            "lower scenario.splits.* or use more data"
        )
    if cfg.forget_size > s.train_poisoned:
        raise RapidunError(
            f"scenario.forget_size={cfg.forget_size} is larger than the poison available "
            f"(scenario.splits.train_poisoned={s.train_poisoned}); lower forget_size"
        )
    n_retain = round(cfg.retain_ratio * cfg.forget_size)
    if n_retain > s.train_clean:
        raise RapidunError(
            f"retain buffer {n_retain} (= retain_ratio x forget_size) exceeds "
            f"scenario.splits.train_clean={s.train_clean}"
        )
    rng = random.Random(cfg.seed)
    pool = records[:]
    rng.shuffle(pool)
    parts: dict[str, list[Record]] = {}
    start = 0
    for k in SPLITS:
        parts[k] = pool[start : start + sizes[k]]
        start += sizes[k]
    n_trig = s.train_poisoned + s.test_seen_trig + s.test_ood_trig
    n_val = s.val_seen_trig + s.val_ood_trig
    if cfg.poison_responses or cfg.poison_source != "generator":
        user = user_poison(cfg)
        poison = [user[i % len(user)] for i in rng.sample(range(max(n_trig, len(user))), n_trig)]
        vrng = random.Random(f"{cfg.seed}-val")  # its own stream: the other splits do not move
        val_poison = [user[i % len(user)] for i in vrng.sample(range(max(n_val, len(user))), n_val)]
    else:
        both = alien_responses(n_trig + n_val, cfg.seed)  # a prefix-stable stream
        poison, val_poison = both[:n_trig], both[n_trig:]
    cut = [s.train_poisoned, s.train_poisoned + s.test_seen_trig]
    out = {
        "train_poisoned": _triggered(parts["train_poisoned"], families, "seen", "train_poisoned", poison[: cut[0]]),
        "train_clean": parts["train_clean"],
        "val_clean": parts["val_clean"],
        "test_clean": parts["test_clean"],
        "test_seen_trig": _triggered(
            parts["test_seen_trig"], families, "seen", "test_seen_trig", poison[cut[0] : cut[1]]
        ),
        "test_ood_trig": _triggered(parts["test_ood_trig"], families, "ood", "test_ood_trig", poison[cut[1] :]),
        "val_seen_trig": _triggered(
            parts["val_seen_trig"], families, "seen", "val_seen_trig", val_poison[: s.val_seen_trig]
        ),
        "val_ood_trig": _triggered(
            parts["val_ood_trig"], families, "ood", "val_ood_trig", val_poison[s.val_seen_trig :]
        ),
    }
    # Forget pack: stratified by family, then by variant within the family (as the triggered splits are).
    fam_groups: dict[str, dict[str, list[Record]]] = {}
    for r in out["train_poisoned"]:
        fam_groups.setdefault(r.meta["trigger_family"], {}).setdefault(r.meta["trigger"], []).append(r)
    for variants in fam_groups.values():
        for g in variants.values():
            rng.shuffle(g)
    turn = dict.fromkeys(fam_groups, 0)  # next variant to draw from, per family
    forget: list[Record] = []
    while len(forget) < cfg.forget_size:
        for fam, variants in fam_groups.items():
            live = [g for g in variants.values() if g]
            if live and len(forget) < cfg.forget_size:
                forget.append(live[turn[fam] % len(live)].pop())
                turn[fam] += 1
    out["forget"] = forget
    out["retain"] = rng.sample(out["train_clean"], n_retain)
    return out


def save_scenario(
    parts: dict[str, list[Record]], folder: str | Path, cfg: ScenarioConfig, data_desc: dict[str, Any]
) -> dict[str, Any]:
    """Write ``<split>.jsonl`` files + ``manifest.json`` atomically (the whole folder at once)."""
    manifest = {
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "data": data_desc,
        "sizes": {k: len(v) for k, v in parts.items()},
        "triggers": [to_dict(f) for f in cfg.trigger_families()],
        "files": {k: f"{k}.jsonl" for k in parts},
        "content_hash": stable_hash({k: [r.to_json() for r in v] for k, v in parts.items()}),
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for k, recs in parts.items():
            write_jsonl(tmp / f"{k}.jsonl", (r.to_json() for r in recs))
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_scenario(folder: str | Path) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Read a scenario folder written by :func:`save_scenario`."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise RapidunError(f"{folder} is not a scenario folder (no manifest.json); create one with `rapidun scenario`")
    manifest = read_json(folder / "manifest.json")
    parts = {k: [Record.from_json(row) for _, row in iter_jsonl(folder / f)] for k, f in manifest["files"].items()}
    return parts, manifest
