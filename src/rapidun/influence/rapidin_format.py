"""Reader of the RapidIn reference implementation's retrieval outputs (``influence_results_*.json``).

Used to check our weighting step against the authors' released influence files and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rapidun.errors import RapidunError


def load_rapidin_json(path: str | Path, n_train: int, n_test: int, fill: float | None = None) -> np.ndarray:
    """Dense influence matrix from a RapidIn retrieval output file (the authors' ``influence_results_*.json``).

    The file maps each test index (a string) to ``{"test_data", "helpful": [train indices, most positive
    first], "helpful_infl": [values], "harmful": [...], "harmful_infl": [...]}``; non-integer keys
    (``"config"``, ``"finished_cnt"``) are skipped. ``A[i, j]`` is the value listed for train ``i`` under test
    ``j`` in either list (a pair listed in both must carry the same value). RapidIn lists only its ``top_k``
    most helpful and most harmful train samples; the authors ran it with ``top_k`` 1000 ≥ N, so each list
    holds every train sample. A pair in neither list (a file retrieved with ``top_k < n_train/2``) is an error
    unless ``fill`` is given: such a value lies between the two lists, so ``fill=-inf`` makes it never kept and
    0 after :func:`topk_keep` — exact as long as ``k`` ≤ the helpful list's length.

    File names give the *train* set, ``T``, then the *test* set: ``FTR`` = forget as train, retain as test →
    the FR view ``(N_f, N_r)``; ``FTF`` → FF, ``RTF`` → RF ``(N_r, N_f)``, ``RTR`` → RR.

    Args:
        path: The JSON file.
        n_train: Number of train samples (rows).
        n_test: Number of test samples (columns); the file must hold exactly test keys ``0 … n_test − 1``.
        fill: Value for pairs listed in neither list; ``None`` = raise.

    Returns:
        ``numpy.ndarray`` ``(n_train, n_test)`` float64.

    Raises:
        RapidunError: Unreadable file, missing or extra test keys, malformed entries, out-of-range or
            conflicting train indices, or unlisted pairs without ``fill``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RapidunError(f"{path}: cannot read RapidIn results: {e}") from None
    if not isinstance(data, dict):
        raise RapidunError(f"{path}: expected a JSON object mapping test index -> results")
    tests = {int(k): v for k, v in data.items() if k.strip().isdigit()}
    if sorted(tests) != list(range(n_test)):
        missing = sorted(set(range(n_test)) - set(tests))[:5]
        extra = sorted(set(tests) - set(range(n_test)))[:5]
        raise RapidunError(
            f"{path}: expected test keys 0..{n_test - 1}; missing {missing}, unexpected {extra} "
            "(first five). Is n_test right, and is the file's test set the one you meant (…T<test>.json)?"
        )
    A = np.full((n_train, n_test), np.nan)  # (n_train, n_test)
    for j, entry in tests.items():
        if not isinstance(entry, dict):
            raise RapidunError(f"{path}: test {j}: expected an object with 'helpful'/'harmful' lists")
        for lst in ("helpful", "harmful"):
            idx, val = entry.get(lst), entry.get(f"{lst}_infl")
            if not (isinstance(idx, list) and isinstance(val, list) and len(idx) == len(val)):
                raise RapidunError(f"{path}: test {j}: '{lst}' and '{lst}_infl' must be lists of equal length")
            ii = np.asarray(idx, dtype=np.int64)  # (L,)
            vv = np.asarray(val, dtype=np.float64)  # (L,)
            if len(ii) and (ii.min() < 0 or ii.max() >= n_train):
                raise RapidunError(f"{path}: test {j}: train index out of range 0..{n_train - 1} in '{lst}'")
            if not np.isfinite(vv).all():
                raise RapidunError(f"{path}: test {j}: non-finite influence value in '{lst}_infl'")
            prev = A[ii, j]  # (L,)
            clash = ~np.isnan(prev) & (prev != vv)
            if clash.any():
                raise RapidunError(f"{path}: test {j}: train {int(ii[clash][0])} listed twice with different values")
            A[ii, j] = vv
    unlisted = np.isnan(A)  # (n_train, n_test)
    if unlisted.any():
        if fill is None:
            i, j = np.argwhere(unlisted)[0]
            raise RapidunError(
                f"{path}: {int(unlisted.sum())} (train, test) pairs are in neither list (first: train {i}, test {j}); "
                "the file was retrieved with top_k < n_train — pass fill=-inf to treat them as never kept"
            )
        A[unlisted] = fill
    return A
