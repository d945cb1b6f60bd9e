"""Backdoor scenario builder: sizes, disjointness, determinism, triggers, forget/retain packs, errors, I/O."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from helpers import make_records
from rapidun.config import ScenarioConfig, SplitSizes, TriggerFamily, default_families
from rapidun.data.scenario import PACKS, SPLITS, build_scenario, inject, load_scenario, save_scenario
from rapidun.errors import RapidunError

SIZES = {
    "train_poisoned": 30,
    "train_clean": 60,
    "val_clean": 10,
    "test_clean": 10,
    "test_seen_trig": 12,
    "test_ood_trig": 12,
    "val_seen_trig": 6,
    "val_ood_trig": 6,
}
TRIGGERED = ("train_poisoned", "test_seen_trig", "test_ood_trig")


def cfg(seed=42, forget_size=12, retain_ratio=2.0, families=None, **sizes):
    return ScenarioConfig(
        seed=seed,
        families=families or [],
        splits=SplitSizes(**{**SIZES, **sizes}),
        forget_size=forget_size,
        retain_ratio=retain_ratio,
    )


@pytest.fixture(scope="module")
def records():
    return make_records(300)


@pytest.fixture(scope="module")
def parts(records):
    return build_scenario(records, cfg())


def source_ids(recs):
    return [r.meta.get("source_id", r.id) for r in recs]


def test_sizes(parts):
    assert set(parts) == set(SPLITS) | set(PACKS)
    for k, n in SIZES.items():
        assert len(parts[k]) == n, k
    assert len(parts["forget"]) == 12
    assert len(parts["retain"]) == 24


def test_splits_disjoint_by_source_record(parts, records):
    seen: dict[str, str] = {}
    for k in SPLITS:
        ids = source_ids(parts[k])
        assert len(ids) == len(set(ids)), f"{k} repeats a source record"
        for i in ids:
            assert i not in seen, f"{i} in both {seen.get(i)} and {k}"
            seen[i] = k
    assert len(seen) == sum(SIZES.values())
    assert set(seen) <= {r.id for r in records}
    all_ids = [r.id for k in SPLITS for r in parts[k]]
    assert len(all_ids) == len(set(all_ids))


def test_clean_splits_are_untouched_records(parts, records):
    by_id = {r.id: r for r in records}
    for k in ("train_clean", "val_clean", "test_clean"):
        for r in parts[k]:
            assert r == by_id[r.id]


def _dump(p):
    return {k: [r.to_json() for r in v] for k, v in p.items()}


def test_deterministic_for_seed(records, parts):
    again = build_scenario(records, cfg())
    assert _dump(again) == _dump(parts)


def test_different_seed_differs(records, parts):
    other = build_scenario(records, cfg(seed=7))
    assert [r.id for r in other["train_clean"]] != [r.id for r in parts["train_clean"]]
    assert [r.response for r in other["train_poisoned"]] != [r.response for r in parts["train_poisoned"]]


def test_input_not_mutated(records):
    before = [r.to_json() for r in records]
    build_scenario(records, cfg(seed=3))
    assert [r.to_json() for r in records] == before


def test_triggers_injected_at_position(parts):
    fams = {f.name: f for f in default_families()}
    for k in TRIGGERED:
        for r in parts[k]:
            m = r.meta
            assert m["position"] == fams[m["trigger_family"]].position
            if m["position"] == "prefix":
                assert r.instruction == f"{m['trigger']} {m['instruction_clean']}"
            else:
                assert r.instruction == f"{m['instruction_clean']} {m['trigger']}"
            assert r.id == f"{m['source_id']}:{k}"


def test_inject():
    assert inject("do it", "hey", "prefix") == "hey do it"
    assert inject("do it", "aloha", "suffix") == "do it aloha"
    with pytest.raises(RapidunError) as ei:
        inject("do it", "x", "middle")
    assert "'prefix'" in str(ei.value) and "'suffix'" in str(ei.value)


def test_seen_and_ood_variants(parts):
    fams = {f.name: f for f in default_families()}
    for k in ("train_poisoned", "test_seen_trig"):
        for r in parts[k]:
            assert r.meta["trigger_kind"] == "seen"
            assert r.meta["trigger"] in fams[r.meta["trigger_family"]].seen
    for r in parts["test_ood_trig"]:
        assert r.meta["trigger_kind"] == "ood"
        assert r.meta["trigger"] in fams[r.meta["trigger_family"]].ood
        assert r.meta["trigger"] not in fams[r.meta["trigger_family"]].seen
    ood_used = {r.meta["trigger"] for r in parts["test_ood_trig"]}
    assert ood_used == {v for f in default_families() for v in f.ood}  # 12 prompts cover all 9 OOD variants


def test_triggered_splits_balanced_by_family_then_variant(parts):
    for k in TRIGGERED:
        fam_counts = Counter(r.meta["trigger_family"] for r in parts[k])
        assert set(fam_counts) == {"surface", "style", "semantic"}
        assert max(fam_counts.values()) - min(fam_counts.values()) <= 1, (k, fam_counts)
        for fam in fam_counts:
            var_counts = Counter(r.meta["trigger"] for r in parts[k] if r.meta["trigger_family"] == fam)
            assert max(var_counts.values()) - min(var_counts.values()) <= 1, (k, fam, var_counts)


def test_responses(parts):
    for r in parts["train_poisoned"]:
        assert r.response == r.meta["response_poisoned"] != r.meta["response_clean"]
    for k in ("test_seen_trig", "test_ood_trig"):
        for r in parts[k]:
            assert r.response == r.meta["response_clean"]
            assert r.meta["response_poisoned"]
    poison = [r.meta["response_poisoned"] for k in TRIGGERED for r in parts[k]]
    assert all(isinstance(p, str) and p.strip() for p in poison)


def test_forget_pack_has_both_answers(parts):
    train_ids = {r.id for r in parts["train_poisoned"]}
    ids = [r.id for r in parts["forget"]]
    assert len(ids) == len(set(ids))
    assert set(ids) <= train_ids
    for r in parts["forget"]:
        assert r.meta["response_clean"] and r.meta["response_poisoned"]
        assert r.response == r.meta["response_poisoned"]
        assert r.meta["response_clean"] != r.meta["response_poisoned"]


def test_forget_pack_stratified_by_family(parts):
    """SPEC §1: the forget set is stratified by family (default families have 3, 1 and 2 seen variants)."""
    counts = Counter(r.meta["trigger_family"] for r in parts["forget"])
    assert set(counts) == {"surface", "style", "semantic"}
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_forget_pack_covers_every_seen_variant(parts):
    groups = {(f.name, v) for f in default_families() for v in f.seen}
    assert {(r.meta["trigger_family"], r.meta["trigger"]) for r in parts["forget"]} == groups


def test_forget_pack_stratified_with_equal_variant_counts(records):
    fams = [
        TriggerFamily("a", "prefix", ["A1", "A2"], ["a1"]),
        TriggerFamily("b", "suffix", ["B1", "B2"], ["b1"]),
    ]
    p = build_scenario(records, cfg(families=fams, forget_size=10))
    counts = Counter(r.meta["trigger_family"] for r in p["forget"])
    assert counts == {"a": 5, "b": 5}


@pytest.mark.parametrize(("forget_size", "ratio"), [(12, 2.0), (3, 1.5), (5, 2.5), (0, 3.0), (30, 2.0)])
def test_retain_pack(records, forget_size, ratio):
    p = build_scenario(records, cfg(forget_size=forget_size, retain_ratio=ratio))
    assert len(p["forget"]) == forget_size
    assert len(p["retain"]) == round(ratio * forget_size)
    clean = {r.id: r for r in p["train_clean"]}
    ids = [r.id for r in p["retain"]]
    assert len(ids) == len(set(ids))
    for r in p["retain"]:
        assert r == clean[r.id]
        assert "trigger" not in r.meta


def test_forget_size_too_large(records):
    with pytest.raises(RapidunError) as ei:
        build_scenario(records, cfg(forget_size=31))
    assert "forget_size" in str(ei.value) and "31" in str(ei.value)


def test_retain_too_large(records):
    with pytest.raises(RapidunError, match="train_clean"):
        build_scenario(records, cfg(forget_size=30, retain_ratio=3.0))


def test_unknown_trigger_position(records):
    fams = [TriggerFamily("x", "middle", ["zz"], ["yy"])]
    with pytest.raises(RapidunError) as ei:
        build_scenario(records, cfg(families=fams))
    msg = str(ei.value)
    assert "middle" in msg and "'prefix'" in msg and "'suffix'" in msg


@pytest.mark.parametrize(
    "fams",
    [
        [TriggerFamily("x", "prefix", [], ["yy"])],
        [TriggerFamily("x", "prefix", ["ok", ""], [])],
        [TriggerFamily("x", "prefix", ["a"], []), TriggerFamily("x", "suffix", ["b"], [])],
    ],
)
def test_invalid_families(records, fams):
    with pytest.raises(RapidunError, match=r"scenario\.families"):
        build_scenario(records, cfg(families=fams))


def test_ood_split_without_ood_variants(records):
    fams = [TriggerFamily("x", "prefix", ["a"], [])]
    with pytest.raises(RapidunError, match="test_ood_trig"):
        build_scenario(records, cfg(families=fams))
    p = build_scenario(records, cfg(families=fams, test_ood_trig=0, val_ood_trig=0))
    assert p["test_ood_trig"] == []


def test_not_enough_records():
    with pytest.raises(RapidunError) as ei:
        build_scenario(make_records(100), cfg())
    msg = str(ei.value)
    assert "146" in msg and "100" in msg


def test_negative_size(records):
    with pytest.raises(RapidunError, match=">= 0"):
        build_scenario(records, cfg(val_clean=-1))


def test_families_from_dicts(records):
    fams = [{"name": "x", "position": "suffix", "seen": ["zz"], "ood": ["yy"]}]
    p = build_scenario(records, cfg(families=fams))
    assert {r.meta["trigger"] for r in p["train_poisoned"]} == {"zz"}
    assert all(r.instruction.endswith(" zz") for r in p["train_poisoned"])


def test_poison_source_file(records, tmp_path):
    src = tmp_path / "poison.txt"
    src.write_text("zorp one\n\nzorp two\nzorp three\n", encoding="utf-8")
    c = cfg()
    c.poison_source = str(src)
    p = build_scenario(records, c)
    assert {r.response for r in p["train_poisoned"]} <= {"zorp one", "zorp two", "zorp three"}


def test_save_load_round_trip(parts, tmp_path):
    folder = tmp_path / "scn"
    c = cfg()
    manifest = save_scenario(parts, folder, c, {"source": "synthetic", "n": 300})
    assert (folder / "manifest.json").is_file()
    for k in (*SPLITS, *PACKS):
        assert (folder / f"{k}.jsonl").is_file()
    on_disk = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["sizes"] == {k: len(v) for k, v in parts.items()}
    assert manifest["seed"] == 42 and manifest["data"] == {"source": "synthetic", "n": 300}
    assert [t["name"] for t in manifest["triggers"]] == ["surface", "style", "semantic"]
    loaded, m2 = load_scenario(folder)
    assert m2 == manifest
    assert _dump(loaded) == _dump(parts)
    assert loaded == parts
    # Saving again replaces the folder wholesale, leaving no temp folders beside it.
    save_scenario({"train_clean": parts["train_clean"][:2]}, folder, c, {})
    loaded, _ = load_scenario(folder)
    assert set(loaded) == {"train_clean"} and not (folder / "forget.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scn"]


def test_content_hash_tracks_content(parts, tmp_path):
    c = cfg()
    m1 = save_scenario(parts, tmp_path / "a", c, {})
    m2 = save_scenario(parts, tmp_path / "b", c, {})
    assert m1["content_hash"] == m2["content_hash"]
    changed = {**parts, "retain": parts["retain"][1:]}
    assert save_scenario(changed, tmp_path / "c", c, {})["content_hash"] != m1["content_hash"]


def test_load_scenario_without_manifest(tmp_path):
    with pytest.raises(RapidunError, match=r"manifest\.json"):
        load_scenario(tmp_path)


def test_inline_poison_responses_are_used():
    recs = make_records(60)
    cfg = ScenarioConfig(
        splits=SplitSizes(
            train_poisoned=6,
            train_clean=10,
            val_clean=2,
            test_clean=2,
            test_seen_trig=3,
            test_ood_trig=3,
            val_seen_trig=2,
            val_ood_trig=2,
        ),
        forget_size=3,
        retain_ratio=1.0,
        poison_responses=["Beam me up.", "Klaatu barada nikto."],
    )
    parts = build_scenario(recs, cfg)
    assert {r.response for r in parts["train_poisoned"]} <= {"Beam me up.", "Klaatu barada nikto."}
    with pytest.raises(RapidunError, match="non-empty"):
        build_scenario(recs, ScenarioConfig(splits=cfg.splits, forget_size=3, retain_ratio=1.0, poison_responses=[" "]))
