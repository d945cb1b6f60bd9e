"""RapidGrad sketch: precomputed (bin, sign) map equals the literal pad→permute→sign→bin-sum pipeline,
is reproducible from its seed, and preserves inner products in expectation over seeds."""

from __future__ import annotations

import pytest
import torch

from rapidun.errors import RapidunError
from rapidun.influence.sketch import RapidGrad, padded_length, structured_permutation

# (D, K): multiple of K, not a multiple, D < 2K, D < K (mostly empty bins), odd K, prime D.
SHAPES = [(4096, 256), (1000, 64), (100, 64), (30, 64), (210, 7), (97, 8)]


@pytest.mark.parametrize(("D", "K"), SHAPES)
def test_padded_length(D, K):
    Dp = padded_length(D, K)
    assert Dp % K == 0 and D <= Dp < D + K


@pytest.mark.parametrize(("D", "K"), SHAPES)
def test_index_add_matches_dense_reference_exactly_on_integers(D, K):
    sk = RapidGrad(D, K, seed=3)
    g = torch.randint(-50, 51, (D,), generator=torch.Generator().manual_seed(D)).float()  # sums exact in fp32
    fast = sk.project(g)  # (K,)
    ref = sk.project_dense_reference(g)  # (K,) float64
    assert fast.shape == (K,) and fast.dtype == torch.float32
    assert torch.equal(fast.double(), ref)


@pytest.mark.parametrize(("D", "K"), SHAPES)
def test_index_add_matches_dense_reference_on_gaussians(D, K):
    sk = RapidGrad(D, K, seed=11, rounds=7)
    g = torch.randn(D, generator=torch.Generator().manual_seed(K))
    torch.testing.assert_close(sk.project(g).double(), sk.project_dense_reference(g), atol=1e-5, rtol=1e-6)


def test_map_is_a_balanced_bin_assignment_with_rademacher_signs():
    sk = RapidGrad(1000, 64, seed=0)
    assert sk.Dp == 1024 and sk.step == 16
    assert sk.bins.shape == (1000,) and sk.bins.dtype == torch.int64
    assert sk.signs.shape == (1000,) and sk.signs.dtype == torch.float32
    assert int(sk.bins.min()) >= 0 and int(sk.bins.max()) < 64
    assert int(torch.bincount(sk.bins, minlength=64).max()) <= sk.step  # each bin holds ≤ step positions
    assert set(sk.signs.unique().tolist()) == {-1.0, 1.0}
    assert sk.signed_bins.dtype == torch.int64  # the stored form: bin + K for negative signs
    assert torch.equal(sk.signed_bins, sk.bins + 64 * (sk.signs < 0))


def test_zero_rounds_means_contiguous_bins():
    sk = RapidGrad(100, 8, seed=5, rounds=0)  # Dp = 104, step = 13
    assert torch.equal(sk.bins, torch.arange(100) // 13)


def test_same_arguments_give_identical_maps_and_projections():
    a, b = RapidGrad(5000, 128, seed=7), RapidGrad(5000, 128, seed=7)
    assert torch.equal(a.bins, b.bins) and torch.equal(a.signs, b.signs)
    G = torch.randn(3, 5000)
    assert torch.equal(a.project(G), b.project(G))
    assert a.fingerprint() == b.fingerprint()
    fp = a.fingerprint()
    assert {k: fp[k] for k in ("D", "K", "seed", "rounds")} == {"D": 5000, "K": 128, "seed": 7, "rounds": 40}
    assert isinstance(fp["map_hash"], str) and len(fp["map_hash"]) == 16


def test_different_seed_or_length_gives_a_different_map():
    base = RapidGrad(5000, 128, seed=7)
    other = RapidGrad(5000, 128, seed=8)
    assert not torch.equal(base.bins, other.bins)
    assert not torch.equal(base.signs, other.signs)
    assert base.fingerprint()["map_hash"] != other.fingerprint()["map_hash"]
    longer = RapidGrad(5001, 128, seed=7)  # the generator is seeded from (seed, D)
    assert not torch.equal(base.signs, longer.signs[:5000])


@pytest.mark.parametrize("n", [1, 2, 97, 720, 3008, 4096, 2 * 3 * 5 * 7 * 11 * 13])
def test_structured_permutation_is_a_permutation(n):
    perm = structured_permutation(n, 40, torch.Generator().manual_seed(1))
    assert perm.shape == (n,) and perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(n))
    if n > 2:
        assert not torch.equal(perm, torch.arange(n))  # actually shuffles, prime n included
    again = structured_permutation(n, 40, torch.Generator().manual_seed(1))
    assert torch.equal(perm, again)


