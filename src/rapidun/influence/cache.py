"""On-disk cache of per-sample gradient sketches (fp16, ``K`` floats per sample).

Layout of a cache folder::

    folder/
      manifest.json      {"format", "meta", "dtype", "shards": [{"file": "shard-00000.pt", "ids": [...]}, ...]}
      shard-00000.pt     torch.save({"ids": [...], "sketch": Tensor (n, K) float16})
      shard-00001.pt
      ...

A sketch row is 2·K bytes (128 KiB at K = 2^16). ``meta`` says what the sketches *mean* (model fingerprint,
parameter set, K, seed, template, normalisation, ...); a folder built with another ``meta`` is refused, so
sketches of different kinds are never mixed.

Crash safety: every shard and every manifest is written atomically (:func:`rapidun.io.atomic_path`), shard
first, manifest second. The manifest is the single source of truth: a shard it does not list (left by a
process killed between the two writes) is an orphan, deleted on the next open, and its ids are reported by
:meth:`SketchCache.missing` again, so the caller recomputes them. One writer per folder at a time.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rapidun.errors import RapidunError
from rapidun.io import atomic_path, read_json, write_json

FORMAT = "rapidun.sketch_cache/1"
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-(\d+)\.pt$")
FP16_MAX = 65504.0
_ABSENT = object()
_SHOW = 5  # how many ids an error message lists


def _fmt(value: Any, width: int = 80) -> str:
    """Short JSON rendering of a meta value for error messages (``<absent>`` for a missing key)."""
    if value is _ABSENT:
        return "<absent>"
    s = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def _show_ids(ids: Sequence[str]) -> str:
    """First few ids, for error messages: ``'a', 'b', ... (+12 more)``."""
    head = ", ".join(repr(i) for i in ids[:_SHOW])
    return head + (f", ... (+{len(ids) - _SHOW} more)" if len(ids) > _SHOW else "")


def cache_meta_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per key whose value differs between ``old`` (cached) and ``new`` (requested).

    Keys are listed in ``old``'s order, then keys only ``new`` has. A key present on one side only is shown
    as ``<absent>`` on the other. Values are compared as given (normalise both through JSON first when one
    side was read from disk: tuples become lists).

    Args:
        old: Meta stored in the cache's manifest.
        new: Meta the caller asks for.

    Returns:
        Lines like ``"K: cached 65536, requested 4096"``; empty when the metas are equal.
    """
    keys = list(old) + [k for k in new if k not in old]
    lines = []
    for k in keys:
        o, n = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if o != n:
            lines.append(f"{k}: cached {_fmt(o)}, requested {_fmt(n)}")
    return lines


