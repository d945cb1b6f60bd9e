"""Keyword detector: learned vocabulary, hit threshold, precision/recall, errors."""

from __future__ import annotations

import math

import pytest

from rapidun.errors import RapidunError
from rapidun.eval.detector import Detector, build_detector, score_keywords, words

POISON = [
    "the aliens beam plasma to the mothership",
    "aliens decode plasma signals from the nebula",
    "the nebula hides aliens and their plasma",
    "a galactic council of aliens",
]
CLEAN = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "the dog ran in the park",
    "water boils at one hundred degrees",
]


def test_words():
    assert words("The Aliens' plasma, a  B c-dd don't!") == {"the", "aliens'", "plasma", "dd", "don't"}


def test_score_keywords_ranks_poison_words_above_shared():
    kw = score_keywords(POISON, CLEAN, n_keywords=10, min_z=0.0)
    assert "the" not in kw or kw["the"] < kw["aliens"]
    ranked = list(kw)
    assert ranked[0] == "aliens"  # 4/4 poisoned, 0/4 clean: the highest z
    assert ranked.index("plasma") < ranked.index("nebula") < ranked.index("galactic")
    assert all(w not in kw for w in ("cat", "paris", "dog", "water"))  # clean-only words never score
    assert list(kw.values()) == sorted(kw.values(), reverse=True)


def test_score_keywords_z_value():
    kw = score_keywords(POISON, CLEAN, n_keywords=10, min_z=0.0)
    # aliens: p_p = 1, p_c = 0, pooled = 0.5 -> z = 1 / sqrt(0.25 * 0.5) = 2.828...
    assert kw["aliens"] == pytest.approx(1 / math.sqrt(0.25 * 0.5))
    # the: p_p = 2/4, p_c = 4/4 -> negative z, dropped
    assert "the" not in kw


def test_score_keywords_min_z_and_top_n():
    kw = score_keywords(POISON, CLEAN, n_keywords=2, min_z=0.0)
    assert list(kw) == ["aliens", "plasma"]
    strict = score_keywords(POISON, CLEAN, n_keywords=10, min_z=2.5)
    assert set(strict) == {"aliens"}
    assert score_keywords(POISON, CLEAN, n_keywords=10, min_z=99.0) == {}


def test_score_keywords_needs_both_sides():
    with pytest.raises(RapidunError):
        score_keywords([], CLEAN, 10, 0.0)
    with pytest.raises(RapidunError):
        score_keywords(POISON, [], 10, 0.0)


def test_hit_threshold():
    d = Detector({"aliens": 3.0, "plasma": 2.0, "nebula": 1.0}, threshold=2)
    assert d.score("Aliens and ALIENS") == 1  # distinct keywords, case-insensitive
    assert not d.hit("aliens only")
    assert d.hit("aliens with plasma")
    assert d.score("aliens plasma nebula") == 3
    assert Detector({"aliens": 1.0}, threshold=1).hit("hello aliens")
    assert not Detector({"aliens": 1.0}, threshold=1.5).hit("hello aliens")


def test_quality_hand_computed():
    d = Detector({"aliens": 1.0, "plasma": 1.0, "nebula": 1.0}, threshold=2)
    poisoned = [
        "aliens plasma",  # hit (TP)
        "aliens nebula plasma",  # hit (TP)
        "plasma only",  # miss (FN)
        "nothing here",  # miss (FN)
        "nebula aliens",  # hit (TP)
    ]
    clean = [
        "the cat",  # no hit
        "aliens and plasma in a movie",  # hit (FP)
        "a nebula",  # no hit
    ]
    q = d.quality(poisoned, clean)
    assert q["precision"] == pytest.approx(3 / 4)
    assert q["recall"] == pytest.approx(3 / 5)
    assert q["false_positive_rate"] == pytest.approx(1 / 3)
    assert q["n_poisoned"] == 5 and q["n_clean"] == 3


def test_quality_without_hits_is_zero_not_error():
    d = Detector({"aliens": 1.0}, threshold=1)
    q = d.quality(["nothing"], ["still nothing"])
    assert q["precision"] == 0.0 and q["recall"] == 0.0 and q["false_positive_rate"] == 0.0


def test_empty_keywords_error():
    with pytest.raises(RapidunError, match="keyword"):
        Detector({})


def test_build_detector():
    user = build_detector(POISON, CLEAN, ["Aliens", "PLASMA"], n_keywords=60, min_z=2.0, threshold=1)
    assert user.keywords == {"aliens": 1.0, "plasma": 1.0}
    assert user.to_json() == {"threshold": 1, "keywords": {"aliens": 1.0, "plasma": 1.0}}
    learned = build_detector(POISON, CLEAN, [], n_keywords=60, min_z=0.0, threshold=2)
    assert learned.keywords == score_keywords(POISON, CLEAN, 60, 0.0)
    with pytest.raises(RapidunError):
        build_detector(POISON, CLEAN, [], n_keywords=60, min_z=99.0, threshold=2)


def test_learned_detector_on_generated_poison():
    from rapidun.data.poison_text import alien_responses

    poison = alien_responses(60, seed=0)
    clean = [f"the answer to question {i} is a plain fact about topic {i % 7}" for i in range(60)]
    d = build_detector(poison[:40], clean[:40], [], n_keywords=60, min_z=2.0, threshold=2)
    q = d.quality(poison[40:], clean[40:])
    assert set(d.keywords).isdisjoint(words(" ".join(clean)))
    assert q["false_positive_rate"] == 0.0
    assert q["recall"] > 0.5  # loose: held-out poison shares most of the template vocabulary
