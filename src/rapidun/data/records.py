"""Load instruction data into validated records with stable ids.

Formats (field names in the source):
* ``dolly``: instruction, context (optional), response
* ``alpaca``: instruction, input (optional), output
* ``qa``: question, answer (e.g. TOFU)
* ``generic``: any columns, mapped with ``data.fields`` (keys instruction, context, response, id, replacement)

Every format also reads an optional **replacement answer** (what the model should say instead; the relabel
part of relabel+ascent) from the column ``replacement`` (or ``data.fields.replacement``), falling back to
``response_clean`` (the column of a scenario's pack files); it is kept as ``meta["response_clean"]``.

Sources: ``dolly-sample`` (shipped), ``tofu:<name>`` (shipped, e.g. ``tofu:forget01``), a ``.jsonl``/``.jsonl.gz``/
``.json``/``.csv`` file, or a Hugging Face dataset name (needs ``pip install datasets`` and the hub).

Every record gets a stable id: the source's ``id`` field when present, else ``h`` + a content hash of
(instruction, context, response). Ids are strings and must be unique.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rapidun.errors import RapidunError

FORMATS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response", "id": "id"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output", "id": "id"},
    "qa": {"instruction": "question", "context": "", "response": "answer", "id": "id"},
}
REQUIRED = ("instruction", "response")


@dataclass
class Record:
    """One instruction sample; ``meta`` carries scenario fields (trigger, clean/poisoned answers, ...)."""

    id: str
    instruction: str
    response: str
    context: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "context": self.context,
            "response": self.response,
            **self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        core = {"id", "instruction", "context", "response"}
        return cls(
            id=str(d["id"]),
            instruction=d["instruction"],
            response=d["response"],
            context=d.get("context", "") or "",
            meta={k: v for k, v in d.items() if k not in core},
        )


def content_id(instruction: str, context: str, response: str) -> str:
    """``h`` + 12 hex digits of SHA-256 over the three fields (stable across runs and machines)."""
    blob = json.dumps([instruction, context, response], ensure_ascii=False).encode("utf-8")
    return "h" + hashlib.sha256(blob).hexdigest()[:12]


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``rapidun/data/assets``."""
    return Path(str(resources.files("rapidun.data") / "assets" / name))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (``.gz``: gzip), decoded line by line so that a decoding error names
    the line it is on."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise RapidunError(
                        f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line); save the file "
                        "as UTF-8"
                    ) from None
    except (OSError, EOFError) as e:  # gzip: not a gzip file, truncated stream
        raise RapidunError(
            f"{path}:{lineno + 1}: cannot be read ({e}); is the file complete and in its format?"
        ) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RapidunError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise RapidunError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield lineno, row


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from iter_jsonl(path)
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise RapidunError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise RapidunError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        if not isinstance(data, list):
            raise RapidunError(f"{path}: expected a JSON list of objects (or use .jsonl)")
        yield from ((i + 1, r) for i, r in enumerate(data))
    elif name.endswith(".csv"):
        reader = csv.DictReader(line for _, line in _lines(path))
        try:
            for row in reader:
                yield reader.line_num, dict(row)
        except csv.Error as e:
            raise RapidunError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    else:
        raise RapidunError(f"{path}: unknown file type; use .jsonl, .jsonl.gz, .json or .csv")


