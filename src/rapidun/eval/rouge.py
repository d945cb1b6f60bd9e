"""ROUGE-L between generated and reference texts (word level, F-measure with β = 1).

Tokens are lower-case alphanumeric runs (``[a-z0-9]+``), so case and punctuation are ignored. With ``L`` the length
of the longest common subsequence (LCS) of the two token lists, ``P = L / |pred|`` and ``R = L / |ref|``,
``ROUGE-L = 2PR / (P + R) = 2L / (|pred| + |ref|)``.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text`` (punctuation and whitespace dropped)."""
    return _TOKEN.findall(text.lower())


def lcs_len(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``.

    Dynamic programme ``L[i][j] = L[i-1][j-1] + 1`` if ``a[i-1] == b[j-1]`` else ``max(L[i-1][j], L[i][j-1])``,
    kept as one rolling row of length ``len(b) + 1``: O(len(a)·len(b)) time, O(len(b)) memory.
    """
    if len(b) > len(a):
        a, b = b, a  # shorter row
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # L[i-1][j-1]
        for j, y in enumerate(b, start=1):
            up = row[j]  # L[i-1][j]
            row[j] = diag + 1 if x == y else max(up, row[j - 1])
            diag = up
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 of ``pred`` against ``ref``: ``2PR / (P + R)``, ``P = L/|pred|``, ``R = L/|ref|``.

    Returns 0.0 when either side has no tokens or the LCS is empty.
    """
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    if not p or not r:
        return 0.0
    lcs = lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def mean_rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L over aligned pairs (lengths must match; 0.0 for no pairs)."""
    scores = [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0
