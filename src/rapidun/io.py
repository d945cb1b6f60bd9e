"""Atomic file writes, content hashing and JSON/JSONL helpers shared by every stage, and the fault-injection hook.

Fault injection (:func:`fault_point`, used by ``tests/test_faults.py``): every atomic write and a few cheap points
inside each stage's long loops call ``fault_point(tag)``. With none of the ``RAPIDUN_FAULT_*`` variables set it does
nothing but read the environment. Otherwise the points are numbered 1, 2, ... in the order this process reaches them:

* ``RAPIDUN_FAULT_LOG=FILE`` appends ``N<TAB>tag<TAB>path`` per point (path empty for a loop point), so a harness
  can count the points of a reference run and see which stage each one is in;
* ``RAPIDUN_FAULT_KILL_AT=N`` kills the process with SIGKILL at point N (no cleanup, no ``finally``: a power cut);
* ``RAPIDUN_FAULT_ENOSPC_AT=N`` makes every *write* point from N on (one that names a path) raise
  ``OSError(ENOSPC)`` naming that path, as a full disk would: the temp file is removed and nothing is renamed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_FAULT_CALLS = 0  # fault points reached by this process (only counted while a RAPIDUN_FAULT_* variable is set)


def fault_point(tag: str, path: str | Path | None = None) -> None:
    """A numbered point where a test may kill the process or make a write fail (see the module docstring).

    Args:
        tag: what the process is doing, ``<stage>:<what>`` for a loop point (``sft:step``, ``eval:batch``) or
            ``write:<file name>`` / ``wrote:<file name>`` around an atomic write's rename.
        path: the file about to be written (write points only; only these raise ``OSError(ENOSPC)``).
    """
    kill, nospc, log = (os.environ.get(f"RAPIDUN_FAULT_{k}") for k in ("KILL_AT", "ENOSPC_AT", "LOG"))
    if not (kill or nospc or log):
        return
    global _FAULT_CALLS
    _FAULT_CALLS += 1
    n = _FAULT_CALLS
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{n}\t{tag}\t{path or ''}\n")
    if kill and n == int(kill):
        os.kill(os.getpid(), signal.SIGKILL)
    if nospc and path is not None and n >= int(nospc):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at fault point {n}, {tag})", str(path))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and folders: a crash inside the block leaves ``path`` untouched and removes the temp. A folder
    already at ``path`` is renamed aside first and deleted after the new one is in place, so a kill never leaves a
    half-deleted folder at ``path``. The temp ``.<name>.<host>-<pid>.<random>.tmp`` names its writer: a temp left
    by a killed process (SIGKILL runs no cleanup) is removed by the next write of the same ``path`` on that host.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        fault_point(f"write:{path.name}", path)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / ".replaced")
        os.replace(target, path)
        fault_point(f"wrote:{path.name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_atomic_temp(path: str | Path) -> bool:
    """Whether ``path`` is the temp folder of an atomic write (``.<name>.<...>.tmp``), e.g. one a killed writer left.

    Such a folder is never read as a result; a folder holding only these holds no results.
    """
    p = Path(path)
    return p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir() and not p.is_symlink()


def _remove_dead_temps(path: Path) -> None:
    """Delete temps of ``path`` left by atomic writes whose process (on this host) no longer runs."""
    pat = re.compile(re.escape(f".{path.name}.") + r"(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp")
    host = socket.gethostname()
    try:
        names = [e.name for e in os.scandir(path.parent) if e.name.startswith(f".{path.name}.")]
    except OSError:
        return
    for name in names:
        m = pat.fullmatch(name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        stale = path.parent / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex SHA-256 of ``obj``'s canonical JSON, truncated to ``n`` characters."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


def file_hash(path: str | Path, n: int = 16) -> str:
    """Hex SHA-256 of a file's bytes (or of a folder's files, names included), truncated."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:n]
