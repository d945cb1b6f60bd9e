"""ROUGE-L: LCS against brute force, known values, tokenisation."""

from __future__ import annotations

import itertools
import random

import pytest

from rapidun.eval.rouge import lcs_len, mean_rouge_l, rouge_l, rouge_tokens


def _is_subseq(s: tuple[str, ...], b: list[str]) -> bool:
    it = iter(b)
    return all(x in it for x in s)


def _lcs_brute(a: list[str], b: list[str]) -> int:
    """Longest subsequence of ``a`` (all 2^|a| of them) that is also a subsequence of ``b``."""
    for k in range(len(a), 0, -1):
        if any(_is_subseq(c, b) for c in itertools.combinations(a, k)):
            return k
    return 0


@pytest.mark.parametrize("seed", range(300))
def test_lcs_matches_brute_force(seed):
    rng = random.Random(seed)
    vocab = "abcd"[: rng.randint(1, 4)]
    a = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
    b = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
    want = _lcs_brute(a, b)
    assert lcs_len(a, b) == want
    assert lcs_len(b, a) == want


def test_lcs_known():
    assert lcs_len([], ["a"]) == 0
    assert lcs_len(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_len(list("abc"), list("abc")) == 3


def test_tokens_case_punctuation():
    assert rouge_tokens("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert rouge_tokens("  ...  ") == []
    assert rouge_tokens("A-B_c") == ["a", "b", "c"]


def test_rouge_known_values():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("The CAT, sat!", "the cat sat") == 1.0
    assert rouge_l("dog runs", "the cat sat") == 0.0
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "!!") == 0.0
    # pred = the cat sat on the mat (6), ref = the cat lay on a mat (6): LCS = the cat on mat = 4
    # P = R = 4/6 → F = 4/6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # pred = a b (2), ref = a x b y (4): LCS 2, P = 1, R = 1/2 → F = 2·1·0.5/1.5 = 2/3
    assert rouge_l("a b", "a x b y") == pytest.approx(2 / 3)


def test_mean_rouge_l():
    assert mean_rouge_l([], []) == 0.0
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])
