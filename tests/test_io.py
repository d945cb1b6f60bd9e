"""Atomic writes, hashing and JSON helpers."""

from __future__ import annotations

import hashlib
import json

import pytest

from rapidun.io import atomic_path, file_hash, read_json, stable_hash, write_json, write_jsonl, write_text


def test_atomic_file_not_created_when_block_raises(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial", encoding="utf-8")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp left behind


def test_atomic_existing_file_untouched_when_block_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new", encoding="utf-8")
        raise RuntimeError("crash")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_folder_untouched_when_block_raises(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(ValueError), atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new", encoding="utf-8")
        raise ValueError
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_replaces_existing_folder_on_success(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "stale.txt").write_text("stale", encoding="utf-8")
    with atomic_path(folder) as tmp:
        assert tmp.parent.parent == tmp_path and tmp.name == "run" and not tmp.exists()
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("fresh", encoding="utf-8")
        assert (folder / "stale.txt").exists()  # the old folder stays until the block succeeds
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_creates_parents_and_replaces_file(tmp_path):
    target = tmp_path / "a" / "b" / "f.json"
    write_json(target, {"x": 1})
    write_json(target, {"x": 2, "é": "ü"})
    assert read_json(target) == {"x": 2, "é": "ü"}
    assert "ü" in target.read_text(encoding="utf-8")  # not escaped
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_write_text_and_jsonl(tmp_path):
    write_text(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "hello\n"
    rows = [{"a": 1}, {"b": "ü"}]
    write_jsonl(tmp_path / "r.jsonl", iter(rows))
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == rows
    write_jsonl(tmp_path / "empty.jsonl", [])
    assert (tmp_path / "empty.jsonl").read_text(encoding="utf-8") == ""


def test_stable_hash_deterministic():
    a = {"b": [1, 2, {"c": "ü"}], "a": 1.5}
    b = {"a": 1.5, "b": [1, 2, {"c": "ü"}]}
    assert stable_hash(a) == stable_hash(b)  # key order does not matter
    assert stable_hash(a) == stable_hash(json.loads(json.dumps(a)))
    assert len(stable_hash(a)) == 16 and len(stable_hash(a, n=8)) == 8
    assert stable_hash(a).startswith(stable_hash(a, n=8))
    assert stable_hash(a) != stable_hash({**a, "a": 1.6})
    assert stable_hash([1, 2]) != stable_hash([2, 1])
    # Canonical JSON -> SHA-256: independent of the process (no PYTHONHASHSEED, no id()).
    assert stable_hash({"x": 1}) == hashlib.sha256(b'{"x": 1}').hexdigest()[:16] == "613fe5aa65343dbb"


def test_file_hash(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    h1 = file_hash(f)
    assert h1 == file_hash(f) and len(h1) == 16
    f.write_bytes(b"abd")
    assert file_hash(f) != h1
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x").write_bytes(b"1")
    h2 = file_hash(d)
    (d / "sub" / "x").rename(d / "sub" / "y")
    assert file_hash(d) != h2  # names are part of a folder's hash


def test_a_temp_left_by_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    import os
    import socket
    import subprocess

    pid = subprocess.Popen(["true"])
    pid.wait()
    host = socket.gethostname()
    target = tmp_path / "model"
    stale = tmp_path / f".model.{host}-{pid.pid}.abcd1234.tmp"
    live = tmp_path / f".model.{host}-{os.getpid()}.efgh5678.tmp"
    other_host = tmp_path / f".model.elsewhere-{pid.pid}.ijkl9012.tmp"
    for d in (stale, live, other_host):
        (d / "model").mkdir(parents=True)
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, other_host.name])


def test_fault_points_are_counted_logged_and_fail_writes_from_n_on(tmp_path, monkeypatch):
    import errno

    import rapidun.io as rio

    log = tmp_path / "faults.log"
    monkeypatch.setattr(rio, "_FAULT_CALLS", 0)
    monkeypatch.setenv("RAPIDUN_FAULT_LOG", str(log))
    monkeypatch.setenv("RAPIDUN_FAULT_ENOSPC_AT", "3")
    rio.fault_point("loop:step")  # 1
    write_text(tmp_path / "a.txt", "a")  # 2 (write), 3 (wrote: no path, so no error)
    rio.fault_point("loop:step")  # 4: a loop point never fails
    with pytest.raises(OSError) as e:
        write_text(tmp_path / "b.txt", "b")  # 5: a write after N fails
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "b.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "faults.log"]  # b.txt not written, no temp
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    assert [(n, t) for n, t, _ in lines] == [("1", "loop:step"), ("2", "write:a.txt"), ("3", "wrote:a.txt"),
                                             ("4", "loop:step"), ("5", "write:b.txt")]  # fmt: skip
    assert lines[1][2] == str(tmp_path / "a.txt") and lines[2][2] == ""


def test_fault_point_kill_is_a_sigkill(tmp_path):
    import subprocess
    import sys

    code = "from rapidun.io import write_text as w\nfor i in range(5): w(f'{i}.txt', 'x')\n"
    env = {**__import__("os").environ, "RAPIDUN_FAULT_KILL_AT": "3"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert r.returncode == -9
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["0.txt"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".")]) == 1  # 1.txt's temp: killed at write:1.txt
