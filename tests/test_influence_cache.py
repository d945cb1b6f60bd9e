"""On-disk sketch cache: round trip, meta guard, shards, crash/resume and orphans."""

from __future__ import annotations

import pytest
import torch

import rapidun.influence.cache as cache_mod
from rapidun.errors import RapidunError
from rapidun.influence.cache import SketchCache, cache_meta_diff
from rapidun.io import read_json

K = 8
META = {"model_fingerprint": "abc", "param_set": "lora", "K": K, "seed": 0, "normalize": False, "hotwords": ["x"]}


def sketches(n, seed=0):
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed))


def shard_files(folder):
    return sorted(p.name for p in folder.glob("shard-*.pt"))


def test_round_trip_order_precision_and_missing(tmp_path):
    c = SketchCache(tmp_path / "c", META)
    assert len(c) == 0 and c.ids() == [] and (tmp_path / "c" / "manifest.json").is_file()
    g = sketches(5)
    ids = [f"s{i}" for i in range(5)]
    c.add(ids[:3], g[:3])
    c.add(ids[3:], g[3:].double())  # any float dtype
    assert len(c) == 5 and c.ids() == ids and "s4" in c
    assert c.missing(["s9", "s1", "s7", "s9"]) == ["s9", "s7", "s9"]
    order = ["s4", "s0", "s2", "s2"]
    out = c.load(order)
    assert out.dtype == torch.float32 and out.shape == (4, K)
    ref = g[[4, 0, 2, 2]]
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(out, ref.half().float())  # exactly the fp16 values
    assert c.load(["s1"], dtype=torch.float16).dtype == torch.float16
    assert c.load([]).shape == (0, K)

    reopened = SketchCache(tmp_path / "c", dict(META))
    assert reopened.ids() == ids and torch.equal(reopened.load(order), out)


def test_shards_respect_shard_size_and_store_only_their_rows(tmp_path):
    c = SketchCache(tmp_path / "c", META, shard_size=2)
    big = torch.randn(1000, K).half()  # already fp16: no conversion copy
    c.add(["a", "b", "c"], big[:3])  # a view of a large buffer
    assert shard_files(tmp_path / "c") == ["shard-00000.pt", "shard-00001.pt"]
    assert [s["ids"] for s in read_json(tmp_path / "c" / "manifest.json")["shards"]] == [["a", "b"], ["c"]]
    blob = torch.load(tmp_path / "c" / "shard-00000.pt", weights_only=True)
    assert blob["ids"] == ["a", "b"] and blob["sketch"].dtype == torch.float16 and blob["sketch"].shape == (2, K)
    assert (tmp_path / "c" / "shard-00000.pt").stat().st_size < 1000 * K  # not the whole 1000-row buffer
    c.add([], torch.empty(0, K))  # no-op: no shard
    assert len(shard_files(tmp_path / "c")) == 2


def test_meta_mismatch_names_keys_and_overwrite_clears(tmp_path):
    c = SketchCache(tmp_path / "c", META)
    c.add(["a"], sketches(1))
    other = {**META, "seed": 1, "hotwords": ["y"], "rounds": 2}
    with pytest.raises(RapidunError) as e:
        SketchCache(tmp_path / "c", other)
    msg = str(e.value)
    assert "seed: cached 0, requested 1" in msg
    assert 'hotwords: cached ["x"], requested ["y"]' in msg
    assert "rounds: cached <absent>, requested 2" in msg
    assert "model_fingerprint" not in msg and "another cache folder" in msg and "delete" in msg
    assert SketchCache(tmp_path / "c", META).ids() == ["a"]  # nothing lost by the refusal

    c2 = SketchCache(tmp_path / "c", other, overwrite=True)
    assert len(c2) == 0 and c2.missing(["a"]) == ["a"] and shard_files(tmp_path / "c") == []
    assert read_json(tmp_path / "c" / "manifest.json")["meta"] == other
    c2.add(["a"], sketches(1, seed=3))
    assert SketchCache(tmp_path / "c", other, overwrite=True).ids() == ["a"]  # same meta: reused


def test_cache_meta_diff():
    assert cache_meta_diff({"a": 1, "b": [1]}, {"a": 1, "b": [1]}) == []
    assert cache_meta_diff({"a": 1, "b": 2}, {"b": 3, "c": None}) == [
        "a: cached 1, requested <absent>",
        "b: cached 2, requested 3",
        "c: cached <absent>, requested null",
    ]


def test_tuple_meta_matches_its_json_form(tmp_path):
    SketchCache(tmp_path / "c", {**META, "hotwords": ("x", "y")})
    SketchCache(tmp_path / "c", {**META, "hotwords": ["x", "y"]})  # no mismatch


