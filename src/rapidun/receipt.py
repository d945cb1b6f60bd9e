"""``receipt.json``: what an unlearning run removed, from what, how, and with what measured effect.

Every unlearning output (``rapidun unlearn``'s ``--out``, its ``adapter/`` and ``merged/``, and each cell of
``rapidun compare``) holds one. It names the start model by fingerprint (and the adapter merged into it, if
any), every forget record by id and a SHA-256 of its content, the retain pack by ids, the method, the config
sections the run used, the seed, the tool version and the measured before/after losses. A run that starts from
an earlier unlearning output (its ``merged/`` folder, or its ``adapter/`` via ``--adapter``) carries the earlier
receipts forward in ``previous`` (oldest first), so a chain of requests stays on record.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from rapidun import __version__
from rapidun.data.records import Record
from rapidun.io import read_json

SCHEMA = "rapidun.receipt/1"
NAME = "receipt.json"


def record_hash(r: Record) -> str:
    """SHA-256 (hex) of a record's instruction, context and response (the text that was unlearned)."""
    blob = json.dumps([r.instruction, r.context, r.response], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def earlier_receipts(*folders: str | Path | None) -> list[dict[str, Any]]:
    """The receipt chain found in the first of ``folders`` that holds a ``receipt.json`` (oldest first)."""
    for f in folders:
        if f is None:
            continue
        p = Path(f) / NAME
        if p.is_file():
            prev = read_json(p)
            return [*prev.get("previous", []), {k: v for k, v in prev.items() if k != "previous"}]
    return []


def make_receipt(
    *,
    method: str,
    start: dict[str, Any],
    forget: list[Record],
    retain: list[Record],
    config: dict[str, Any],
    seed: int,
    measured: dict[str, Any],
    complete: bool,
    packs: dict[str, Any] | None = None,
    previous: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the receipt (see module docstring); ``start`` names the start model (path, fingerprint, adapter)."""
    return {
        "schema": SCHEMA,
        "tool": f"rapidun {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "method": method,
        "seed": seed,
        "complete": complete,
        "start_model": start,
        "forget": [{"id": r.id, "sha256": record_hash(r)} for r in forget],
        "retain_ids": [r.id for r in retain],
        "packs": packs or {},
        "config": config,
        "measured": measured,
        "previous": previous or [],
    }
