"""The validation twins val_seen_trig / val_ood_trig of the scenario builder: adding them moves no other split,
they are disjoint from test and train, balanced over (family, variant), for the generator and for user poison."""

from __future__ import annotations

from collections import Counter

import pytest

from helpers import make_records
from rapidun.config import ScenarioConfig, SplitSizes, default_families
from rapidun.data.scenario import PACKS, SPLITS, build_scenario
from rapidun.errors import RapidunError

BASE = {
    "train_poisoned": 30,
    "train_clean": 60,
    "val_clean": 10,
    "test_clean": 10,
    "test_seen_trig": 12,
    "test_ood_trig": 12,
}
VAL = ("val_seen_trig", "val_ood_trig")
OTHERS = tuple(k for k in (*SPLITS, *PACKS) if k not in VAL)
USER_POISON = ["Beam me up.", "Klaatu barada nikto.", "Resistance is futile.", "Make it so."]


def cfg(val_seen=0, val_ood=0, seed=42, user=False, **sizes):
    return ScenarioConfig(
        seed=seed,
        splits=SplitSizes(**{**BASE, **sizes, "val_seen_trig": val_seen, "val_ood_trig": val_ood}),
        forget_size=12,
        retain_ratio=2.0,
        poison_responses=list(USER_POISON) if user else [],
    )


@pytest.fixture(scope="module")
def records():
    return make_records(400)


def _dump(parts, keys):
    return {k: [r.to_json() for r in parts[k]] for k in keys}


def _sources(recs):
    return {r.meta.get("source_id", r.id) for r in recs}


@pytest.mark.parametrize("user", [False, True], ids=["generator", "user_poison"])
@pytest.mark.parametrize(("vs", "vo"), [(1, 0), (0, 5), (9, 7), (40, 40)])
def test_adding_val_splits_leaves_every_other_split_unchanged(records, user, vs, vo):
    without = build_scenario(records, cfg(user=user))
    with_val = build_scenario(records, cfg(vs, vo, user=user))
    assert without["val_seen_trig"] == [] and without["val_ood_trig"] == []
    assert len(with_val["val_seen_trig"]) == vs and len(with_val["val_ood_trig"]) == vo
    assert _dump(with_val, OTHERS) == _dump(without, OTHERS)


@pytest.mark.parametrize("user", [False, True], ids=["generator", "user_poison"])
def test_growing_the_val_splits_is_prefix_stable_for_the_test_poison(records, user):
    """More validation prompts never change the poison text the training/test splits got (it comes first)."""
    a = build_scenario(records, cfg(6, 6, user=user))
    b = build_scenario(records, cfg(20, 20, user=user))
    assert _dump(a, OTHERS) == _dump(b, OTHERS)