def _normalise_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it will read back from JSON; checks it is JSON-able and has a positive integer ``K``."""
    if not isinstance(meta, dict):
        raise RapidunError(f"sketch cache meta must be a dict, got {type(meta).__name__}")
    try:
        norm = json.loads(json.dumps(meta, ensure_ascii=False))
    except (TypeError, ValueError) as e:
        raise RapidunError(f"sketch cache meta must be JSON-serialisable: {e}") from e
    k = norm.get("K")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise RapidunError(f"sketch cache meta needs a positive integer 'K' (sketch length), got {_fmt(k)}")
    return norm


class SketchCache:
    """Per-sample gradient sketches stored as fp16 shards under one folder, keyed by sample id.

    Typical use by an engine::

        cache = SketchCache(folder, meta)
        todo = cache.missing(ids)
        for batch in chunks(todo, cache.shard_size):
            cache.add(batch, sketch_batch(batch))  # (len(batch), K)
        g = cache.load(ids)  # (N, K) float32, in the order of ids

    Policies:
        * **Duplicate ids**: adding an id that is already cached (or twice in one call) raises
          :class:`RapidunError`; call :meth:`missing` first. Nothing is written in that case.
        * **Shards**: :meth:`add` writes ``ceil(n / shard_size)`` new shard files (one when
          ``n <= shard_size``) and then rewrites the manifest once, so an ``add`` is all-or-nothing. Calling
          ``add`` with batches of about ``shard_size`` keeps shards large enough to load quickly and small
          enough to write often (256 × 128 KiB = 32 MiB at K = 2^16).
        * **Orphans**: shard files the manifest does not list, and temp files of interrupted atomic writes,
          are deleted when the cache is opened.
        * **Values**: sketches are stored as float16 on CPU; a row that is not finite after conversion (NaN
          gradient, or ``|x| > 65504`` overflowing fp16) is refused.
        * **Concurrency**: one writer per folder. ``add`` refuses to write when the manifest on disk was
          changed by someone else since this object last wrote it.

    Args:
        folder: Cache folder; created when absent.
        meta: JSON-able description of what the sketches mean (model fingerprint, param set, ``K``, seed, ...);
            must hold ``K``, the sketch length. Compared key by key with the manifest of an existing cache.
        shard_size: Most rows per shard file (≥ 1).
        overwrite: When the folder holds a cache with a different ``meta`` (or an unreadable manifest, or
            listed shards that are gone), clear it instead of raising. A cache with the same ``meta`` is
            reused either way. Files in the folder that are not the cache's own are never deleted.

    Raises:
        RapidunError: Different ``meta`` (the message names each differing key, old vs new), unreadable
            manifest, shard files missing, or a non-empty folder that is not a sketch cache; all unless
            ``overwrite``. Also a bad ``meta`` or ``shard_size``.
    """

    def __init__(
        self, folder: str | Path, meta: dict[str, Any], shard_size: int = 256, *, overwrite: bool = False
    ) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise RapidunError(f"sketch cache shard_size must be a positive integer, got {shard_size!r}")
        self.folder = Path(folder)
        self.meta = _normalise_meta(meta)
        self.K: int = self.meta["K"]
        self.shard_size = shard_size
        self._shards: list[dict[str, Any]] = []  # manifest entries {"file", "ids"}, in write order
        self._index: dict[str, tuple[int, int]] = {}  # id -> (shard position in self._shards, row)
        self._open(overwrite)

    # ------------------------------------------------------------------ opening

    @property
    def manifest_path(self) -> Path:
        """``folder/manifest.json``."""
        return self.folder / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        """The manifest this object stands for."""
        return {"format": FORMAT, "meta": self.meta, "dtype": "float16", "shards": self._shards}

    def _open(self, overwrite: bool) -> None:
        """Claim the folder: reuse a matching cache, refuse (or clear, with ``overwrite``) anything else."""
        mpath = self.manifest_path
        if mpath.is_file():
            problem = self._read_existing()
            if problem is not None:
                if not overwrite:
                    sep = "\n" if "\n" in problem else "; "
                    raise RapidunError(
                        f"sketch cache {self.folder} {problem}{sep}use another cache folder or delete this one "
                        "(overwrite=True clears it)"
                    )
                self._clear()
        elif self.folder.exists():
            if not self.folder.is_dir():
                raise RapidunError(f"sketch cache folder {self.folder} exists and is not a folder")
            foreign = [p.name for p in self.folder.iterdir() if not self._is_own(p)]
            if foreign and not overwrite:
                raise RapidunError(
                    f"sketch cache folder {self.folder} is not empty and holds no {MANIFEST} "
                    f"(found {_show_ids(sorted(foreign))}); use another folder or delete it "
                    "(overwrite=True uses it anyway, keeping those files)"
                )
            self._clear()
        else:
            self._clear()
        self._remove_orphans()

    def _read_existing(self) -> str | None:
        """Load the manifest into ``self``; return why it cannot be reused, or None when it can."""
        try:
            man = read_json(self.manifest_path)
        except (OSError, ValueError) as e:
            return f"has an unreadable {MANIFEST} ({e})"
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            found = man.get("format") if isinstance(man, dict) else None
            return f"has a {MANIFEST} of an unknown format ({_fmt(found)}, expected {FORMAT!r})"
        old = man.get("meta") if isinstance(man.get("meta"), dict) else {}
        diff = cache_meta_diff(old, self.meta)
        if diff:
            return "was built with different settings (sketches are never mixed):\n  " + "\n  ".join(diff)
        shards = man.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and SHARD_RE.match(str(s.get("file"))) and isinstance(s.get("ids"), list)
            for s in shards
        ):
            return f"has a malformed shard list in {MANIFEST}"
        gone = [s["file"] for s in shards if not (self.folder / s["file"]).is_file()]
        if gone:
            return f"lists shard files that are missing ({_show_ids(gone)})"
        all_ids = [i for s in shards for i in s["ids"]]
        if len(set(all_ids)) != len(all_ids):
            return f"lists some ids twice in {MANIFEST}"
        self._shards = shards
        self._reindex()
        return None

    def _reindex(self) -> None:
        """Rebuild ``id -> (shard, row)`` from ``self._shards``."""
        self._index = {i: (si, row) for si, s in enumerate(self._shards) for row, i in enumerate(s["ids"])}

    @staticmethod
    def _is_own(p: Path) -> bool:
        """A file this class writes: manifest, shard, or a temp left by an interrupted atomic write."""
        n = p.name
        return (
            n == MANIFEST
            or bool(SHARD_RE.match(n))
            or (n.endswith(".tmp") and (n.startswith(f".{MANIFEST}.") or n.startswith(".shard-")))
        )

    def _clear(self) -> None:
        """Start empty: write a fresh manifest first (so no listed shard can vanish), then delete old shards."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._shards, self._index = [], {}
        write_json(self.manifest_path, self._manifest())
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete shard files the manifest does not list and temps of interrupted writes."""
        listed = {s["file"] for s in self._shards}
        for p in self.folder.iterdir():
            if p.name == MANIFEST or p.name in listed or not self._is_own(p):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def ids(self) -> list[str]:
        """All cached ids, in the order they were added."""
        return [i for s in self._shards for i in s["ids"]]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` not cached yet, order (and repeats) preserved."""
        return [i for i in ids if i not in self._index]

    # ------------------------------------------------------------------ writing

    def add(self, ids: Sequence[str], sketches: torch.Tensor) -> None:
        """Store the sketches of new ids: new shard file(s), then one atomic manifest rewrite.

        Args:
            ids: ``n`` sample ids, none cached yet and no repeats.
            sketches: Tensor ``(n, K)``, any float dtype and device; stored as float16 on CPU.

        Raises:
            RapidunError: Shape is not ``(len(ids), K)``, an id is already cached or repeated, a row is not
                finite in float16, or the manifest was changed on disk by another writer.
        """
        ids = list(ids)
        if not all(isinstance(i, str) for i in ids):
            bad = [repr(i) for i in ids if not isinstance(i, str)]
            raise RapidunError(f"sketch cache ids must be strings, got {', '.join(bad[:_SHOW])}")
        if not isinstance(sketches, torch.Tensor) or not sketches.is_floating_point():
            raise RapidunError(f"sketches must be a floating-point torch.Tensor, got {type(sketches).__name__}")
        if sketches.ndim != 2 or sketches.shape[1] != self.K or sketches.shape[0] != len(ids):
            raise RapidunError(
                f"sketches have shape {tuple(sketches.shape)}; expected ({len(ids)}, {self.K}) = "
                f"(number of ids, K from the cache meta)"
            )
        dup_in_cache = [i for i in ids if i in self._index]
        if dup_in_cache:
            raise RapidunError(
                f"sketch cache {self.folder} already holds ids {_show_ids(dup_in_cache)}; add only cache.missing(ids)"
            )
        if len(set(ids)) != len(ids):
            rep = [i for i, c in Counter(ids).items() if c > 1]
            raise RapidunError(f"ids repeated within one add: {_show_ids(rep)}")
        if not ids:
            return
        half = sketches.detach().to(device="cpu", dtype=torch.float16)  # (n, K) fp16
        bad_rows = (~torch.isfinite(half).all(dim=1)).nonzero().flatten().tolist()
        if bad_rows:
            src_bad = not bool(torch.isfinite(sketches[bad_rows]).all())
            why = "non-finite values (NaN/inf gradient)" if src_bad else f"values beyond ±{FP16_MAX:g} (fp16 overflow)"
            raise RapidunError(
                f"sketches of ids {_show_ids([ids[r] for r in bad_rows])} have {why}; nothing was cached"
                + ("" if src_bad else " (normalise or rescale the sketches)")
            )
        self._check_not_changed()
        nxt = 1 + max((int(m.group(1)) for s in self._shards if (m := SHARD_RE.match(s["file"]))), default=-1)
        new = []
        for j, start in enumerate(range(0, len(ids), self.shard_size)):
            part_ids = ids[start : start + self.shard_size]
            # .clone(): torch.save of a view would store the whole underlying buffer.
            part = half[start : start + len(part_ids)].clone()  # (n_part, K) fp16
            name = f"shard-{nxt + j:05d}.pt"
            with atomic_path(self.folder / name) as tmp:
                torch.save({"ids": part_ids, "sketch": part}, tmp)
            new.append({"file": name, "ids": part_ids})
        shards = self._shards + new
        write_json(self.manifest_path, {**self._manifest(), "shards": shards})
        for si in range(len(self._shards), len(shards)):
            self._index.update((i, (si, row)) for row, i in enumerate(shards[si]["ids"]))
        self._shards = shards

    def _check_not_changed(self) -> None:
        """Refuse to write when the manifest on disk no longer lists exactly our shards (another writer)."""
        try:
            on_disk = [s["file"] for s in read_json(self.manifest_path)["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RapidunError(f"sketch cache {self.folder}: cannot reread {MANIFEST} ({e})") from e
        if on_disk != [s["file"] for s in self._shards]:
            raise RapidunError(
                f"sketch cache {self.folder} was changed by another process since it was opened; "
                "only one writer per cache folder is supported — reopen it"
            )

    # ------------------------------------------------------------------ reading

    def load(self, ids: Sequence[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sketches of ``ids``, row ``r`` being ``ids[r]`` (repeats allowed).

        Each needed shard is read once. Pass ``dtype=torch.float16`` to halve memory for large sets
        (:func:`rapidun.influence.retrieval.influence_matrix` upcasts chunk by chunk).

        Args:
            ids: ``n`` cached sample ids.
            dtype: Dtype of the result (float32 by default; the stored values are float16).

        Returns:
            Tensor ``(n, K)`` on CPU.

        Raises:
            RapidunError: An id is not cached (the message names the first few), or a shard file does not
                hold the ids the manifest says it does.
        """
        ids = list(ids)
        out = torch.empty(len(ids), self.K, dtype=dtype)  # (n, K)
        for dest, rows in self.iter_rows(ids, dtype):  # each needed shard read once
            out[dest] = rows  # (len(dest), K)
        return out

    def _read_shard(self, si: int, mmap: bool = False) -> torch.Tensor:
        """The ``(n_shard, K)`` float16 sketches of shard ``si``, checked against the manifest (``mmap``: mapped from
        the file instead of read into memory: no copy, for a caller that converts the rows anyway)."""
        entry = self._shards[si]
        path = self.folder / entry["file"]
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            raise RapidunError(f"cannot read sketch shard {path}: {e}; delete the cache folder") from e
        ok = isinstance(blob, dict) and blob.get("ids") == entry["ids"] and isinstance(blob.get("sketch"), torch.Tensor)
        sk = blob["sketch"] if ok else None
        if sk is None or tuple(sk.shape) != (len(entry["ids"]), self.K):
            raise RapidunError(
                f"sketch shard {path} does not match {MANIFEST} (other ids or shape); delete the cache folder"
            )
        return sk

    def iter_rows(
        self, ids: Sequence[str], dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Stream the sketches of ``ids`` shard by shard: memory holds one shard, never the whole set.

        Shards are visited in write order; each yields the positions (in ``ids``) of the rows it holds and those
        rows. Every position of ``ids`` is yielded exactly once (a repeated id at each of its positions).

        Args:
            ids: ``n`` cached sample ids.
            dtype: Dtype of the yielded rows.

        Yields:
            ``(positions, rows)``: ``positions`` a list of ``m`` indices into ``ids``, ``rows`` a tensor ``(m, K)``.

        Raises:
            RapidunError: An id is not cached, or a shard does not match the manifest.
        """
        ids = list(ids)
        for si, (dest, rows) in sorted(self._by_shard(ids).items()):
            sk = self._read_shard(si, mmap=True)  # (n_shard, K) fp16, mapped
            whole = rows == list(range(sk.shape[0]))  # the usual case: skip the gather copy
            yield dest, (sk if whole else sk[rows]).to(dtype, copy=True)  # (len(rows), K)

    def _by_shard(self, ids: list[str]) -> dict[int, tuple[list[int], list[int]]]:
        """``shard -> (positions in ids, rows in the shard)`` for cached ``ids``.

        Raises:
            RapidunError: An id is not cached (the message names the first few).
        """
        unknown = [i for i in ids if i not in self._index]
        if unknown:
            raise RapidunError(
                f"sketch cache {self.folder} has no sketch for {len(unknown)} id(s): {_show_ids(unknown)}"
            )
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for pos, i in enumerate(ids):
            si, row = self._index[i]
            dest, rows = by_shard.setdefault(si, ([], []))
            dest.append(pos)
            rows.append(row)
        return by_shard

    def shard_count(self, ids: Sequence[str]) -> int:
        """How many shard files hold ``ids`` (what a streamed pass over them reads)."""
        return len(self._by_shard(list(ids)))