def test_bad_meta_and_shapes(tmp_path):
    with pytest.raises(RapidunError, match="'K'"):
        SketchCache(tmp_path / "a", {"seed": 0})
    with pytest.raises(RapidunError, match="JSON"):
        SketchCache(tmp_path / "b", {"K": 4, "f": object()})
    c = SketchCache(tmp_path / "c", META)
    with pytest.raises(RapidunError, match=r"shape \(2, 7\); expected \(2, 8\)"):
        c.add(["a", "b"], torch.zeros(2, K - 1))
    with pytest.raises(RapidunError, match=r"expected \(3, 8\)"):
        c.add(["a", "b", "c"], torch.zeros(2, K))
    with pytest.raises(RapidunError, match="NaN"):
        c.add(["a", "b"], torch.tensor([[0.0] * K, [float("nan")] * K]))
    with pytest.raises(RapidunError, match="fp16 overflow"):
        c.add(["a"], torch.full((1, K), 1e6))
    assert len(c) == 0 and shard_files(tmp_path / "c") == []


def test_duplicate_ids_refused(tmp_path):
    c = SketchCache(tmp_path / "c", META)
    c.add(["a", "b"], sketches(2))
    with pytest.raises(RapidunError, match=r"already holds ids 'b'.*missing"):
        c.add(["c", "b"], sketches(2))
    with pytest.raises(RapidunError, match="repeated"):
        c.add(["d", "d"], sketches(2))
    assert c.ids() == ["a", "b"] and len(shard_files(tmp_path / "c")) == 1


def test_unknown_id_error_names_first_missing(tmp_path):
    c = SketchCache(tmp_path / "c", META)
    c.add(["a"], sketches(1))
    with pytest.raises(RapidunError, match=r"2 id\(s\): 'zz', 'yy'"):
        c.load(["a", "zz", "yy"])


def test_crash_between_shard_and_manifest_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    real = cache_mod.write_json
    calls = []

    def flaky(path, obj):
        calls.append(path)
        if len(calls) == 2:  # 1st: manifest on open; 2nd: manifest after the shard written by add()
            raise RuntimeError("killed")
        real(path, obj)

    monkeypatch.setattr(cache_mod, "write_json", flaky)
    c = SketchCache(folder, META)
    with pytest.raises(RuntimeError, match="killed"):
        c.add(["a", "b"], sketches(2, seed=1))
    assert shard_files(folder) == ["shard-00000.pt"]  # orphan on disk, not in the manifest
    assert len(c) == 0
    monkeypatch.setattr(cache_mod, "write_json", real)

    c = SketchCache(folder, META)
    assert c.ids() == [] and c.missing(["a", "b", "c"]) == ["a", "b", "c"]
    assert shard_files(folder) == []  # orphan removed on open
    c.add(["z"], sketches(1, seed=4))
    g = sketches(3, seed=5)
    c.add(["a", "b", "c"], g)  # re-adding works
    again = SketchCache(folder, META)
    assert again.ids() == ["z", "a", "b", "c"] and shard_files(folder) == ["shard-00000.pt", "shard-00001.pt"]
    assert torch.equal(again.load(["c", "a"]), g.half().float()[[2, 0]])


def test_orphan_shards_and_temps_ignored_foreign_files_kept(tmp_path):
    folder = tmp_path / "c"
    c = SketchCache(folder, META)
    c.add(["a"], sketches(1))
    torch.save({"ids": ["ghost"], "sketch": torch.zeros(1, K, dtype=torch.float16)}, folder / "shard-00007.pt")
    (folder / ".shard-00008.pt.xyz.tmp").mkdir()
    (folder / "notes.txt").write_text("mine")
    c = SketchCache(folder, META)
    assert c.ids() == ["a"] and "ghost" not in c and c.missing(["ghost"]) == ["ghost"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt", "shard-00000.pt"]
    c.add(["ghost"], sketches(1))
    assert c.ids() == ["a", "ghost"]


def test_foreign_folder_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data.bin").write_text("x")
    with pytest.raises(RapidunError, match=r"not empty and holds no manifest\.json"):
        SketchCache(folder, META)
    c = SketchCache(folder, META, overwrite=True)
    assert len(c) == 0 and (folder / "data.bin").is_file()


def test_missing_listed_shard_and_corrupt_manifest(tmp_path):
    folder = tmp_path / "c"
    SketchCache(folder, META).add(["a"], sketches(1))
    (folder / "shard-00000.pt").unlink()
    with pytest.raises(RapidunError, match=r"missing \('shard-00000.pt'\)"):
        SketchCache(folder, META)
    assert len(SketchCache(folder, META, overwrite=True)) == 0
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(RapidunError, match="unreadable"):
        SketchCache(folder, META)


def test_second_writer_detected(tmp_path):
    a = SketchCache(tmp_path / "c", META)
    b = SketchCache(tmp_path / "c", META)
    a.add(["x"], sketches(1))
    with pytest.raises(RapidunError, match="another process"):
        b.add(["y"], sketches(1))
    assert SketchCache(tmp_path / "c", META).ids() == ["x"]
