"""Read a finished run folder: ``report.json`` plus the per-seed files it points to.

Every reader here returns ``None`` (and the caller notes why) instead of raising when an optional file is absent or
unreadable, so a partial run still renders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rapidun.io import read_json

SCHEMA = "rapidun.report/4"


def num(x: Any) -> float | None:
    """``x`` as a float (``inf``/``nan`` kept), or ``None`` when it is missing or not a number.

    Accepts ints, floats and numeric strings (``"inf"``, ``"Infinity"``, ``"NaN"``); booleans are not numbers here.
    """
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number."""
    v = num(x)
    return v is not None and math.isfinite(v)


def get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or ``None`` as soon as a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def as_dict(x: Any) -> dict[str, Any]:
    """``x`` when it is a dict, else ``{}``."""
    return x if isinstance(x, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines and non-object lines skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


class RunData:
    """A run folder and its ``report.json``, with path helpers that stay inside the folder.

    Args:
        run_dir: the run folder (holds ``report.json``).

    Raises:
        FileNotFoundError: no ``report.json`` in ``run_dir``.
        ValueError: ``report.json`` is not a JSON object.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir).resolve()
        f = self.root / "report.json"
        if not f.is_file():
            raise FileNotFoundError(f"no report.json in {self.root}")
        report = read_json(f)
        if not isinstance(report, dict):
            raise ValueError(f"{f}: expected a JSON object, got {type(report).__name__}")
        self.report: dict[str, Any] = report
        self._scenario: dict[str, dict[str, Any]] | None = None

    @property
    def schema(self) -> str:
        """The ``schema`` string of report.json (``""`` when absent)."""
        return str(self.report.get("schema") or "")

    @property
    def models(self) -> dict[str, Any]:
        """``report["models"]`` (``{}`` when absent)."""
        return as_dict(self.report.get("models"))

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        """``report["methods"]`` in display order, keeping only dict entries."""
        return {k: v for k, v in as_dict(self.report.get("methods")).items() if isinstance(v, dict)}

    @property
    def seeds(self) -> list[str]:
        """The comparison's seeds as strings (the keys of the ``per_seed`` dicts)."""
        s = self.report.get("seeds")
        return [str(x) for x in s] if isinstance(s, list) else []

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder, with forward slashes (the absolute path if outside)."""
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, rel: Any) -> Path | None:
        """A path named in report.json, resolved inside the run folder; ``None`` if absent or outside it."""
        if not isinstance(rel, str) or not rel:
            return None
        p = Path(rel)
        p = (p if p.is_absolute() else self.root / p).resolve()
        if p != self.root and self.root not in p.parents:
            return None
        return p

    def first_seed(self, per_seed: Any) -> str | None:
        """The first seed of ``report["seeds"]`` present in ``per_seed``, else its first key."""
        keys = [str(k) for k in as_dict(per_seed)]
        for s in self.seeds:
            if s in keys:
                return s
        return keys[0] if keys else None

    def ordered_seeds(self, per_seed: Any) -> list[str]:
        """The keys of ``per_seed``: those in ``report["seeds"]`` first, in its order, then the rest."""
        keys = [str(k) for k in as_dict(per_seed)]
        return [s for s in self.seeds if s in keys] + [k for k in keys if k not in self.seeds]

    def method_dir(self, name: str, seed: str) -> Path | None:
        """The folder of method ``name`` at ``seed`` (``per_seed[seed]["dir"]``); ``None`` when it has none."""
        return self.resolve(get(self.methods.get(name), "per_seed", seed, "dir"))

    def first_seed_file(self, name: str, filename: str) -> tuple[str | None, Path | None]:
        """``(seed, path)`` of ``filename`` in method ``name``'s first-seed folder (None where unknown)."""
        me = self.methods.get(name)
        seed = self.first_seed(me.get("per_seed")) if me is not None else None
        folder = self.method_dir(name, seed) if seed is not None else None
        return seed, (folder / filename if folder is not None else None)

    def scenario_record(self, rid: str) -> dict[str, Any] | None:
        """The forget/retain record with id ``rid`` from ``scenario/forget.jsonl`` or ``scenario/retain.jsonl``."""
        if self._scenario is None:
            self._scenario = {}
            for split in ("forget", "retain"):
                f = self.root / "scenario" / f"{split}.jsonl"
                try:
                    rows = read_jsonl(f) if f.is_file() else []
                except (OSError, ValueError):
                    rows = []
                for r in rows:
                    self._scenario.setdefault(str(r.get("id")), r | {"_file": f"scenario/{split}.jsonl"})
        return self._scenario.get(rid)
