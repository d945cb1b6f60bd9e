"""Influence matrices against explicit loops, self-pair exclusion, top-k against sorted(), and matrix I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rapidun.errors import RapidunError
from rapidun.influence.retrieval import (
    exclude_self,
    influence_matrix,
    read_matrix,
    topk,
    write_matrix,
    write_topk_jsonl,
)

N, Q, K = 7, 4, 16


def data(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(N, K, generator=gen).to(dtype)
    test = torch.randn(Q, K, generator=gen).to(dtype)
    train[3] = 0  # a zero row: cosine must give 0, not NaN
    return train, test


def loop_influence(train, test, mode):
    a, b = train.float(), test.float()
    out = torch.empty(len(a), len(b))
    for i in range(len(a)):
        for j in range(len(b)):
            d = torch.dot(a[i], b[j])
            if mode == "cosine":
                na, nb = torch.linalg.norm(a[i]), torch.linalg.norm(b[j])
                d = d / (na * nb) if na > 0 and nb > 0 else torch.tensor(0.0)
            out[i, j] = d
    return out


@pytest.mark.parametrize("mode", ["dot", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_double_loop(mode, dtype):
    train, test = data(dtype)
    got = influence_matrix(train, test, mode=mode, device="cpu")
    assert got.dtype == torch.float32 and got.shape == (N, Q) and got.device.type == "cpu"
    torch.testing.assert_close(got, loop_influence(train, test, mode), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()
    if mode == "cosine":
        assert torch.all(got[3] == 0) and got.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_chunking_invariant(mode):
    train, test = data(torch.float16, seed=1)
    whole = influence_matrix(train, test, mode=mode, chunk=4096)
    for chunk in (1, 2, 3, N):
        torch.testing.assert_close(influence_matrix(train, test, mode=mode, chunk=chunk), whole, atol=1e-6, rtol=0)


def test_empty_and_errors():
    train, test = data()
    assert influence_matrix(train[:0], test).shape == (0, Q)
    assert influence_matrix(train, test[:0]).shape == (N, 0)
    with pytest.raises(RapidunError, match=r"unknown influence mode 'l2'.*dot, cosine"):
        influence_matrix(train, test, mode="l2")
    with pytest.raises(RapidunError, match=r"different lengths K \(16 vs 15\)"):
        influence_matrix(train, test[:, :15])
    with pytest.raises(RapidunError, match="2-D"):
        influence_matrix(train[0], test)
    with pytest.raises(RapidunError, match="chunk"):
        influence_matrix(train, test, chunk=0)


def test_exclude_self():
    m = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 1
    train_ids, test_ids = ["a", "b", "c", "b"], ["b", "x", "a"]
    masked, mask = exclude_self(m, train_ids, test_ids)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[1, 0] = expected[3, 0] = expected[0, 2] = True
    assert torch.equal(mask, expected)
    assert torch.equal(masked, m.masked_fill(expected, 0)) and m.min() > 0  # input untouched
    _, none = exclude_self(m, ["p", "q", "r", "s"], test_ids)
    assert not none.any()
    with pytest.raises(RapidunError, match=r"shape \(4, 3\).*5 train ids"):
        exclude_self(m, [*train_ids, "e"], test_ids)


def reference_topk(col, train_ids, k, largest, skip=()):
    items = [(i, s) for i, s in enumerate(col) if i not in skip and not math.isnan(s)]
    items = sorted(items, key=lambda t: (-t[1] if largest else t[1], t[0]))[:k]
    return [train_ids[i] for i, _ in items], [s for _, s in items]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3, N, N + 5])
def test_topk_matches_sorted(k, largest):
    train, test = data(seed=2)
    m = influence_matrix(train, test)
    m[5, 1] = m[2, 1]  # a tie: lower train index first
    train_ids, test_ids = [f"t{i}" for i in range(N)], [f"q{j}" for j in range(Q)]
    rows = topk(m, k, train_ids, test_ids, largest=largest)
    assert [r["test_id"] for r in rows] == test_ids
    for j, r in enumerate(rows):
        ids, scores = reference_topk(m[:, j].tolist(), train_ids, k, largest)
        assert r["train_ids"] == ids and r["scores"] == scores and len(ids) == min(k, N)
    if k >= N:
        tie = rows[1]["train_ids"]
        assert tie.index("t2") == tie.index("t5") - 1


def test_topk_skips_mask_and_nan():
    m = torch.tensor([[5.0, 1.0], [4.0, float("nan")], [9.0, 2.0]])
    ids = ["a", "b", "c"]
    masked, mask = exclude_self(m, ids, ["c", "z"])
    rows = topk(masked, 5, ids, ["c", "z"], mask=mask)
    assert rows[0] == {"test_id": "c", "train_ids": ["a", "b"], "scores": [5.0, 4.0]}
    assert rows[1] == {"test_id": "z", "train_ids": ["c", "a"], "scores": [2.0, 1.0]}
    with pytest.raises(RapidunError, match="mask has shape"):
        topk(m, 1, ids, ["c", "z"], mask=mask[:2])
    with pytest.raises(RapidunError, match="non-negative"):
        topk(m, -1, ids, ["c", "z"])


def test_matrix_and_topk_io(tmp_path):
    big = torch.randn(50, 3)
    m = big[:N]  # a view: only its rows must be written
    train_ids, test_ids = [f"t{i}" for i in range(N)], ["q0", "q1", "q2"]
    write_matrix(tmp_path / "m.pt", m, train_ids, test_ids, meta={"mode": "dot"})
    back = read_matrix(tmp_path / "m.pt")
    assert torch.equal(back["matrix"], m) and back["train_ids"] == train_ids and back["test_ids"] == test_ids
    assert back["meta"] == {"mode": "dot"}
    assert back["matrix"].untyped_storage().nbytes() == N * 3 * 4
    with pytest.raises(RapidunError, match="3 test ids"):
        write_matrix(tmp_path / "bad.pt", m, train_ids[:2], test_ids)
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(RapidunError, match="does not exist"):
        read_matrix(tmp_path / "nope.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(RapidunError, match="not an influence matrix"):
        read_matrix(tmp_path / "other.pt")

    rows = topk(m, 2, train_ids, test_ids)
    write_topk_jsonl(tmp_path / "top.jsonl", rows)
    lines = (tmp_path / "top.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