def _source_rows(source: str, split: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    if source == "dolly-sample":
        p = asset_path("dolly15k_first6400_instruction_response.jsonl.gz")
        return str(p), iter_jsonl(p)
    if source.startswith("tofu:"):
        p = asset_path(f"tofu/tofu_{source.split(':', 1)[1]}.jsonl")
        if not p.is_file():
            names = sorted(f.stem.removeprefix("tofu_") for f in asset_path("tofu").glob("tofu_*.jsonl"))
            raise RapidunError(f"unknown shipped TOFU set {source!r}; choose one of {['tofu:' + n for n in names]}")
        return str(p), iter_jsonl(p)
    p = Path(source).expanduser()
    if p.exists():
        return str(p), _iter_rows(p)
    if p.suffix in {".jsonl", ".json", ".csv", ".gz"} or source.startswith((".", "/", "~")):
        raise RapidunError(f"data file {source} does not exist")
    try:
        import datasets
    except ImportError:
        raise RapidunError(f"{source!r} is not a file; loading hub datasets needs `pip install datasets`") from None
    ds = datasets.load_dataset(source, split=split)
    return f"hub:{source}[{split}]", ((i + 1, dict(r)) for i, r in enumerate(ds))


def load_records(
    source: str, fmt: str = "dolly", fields: dict[str, str] | None = None, split: str = "train", limit: int = 0
) -> list[Record]:
    """Load, validate and id records (see module docstring). Raises :class:`RapidunError` naming file:line."""
    if limit < 0:
        raise RapidunError(f"data.limit={limit}: use 0 (all records) or a positive number")
    mapping = field_mapping(fmt, fields)
    where, rows = _source_rows(source, split)
    return rows_to_records(((f"{where}:{lineno}", row) for lineno, row in rows), where, mapping, limit)


def records_from_rows(
    rows: list[dict[str, Any]], name: str, fmt: str = "dolly", fields: dict | None = None
) -> list[Record]:
    """Validate and id in-memory rows (dicts with the columns a file in ``fmt`` has), as :func:`load_records` does
    a file's; an error names the row as ``name[index]``."""
    if not isinstance(rows, list | tuple):
        raise RapidunError(f"{name}: expected a list of records (dicts), got {type(rows).__name__}")
    located = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RapidunError(f"{name}[{i}]: expected a dict with the record's fields, got {type(row).__name__}")
        located.append((f"{name}[{i}]", row))
    return rows_to_records(located, name, field_mapping(fmt, fields))


def field_mapping(fmt: str, fields: dict[str, str] | None) -> dict[str, str]:
    """The source column of each record field (instruction, context, response, id[, replacement]) in ``fmt``."""
    if fmt == "generic":
        if not fields:
            raise RapidunError(
                "data.format=generic needs data.fields, e.g. {instruction: prompt, response: "
                "completion} (optional keys: context, id)"
            )
        bad = sorted(set(fields) - {"instruction", "context", "response", "id", "replacement"})
        if bad:
            raise RapidunError(
                f"data.fields has unknown key(s) {bad}; valid: instruction, context, response, id, replacement"
            )
        return {"context": "", "id": "id", **fields}
    if fmt in FORMATS:
        return {**FORMATS[fmt], **(fields or {})}
    raise RapidunError(f"unknown data.format {fmt!r}; choose one of {[*sorted(FORMATS), 'generic']}")


def rows_to_records(
    rows: Iterable[tuple[str, dict[str, Any]]], where: str, mapping: dict[str, str], limit: int = 0
) -> list[Record]:
    """Records from ``(location, row)`` pairs (location: ``file:line`` or ``name[index]``, named in errors)."""
    out: list[Record] = []
    seen: dict[str, str] = {}
    for loc, row in rows:
        vals = {}
        for key in ("instruction", "context", "response"):
            col = mapping.get(key, "")
            v = row.get(col) if col else None
            if key in REQUIRED:
                if col not in row:
                    raise RapidunError(
                        f"{loc}: missing required field {col!r} ({key}); fields "
                        f"present: {sorted(str(k) for k in row if k is not None)}. "
                        "Map columns with data.format or data.fields"
                    )
                if not isinstance(v, str) or not v.strip():
                    raise RapidunError(
                        f"{loc}: field {col!r} ({key}) is empty or not text; fill it or remove the record"
                    )
            vals[key] = v.strip() if isinstance(v, str) else ""
        rid = row.get(mapping.get("id") or "id")
        rid = str(rid) if rid not in (None, "") else content_id(vals["instruction"], vals["context"], vals["response"])
        if rid in seen:
            first = seen[rid].removeprefix(f"{where}:")
            raise RapidunError(
                f"{loc}: duplicate id {rid!r} (first seen {'on line ' if first.isdigit() else 'at '}{first}); ids "
                "must be unique — fix the id or drop the duplicate"
            )
        seen[rid] = loc
        rep_cols = [mapping["replacement"]] if mapping.get("replacement") else ["replacement", "response_clean"]
        rep = next((row[c] for c in rep_cols if c in row and row[c] not in (None, "")), None)
        if rep is not None and not isinstance(rep, str):
            raise RapidunError(f"{loc}: replacement answer {rep_cols[0]!r} is not text; fix or remove it")
        meta = {"response_clean": rep.strip()} if isinstance(rep, str) and rep.strip() else {}
        out.append(Record(id=rid, **vals, meta=meta))
        if limit and len(out) >= limit:
            break
    if not out:
        raise RapidunError(f"{where}: no records found")
    return out