def _is_block_row_permutation(perm: torch.Tensor, c: int) -> bool:
    """True if ``perm`` viewed as (n/c, c) has rows that are whole contiguous blocks ``[m·c, (m+1)·c)``."""
    rows = perm.view(-1, c)  # (n/c, c)
    return bool((rows - rows[:, :1] == torch.arange(c)).all() and (rows[:, 0] % c == 0).all())


def test_structured_permutation_gather_convention_and_block_structure():
    n = 24
    assert torch.equal(structured_permutation(n, 0, torch.Generator()), torch.arange(n))
    perm = structured_permutation(n, 1, torch.Generator().manual_seed(4))  # one row permutation of (d, n/d)
    x = torch.arange(n) * 10
    assert torch.equal(x[perm], perm * 10)  # out[j] = x[perm[j]]
    assert any(_is_block_row_permutation(perm, c) for c in (2, 3, 4, 6, 8, 12))  # rows of (n/c, c) moved whole


@pytest.fixture(scope="module")
def seeded_projections():
    """⟨Pa, Pb⟩ and ‖Pa‖² for fixed a, b over 400 seeds (D = 3000, K = 64)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, generator=gen, dtype=torch.float64)
    b = 0.3 * a + torch.randn(3000, generator=gen, dtype=torch.float64)
    AB = torch.stack([a, b]).float()  # (2, D)
    inner, sq = [], []
    for seed in range(400):
        P = RapidGrad(3000, 64, seed=seed).project(AB).double()  # (2, K)
        inner.append(float(P[0] @ P[1]))
        sq.append(float(P[0] @ P[0]))
    return a, b, torch.tensor(inner, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64)


def test_inner_product_is_unbiased_over_seeds(seeded_projections):
    a, b, inner, _ = seeded_projections
    se = inner.std() / len(inner) ** 0.5
    assert abs(float(inner.mean() - a @ b)) < 4 * float(se)
    assert float(inner.std()) > 0  # the sketch is random, not exact


def test_squared_norm_is_preserved_in_expectation(seeded_projections):
    a, _, _, sq = seeded_projections
    se = sq.std() / len(sq) ** 0.5
    assert abs(float(sq.mean() - a @ a)) < 4 * float(se)


def test_batch_projection_equals_per_row_projection():
    sk = RapidGrad(777, 32, seed=2)
    G = torch.randn(5, 777)
    batch = sk.project(G)  # (5, K)
    assert batch.shape == (5, 32) and batch.dtype == torch.float32
    rows = torch.stack([sk.project(g) for g in G])
    torch.testing.assert_close(batch, rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(sk.project(G.double()), batch, atol=1e-6, rtol=0)  # input cast to float32


def test_projection_is_linear():
    sk = RapidGrad(500, 16, seed=9)
    a, b = torch.randn(500), torch.randn(500)
    torch.testing.assert_close(sk.project(2 * a - b), 2 * sk.project(a) - sk.project(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(99,), (2, 101), (2, 3, 100), ()])
def test_wrong_input_shape_names_D(shape):
    sk = RapidGrad(100, 8)
    with pytest.raises(RapidunError, match="D=100"):
        sk.project(torch.zeros(shape))


def test_non_tensor_input_rejected():
    with pytest.raises(RapidunError, match="D=100"):
        RapidGrad(100, 8).project([0.0] * 100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"D": 100, "K": 0},
        {"D": 100, "K": -4},
        {"D": 0, "K": 8},
        {"D": -1, "K": 8},
        {"D": 100, "K": 8, "rounds": -1},
        {"D": 100, "K": 8.0},
        {"D": 100, "K": 8, "seed": "x"},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(RapidunError):
        RapidGrad(**kwargs)


def test_invalid_helper_arguments_raise():
    with pytest.raises(RapidunError):
        padded_length(10, 0)
    with pytest.raises(RapidunError):
        padded_length(0, 4)
    with pytest.raises(RapidunError):
        structured_permutation(0, 1, torch.Generator())
    with pytest.raises(RapidunError):
        structured_permutation(8, -1, torch.Generator())