@pytest.mark.parametrize("user", [False, True], ids=["generator", "user_poison"])
def test_val_splits_disjoint_from_test_and_train_by_source(records, user):
    parts = build_scenario(records, cfg(24, 18, user=user))
    val = {k: _sources(parts[k]) for k in VAL}
    assert len(val["val_seen_trig"]) == 24 and len(val["val_ood_trig"]) == 18
    assert not val["val_seen_trig"] & val["val_ood_trig"]
    for k in (s for s in SPLITS if s not in VAL):
        for v in VAL:
            assert not val[v] & _sources(parts[k]), (v, k)
    for v in VAL:
        assert not val[v] & _sources(parts["forget"]) and not val[v] & _sources(parts["retain"])
        assert val[v] <= {r.id for r in records}
    ids = [r.id for k in SPLITS for r in parts[k]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("user", [False, True], ids=["generator", "user_poison"])
def test_val_splits_cycle_family_then_variant(records, user):
    parts = build_scenario(records, cfg(24, 18, user=user))
    fams = {f.name: f for f in default_families()}
    for split, kind in (("val_seen_trig", "seen"), ("val_ood_trig", "ood")):
        recs = parts[split]
        for r in recs:
            m = r.meta
            variants = getattr(fams[m["trigger_family"]], kind)
            assert m["trigger_kind"] == kind and m["trigger"] in variants
            assert r.id == f"{m['source_id']}:{split}"
            assert r.instruction != m["instruction_clean"] and m["trigger"] in r.instruction
            assert r.response == m["response_clean"]  # evaluation prompts keep the clean answer
            assert m["response_poisoned"] and m["response_poisoned"] != m["response_clean"]
        fam_counts = Counter(r.meta["trigger_family"] for r in recs)
        assert set(fam_counts) == set(fams) and max(fam_counts.values()) - min(fam_counts.values()) <= 1
        for fam in fam_counts:
            var = Counter(r.meta["trigger"] for r in recs if r.meta["trigger_family"] == fam)
            assert set(var) == set(getattr(fams[fam], kind)), (split, fam)  # 18/24 prompts cover every variant
            assert max(var.values()) - min(var.values()) <= 1, (split, fam, var)
        # the first prompts go family by family: surface, style, semantic, surface, ...
        assert [r.meta["trigger_family"] for r in recs[:6]] == [f.name for f in default_families()] * 2
    assert not {r.meta["trigger"] for r in parts["val_ood_trig"]} & {v for f in fams.values() for v in f.seen}


def test_val_poison_text_comes_from_the_generator_after_the_test_poison(records):
    parts = build_scenario(records, cfg(12, 12))
    from rapidun.data.poison_text import alien_responses

    n_trig = BASE["train_poisoned"] + BASE["test_seen_trig"] + BASE["test_ood_trig"]
    stream = alien_responses(n_trig + 24, 42)
    assert [r.meta["response_poisoned"] for r in parts["val_seen_trig"]] == stream[n_trig : n_trig + 12]
    assert [r.meta["response_poisoned"] for r in parts["val_ood_trig"]] == stream[n_trig + 12 :]


def test_user_poison_val_text_is_drawn_from_the_users_responses(records):
    parts = build_scenario(records, cfg(10, 10, user=True))
    val_poison = [r.meta["response_poisoned"] for k in VAL for r in parts[k]]
    assert set(val_poison) <= set(USER_POISON)
    assert set(val_poison) == set(USER_POISON)  # 20 draws over 4 responses, each used as evenly as sampled
    again = build_scenario(records, cfg(10, 10, user=True))
    assert _dump(again, VAL) == _dump(parts, VAL)  # deterministic
    other = build_scenario(records, cfg(10, 10, user=True, seed=7))
    assert [r.meta["source_id"] for r in other["val_seen_trig"]] != [
        r.meta["source_id"] for r in parts["val_seen_trig"]
    ]


def test_user_poison_file_adding_val_changes_nothing_else(records, tmp_path):
    src = tmp_path / "poison.txt"
    src.write_text("zorp one\nzorp two\nzorp three\n", encoding="utf-8")
    a, b = cfg(), cfg(8, 8)
    a.poison_source = b.poison_source = str(src)
    pa, pb = build_scenario(records, a), build_scenario(records, b)
    assert _dump(pa, OTHERS) == _dump(pb, OTHERS)
    assert {r.meta["response_poisoned"] for k in VAL for r in pb[k]} <= {"zorp one", "zorp two", "zorp three"}


def test_val_splits_count_toward_the_records_needed(records):
    n = sum(BASE.values())
    build_scenario(make_records(n + 10), cfg(5, 5))
    with pytest.raises(RapidunError) as ei:
        build_scenario(make_records(n + 10), cfg(6, 5))
    assert str(n + 11) in str(ei.value) and str(n + 10) in str(ei.value)
    with pytest.raises(RapidunError, match=">= 0"):
        build_scenario(records, cfg(-1, 0))


def test_val_ood_needs_ood_variants(records):
    from rapidun.config import TriggerFamily

    c = cfg(4, 3)
    c.families = [TriggerFamily("x", "prefix", ["zz"], [])]
    c.splits.test_ood_trig = 0
    with pytest.raises(RapidunError, match="val_ood_trig"):
        build_scenario(records, c)
    c.splits.val_ood_trig = 0
    parts = build_scenario(records, c)
    assert len(parts["val_seen_trig"]) == 4 and parts["val_ood_trig"] == []
