"""Forget and retain packs from a user's own files (no scenario folder).

``FORGET`` holds the records whose effect must go (their ``response`` is the behaviour to unlearn; an optional
replacement answer enables relabel+ascent). ``RETAIN`` holds good training data: either a retain buffer as is,
or a whole training file from which a buffer of ``round(retain_ratio × |forget|)`` records is drawn (seeded,
recorded), never including a forget record.

A retain record "is" a forget record when it has the same id or the same content (instruction, context,
response). In a buffer given as is (not more records than the target size) such an overlap is an error, since
the same sample would be both pushed down and held up; from a larger file the overlapping records are left out
of the draw and counted in the pack info.
"""

from __future__ import annotations

import random
from typing import Any

from rapidun.constants import HELDOUT_CHECK
from rapidun.data.records import Record, content_id, load_records
from rapidun.errors import RapidunError


def _content(r: Record) -> str:
    return content_id(r.instruction, r.context, r.response)


def _shared(records: list[Record], against: list[Record]) -> list[Record]:
    """The ``records`` that are also in ``against``: same id or same instruction/context/response."""
    ids, contents = {r.id for r in against}, {_content(r) for r in against}
    return [r for r in records if r.id in ids or _content(r) in contents]


def build_packs(
    forget_records: list[Record],
    retain_records: list[Record],
    retain_ratio: float,
    seed: int,
    forget_where: str = "FORGET",
    retain_where: str = "RETAIN",
) -> tuple[list[Record], list[Record], list[Record], dict[str, Any]]:
    """Forget pack, retain pack and the retain records left over (for validation), plus what was done.

    Args:
        forget_records: the records to unlearn (order kept).
        retain_records: a retain buffer, or a whole training file to draw one from.
        retain_ratio: target retain size = ``round(retain_ratio × len(forget_records))`` (at least 1).
        seed: seed of the draw.
        forget_where, retain_where: how to name the two inputs in errors (their paths).

    Returns:
        ``(forget, retain, leftover, info)`` where ``leftover`` are the eligible retain records not drawn (file
        order) and ``info`` records sizes, overlaps, whether a draw happened, and the seed.

    Raises:
        RapidunError: empty inputs, or a buffer given as is that shares records with the forget set.
    """
    if not forget_records:
        raise RapidunError(f"{forget_where}: no forget records; give at least one record to unlearn")
    if not retain_records:
        raise RapidunError(f"{retain_where}: no retain records; give some of the model's good training data")
    if retain_ratio <= 0:
        raise RapidunError(f"scenario.retain_ratio must be > 0, got {retain_ratio}")
    target = max(1, round(retain_ratio * len(forget_records)))
    overlap = _shared(retain_records, forget_records)
    left_out = {id(r) for r in overlap}
    eligible = [r for r in retain_records if id(r) not in left_out]
    drawn = len(retain_records) > target
    if overlap and not drawn:
        ids = ", ".join(repr(r.id) for r in overlap[:5]) + (" ..." if len(overlap) > 5 else "")
        raise RapidunError(
            f"{retain_where}: {len(overlap)} retain record(s) are also forget records (same id or same "
            f"instruction/context/response): {ids}; remove them from {retain_where} (or pass a whole training file "
            f"with more than {target} records, from which a retain buffer is drawn without them)"
        )
    if not eligible:
        raise RapidunError(f"{retain_where}: every retain record is also a forget record; give other good data")
    if drawn:
        keep = sorted(random.Random(seed).sample(range(len(eligible)), min(target, len(eligible))))
        chosen = set(keep)
        retain = [eligible[i] for i in keep]
        leftover = [r for i, r in enumerate(eligible) if i not in chosen]
    else:
        retain, leftover = eligible, []
    info = {
        "n_forget": len(forget_records),
        "n_retain_given": len(retain_records),
        "n_retain": len(retain),
        "retain_target": target,
        "retain_drawn": drawn,
        "retain_overlap_left_out": [r.id for r in overlap],
        "seed": seed,
        "forget_with_replacement": sum(1 for r in forget_records if r.meta.get("response_clean")),
    }
    return list(forget_records), retain, leftover, info


def load_packs(
    forget_path: str, retain_path: str, fmt: str, fields: dict[str, str] | None, retain_ratio: float, seed: int
) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Load FORGET and RETAIN (any ``data.format``) and build the packs (:func:`build_packs`).

    Returns:
        ``(parts, info)``: ``parts`` has ``forget``, ``retain`` and ``val_clean`` (up to 40 leftover retain
        records, for methods that calibrate on clean data, e.g. ``fisher``); ``info`` adds the two paths.
    """
    forget = load_records(forget_path, fmt, fields)
    retain_all = load_records(retain_path, fmt, fields)
    return packs_from_records(forget, retain_all, retain_ratio, seed, forget_path, retain_path)


def packs_from_records(
    forget: list[Record], retain: list[Record], retain_ratio: float, seed: int, forget_where: str, retain_where: str
) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """:func:`load_packs` on records already loaded (``*_where``: where they came from, for errors and the info)."""
    f, r, left, info = build_packs(forget, retain, retain_ratio, seed, forget_where, retain_where)
    info = {"forget_path": forget_where, "retain_path": retain_where, **info}
    return {"forget": f, "retain": r, "val_clean": left[:HELDOUT_CHECK]}, info


def with_heldout(
    parts: dict[str, list[Record]], heldout: list[Record], where: str, info: dict[str, Any] | None = None
) -> dict[str, list[Record]]:
    """``parts`` with ``val_clean`` replaced by the first :data:`HELDOUT_CHECK` records of ``heldout``.

    ``val_clean`` is what an unlearning run measures its utility budget and collateral damage on. By default (the
    user path) it holds retain records left out of the buffer, which the model was usually fine-tuned on: they move
    less under unlearning than new prompts do. A held-out file of clean records the model never saw measures the
    damage on data like the user's future prompts. A held-out record may not be a forget or retain-pack record
    (same id or content): the run trains on those.

    Args:
        parts: the packs (``forget``, ``retain``, ...), not modified.
        heldout: clean records the model never trained on.
        where: the file, for errors.
        info: the pack info (:func:`build_packs`), given ``heldout_path`` and ``n_heldout`` when not None.

    Raises:
        RapidunError: no records, or a record that is also in the forget or retain pack.
    """
    if not heldout:
        raise RapidunError(f"{where}: no held-out clean records; give clean records the model never trained on")
    clash = _shared(heldout, [r for k in ("forget", "retain") for r in parts.get(k, [])])
    if clash:
        shown = ", ".join(repr(r.id) for r in clash[:5]) + (" ..." if len(clash) > 5 else "")
        raise RapidunError(
            f"{where}: {len(clash)} held-out record(s) are also forget or retain-buffer records (same id or same "
            f"instruction/context/response): {shown}; the run trains on those, so remove them from {where}"
        )
    if info is not None:
        info.update(heldout_path=where, n_heldout=min(len(heldout), HELDOUT_CHECK))
    return {**parts, "val_clean": heldout[:HELDOUT_CHECK]}
