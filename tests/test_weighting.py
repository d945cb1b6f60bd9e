"""RapidUn weighting: each step against hand-computed values, vectorised steps against Python loops, and the
authors' released weights reproduced from their released influence files."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from rapidun.config import from_dict
from rapidun.errors import RapidunError
from rapidun.influence.rapidin_format import load_rapidin_json
from rapidun.weighting import (
    WeightingConfig,
    aggregate,
    bounded_weights,
    fuse,
    mask_self,
    normalize_mean,
    rapidun_weights,
    robust_center_scale,
    robust_scale,
    topk_keep,
)

REF = Path(__file__).parent / "fixtures" / "rapidun_reference"
NAN = math.nan
T = lambda rows: torch.tensor(rows, dtype=torch.float64)


def assert_same(got, want, atol=0.0):
    """Equal values, NaN where NaN (float64)."""
    torch.testing.assert_close(got, T(want), atol=atol, rtol=0, equal_nan=True)


# --- step 2: top-k ---------------------------------------------------------------------------------------------

M43 = [
    [5.0, -1.0, 2.0],
    [3.0, 4.0, -3.0],
    [-2.0, 6.0, 1.0],
    [1.0, 0.0, -4.0],
]


def test_topk_keep_by_hand():
    assert_same(topk_keep(T(M43), 2), [[5, 0, 2], [3, 4, 0], [0, 6, 1], [0, 0, 0]])
    assert_same(topk_keep(T(M43), 1), [[5, 0, 2], [0, 0, 0], [0, 6, 0], [0, 0, 0]])


def test_topk_keep_all_when_k_at_least_n():
    for k in (4, 40):
        assert_same(topk_keep(T(M43), k), M43)


def test_topk_keeps_raw_negative_values_and_breaks_ties_by_index():
    assert_same(topk_keep(T([[-3.0], [-1.0], [-2.0]]), 2), [[0], [-1], [-2]])
    assert_same(topk_keep(T([[1.0], [1.0], [1.0]]), 1), [[1], [0], [0]])
    assert_same(topk_keep(T([[0.0], [2.0], [2.0], [1.0]]), 2), [[0], [2], [2], [0]])


def test_topk_rejects_bad_k_and_inf():
    for k in (0, -1, 1.5, True):
        with pytest.raises(RapidunError, match="top_k"):
            topk_keep(T(M43), k)
    with pytest.raises(RapidunError, match="inf"):
        topk_keep(T([[math.inf, 1.0]]), 1)


# --- step 3: median --------------------------------------------------------------------------------------------


def test_aggregate_by_hand_odd_and_even():
    assert_same(aggregate(T([[5, 0, 2], [3, 4, 0], [0, 6, 1], [0, 0, 0]])), [2, 3, 1, 0])
    # even count: mean of the two middle values (numpy.median), not torch.median's lower one
    assert_same(aggregate(T([[1, 2, 3, 4], [4, 0, 0, 10], [-1, -3, 5, 7]])), [2.5, 2.0, 2.0])
    assert torch.median(T([1, 2, 3, 4])) == 2  # the definition we do *not* use


def test_aggregate_ignores_nan_and_rejects_empty_rows():
    assert_same(aggregate(T([[NAN, 1, 2, 9], [3, NAN, NAN, 1]])), [2.0, 2.0])
    with pytest.raises(RapidunError, match="no influence value left"):
        aggregate(T([[NAN, NAN], [1, 2]]))


# --- step 1: self-pairs ----------------------------------------------------------------------------------------

M33 = [[9.0, 1.0, 2.0], [3.0, 8.0, 4.0], [5.0, 6.0, 7.0]]


def test_mask_self_excluded_vs_included():
    assert_same(mask_self(T(M33)), [[NAN, 1, 2], [3, NAN, 4], [5, 6, NAN]])
    assert_same(mask_self(T(M33), include_self=True), M33)
    # excluded: never a top-1 candidate, and not one of the values the median is taken over
    kept = topk_keep(mask_self(T(M33)), 1)
    assert_same(kept, [[NAN, 0, 0], [0, NAN, 4], [5, 6, NAN]])
    assert_same(aggregate(kept), [0.0, 2.0, 5.5])
    # included (the authors' setting): the diagonal is each column's largest, so top-1 keeps only it
    kept_in = topk_keep(mask_self(T(M33), include_self=True), 1)
    assert_same(kept_in, [[9, 0, 0], [0, 8, 0], [0, 0, 7]])
    assert_same(aggregate(kept_in), [0.0, 0.0, 0.0])
    # k >= N with exclusion keeps the N - 1 off-diagonal values
    assert_same(aggregate(topk_keep(mask_self(T(M33)), 3)), [1.5, 3.5, 5.5])


def test_mask_self_needs_square_and_does_not_modify_input():
    M = T(M33)
    mask_self(M)
    assert not torch.isnan(M).any()
    with pytest.raises(RapidunError, match="square"):
        mask_self(T(M43))


# --- vectorised vs loops ---------------------------------------------------------------------------------------


def slow_topk_median(M, k):
    """Python double loop: per column keep the k largest non-NaN (ties: lower index), then per-row median."""
    n, q = len(M), len(M[0])
    kept = [[0.0] * q for _ in range(n)]
    for j in range(q):
        cand = [(-M[i][j], i) for i in range(n) if not math.isnan(M[i][j])]
        for _, i in sorted(cand)[:k]:
            kept[i][j] = M[i][j]
        for i in range(n):
            if math.isnan(M[i][j]):
                kept[i][j] = NAN
    med = [statistics.median([v for v in row if not math.isnan(v)]) for row in kept]
    return kept, med


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(7, 5), (6, 6), (1, 4), (9, 2)])
def test_vectorised_matches_loops(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(shape, generator=gen, dtype=torch.float64)
    if seed % 2:
        M = torch.round(M * 2)  # many ties
    if shape[0] == shape[1] and seed >= 2:
        M = mask_self(M)
    for k in (1, 3, 40):
        kept, med = slow_topk_median(M.tolist(), k)
        got = topk_keep(M, k)
        assert_same(got, kept)
        assert_same(aggregate(got), med, atol=1e-12)


def test_numpy_and_torch_inputs_agree():
    a = np.array(M43)
    assert_same(topk_keep(a, 2), topk_keep(T(M43), 2).tolist())
    assert topk_keep(a, 2).dtype == torch.float64
    with pytest.raises(RapidunError, match="tensor or numpy"):
        topk_keep(M43, 2)


# --- steps 4-6 -------------------------------------------------------------------------------------------------


def test_fuse_by_hand():
    s_f, s_r = fuse(T([1, 2]), T([0.5, 3]), T([1, 1, 1]), T([2, 0, 4]), alpha=2, beta=1, gamma=1, delta=0.5)
    assert_same(s_f, [1.5, 1.0])
    assert_same(s_r, [1.5, -0.5, 3.5])
    s_f, s_r = fuse(T([1, 2]), T([0.5, 3]), T([1, 1, 1]), T([2, 0, 4]))
    assert_same(s_f, [0.5, -1.0])
    assert_same(s_r, [1.0, -1.0, 3.0])
    with pytest.raises(RapidunError, match="forget sample"):
        fuse(T([1, 2]), T([1]), T([1]), T([1]))


def test_robust_scale_by_hand():
    S = T([1, 2, 3, 4, 100])  # median 3, |S - 3| = 2 1 0 1 97 → MAD 1; quartiles 2 and 4 → IQR 2
    assert robust_center_scale(S) == (3.0, 1.4826)
    assert_same(robust_scale(S), [-2 / 1.4826, -1 / 1.4826, 0, 1 / 1.4826, 97 / 1.4826])
    assert robust_center_scale(S, method="iqr") == (3.0, 2 / 1.349)
    assert_same(robust_scale(S, method="iqr"), [-2 * 1.349 / 2, -1.349 / 2, 0, 1.349 / 2, 97 * 1.349 / 2], atol=1e-12)


def test_robust_scale_floor_and_all_equal():
    # MAD 0 (three of four equal) → scale = floor
    assert robust_center_scale(T([0, 0, 0, 10])) == (0.0, 1e-3)
    assert_same(robust_scale(T([0, 0, 0, 10])), [0, 0, 0, 1e4])
    assert_same(robust_scale(T([0, 0, 0, 10]), floor=0.5), [0, 0, 0, 20])
    # spread above the floor is used as is
    assert robust_center_scale(T([0, 1, 2]), floor=1e-3)[1] == 1.4826
    assert robust_center_scale(T([0, 1, 2]), floor=10.0)[1] == 10.0
    for method in ("mad", "iqr"):
        assert_same(robust_scale(T([5, 5, 5]), method=method), [0, 0, 0])
        assert_same(robust_scale(T([-2.5]), method=method), [0])


def test_robust_scale_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10):
        s = rng.standard_normal(n)
        med = np.median(s)
        mad = 1.4826 * np.median(np.abs(s - med))
        np.testing.assert_allclose(robust_scale(s, floor=1e-9).numpy(), (s - med) / max(mad, 1e-9), rtol=1e-12)
        iqr = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349
        got = robust_scale(s, floor=1e-9, method="iqr").numpy()
        np.testing.assert_allclose(got, (s - med) / max(iqr, 1e-9), rtol=1e-12)


def test_robust_scale_rejects_bad_input():
    with pytest.raises(RapidunError, match="floor"):
        robust_scale(T([1, 2]), floor=0)
    with pytest.raises(RapidunError, match="unknown robust scale"):
        robust_scale(T([1, 2]), method="std")
    with pytest.raises(RapidunError, match="empty"):
        robust_scale(T([]))
    with pytest.raises(RapidunError, match="NaN"):
        robust_scale(T([1, NAN]))


def test_bounded_weights_and_saturation_by_hand():
    z = T([-2, -0.5, 0, 1, 3])
    w, low, high = bounded_weights(z, tau=1.0, w_min=0.5, w_max=2.0)
    assert_same(w, [0.5, math.exp(-0.5), 1, 2, 2], atol=1e-15)
    assert (low, high) == (0.2, 0.4)
    w, low, high = bounded_weights(z, tau=2.0, w_min=0.5, w_max=2.0)  # z/τ = -1 -0.25 0 0.5 1.5
    assert_same(w, [0.5, math.exp(-0.25), 1, math.exp(0.5), 2], atol=1e-15)
    assert (low, high) == (0.2, 0.2)
    # a value exactly at a bound counts as saturated
    assert bounded_weights(T([math.log(3.0)]), tau=1.0, w_min=0.2, w_max=3.0)[1:] == (0.0, 1.0)
    assert bounded_weights(T([math.log(0.2)]), tau=1.0, w_min=0.2, w_max=3.0)[1:] == (1.0, 0.0)


def test_bounded_weights_rejects_bad_settings():
    for kw in ({"tau": 0.0}, {"tau": -1.0}, {"tau": 1.0, "w_min": 0.0}, {"tau": 1.0, "w_min": 3.0, "w_max": 2.0}):
        with pytest.raises(RapidunError):
            bounded_weights(T([0.0]), **kw)


def test_normalize_mean():
    assert_same(normalize_mean(T([1, 2, 3])), [0.5, 1.0, 1.5])
    w = normalize_mean(torch.rand(11, generator=torch.Generator().manual_seed(0)) + 0.1)
    assert abs(float(w.mean()) - 1) < 1e-15
    with pytest.raises(RapidunError, match="empty"):
        normalize_mean(T([]))


# --- the whole chain -------------------------------------------------------------------------------------------


def random_views(nf=5, nr=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda a, b: torch.randn(a, b, generator=gen, dtype=torch.float64)
    return r(nf, nf), r(nf, nr), r(nr, nf), r(nr, nr)


def test_rapidun_weights_composes_the_steps():
    FF, FR, RF, RR = random_views()
    cfg = WeightingConfig(top_k=3, alpha=2.0, delta=0.5, scale_method="iqr", tau_forget=0.5)
    out = rapidun_weights(FF, FR, RF, RR, cfg)
    ff = aggregate(topk_keep(mask_self(FF), 3))
    fr = aggregate(topk_keep(FR, 3))
    rf = aggregate(topk_keep(RF, 3))
    rr = aggregate(topk_keep(mask_self(RR), 3))
    s_f, s_r = fuse(ff, fr, rf, rr, alpha=2.0, delta=0.5)
    for group, s, tau in (("forget", s_f, 0.5), ("retain", s_r, 1.2)):
        z = robust_scale(s, method="iqr")
        w, low, high = bounded_weights(z, tau, 0.2, 3.0)
        assert_same(out[f"S_{group}"], s.tolist())
        assert_same(out[f"z_{group}"], z.tolist())
        assert_same(out[f"w_{group}"], normalize_mean(w).tolist())
        assert (out[f"sat_low_{group}"], out[f"sat_high_{group}"]) == (low, high)
    for name, v in (("FF", ff), ("FR", fr), ("RF", rf), ("RR", rr)):
        assert_same(out[name], v.tolist())
    assert out["w_forget"].shape == (5,) and out["w_retain"].shape == (7,)
    assert abs(float(out["w_retain"].mean()) - 1) < 1e-15


def test_rapidun_weights_self_pairs_option_changes_only_ff_rr():
    views = random_views(seed=1)
    ex = rapidun_weights(*views, WeightingConfig(top_k=2))
    inc = rapidun_weights(*views, WeightingConfig(top_k=2, include_self=True))
    assert torch.equal(ex["FR"], inc["FR"]) and torch.equal(ex["RF"], inc["RF"])
    assert not torch.equal(ex["FF"], inc["FF"]) and not torch.equal(ex["RR"], inc["RR"])


def test_rapidun_weights_all_zero_views_give_uniform_weights():
    out = rapidun_weights(torch.zeros(3, 3), torch.zeros(3, 4), torch.zeros(4, 3), torch.zeros(4, 4))
    assert_same(out["z_forget"], [0, 0, 0])
    assert_same(out["w_retain"], [1, 1, 1, 1])
    assert out["sat_low_forget"] == out["sat_high_retain"] == 0.0


def test_rapidun_weights_rejects_mismatched_views():
    FF, FR, RF, RR = random_views()
    with pytest.raises(RapidunError, match=r"FR \(7, 5\)"):
        rapidun_weights(FF, FR.T, RF, RR)


def test_weighting_config_fields_have_help_and_load_from_dict():
    assert all(f.metadata.get("help") for f in dataclasses.fields(WeightingConfig))
    cfg = from_dict(WeightingConfig, {"top_k": 10, "include_self": True, "floor": "5e-4"})
    assert (cfg.top_k, cfg.include_self, cfg.floor, cfg.tau_forget) == (10, True, 5e-4, 0.7)
    with pytest.raises(RapidunError, match="unknown key"):
        from_dict(WeightingConfig, {"topk": 10})


# --- RapidIn file loader ---------------------------------------------------------------------------------------


def write_rapidin(path, entries):
    data = {"config": "{...}", **{str(j): e for j, e in entries.items()}, "finished_cnt": "6/6"}
    path.write_text(json.dumps(data))
    return path


def entry(helpful, infl):
    order = sorted(range(len(helpful)), key=lambda a: infl[a])
    return {
        "test_data": {"instruction": "x"},
        "helpful": helpful,
        "helpful_infl": infl,
        "harmful": [helpful[a] for a in order],
        "harmful_infl": [infl[a] for a in order],
    }


def test_load_rapidin_json_builds_the_dense_matrix(tmp_path):
    p = write_rapidin(
        tmp_path / "r.json", {0: entry([2, 0, 1], [3.0, 1.0, -2.0]), 1: entry([1, 2, 0], [5.0, 0.5, 0.25])}
    )
    A = load_rapidin_json(p, n_train=3, n_test=2)
    assert isinstance(A, np.ndarray) and A.dtype == np.float64
    np.testing.assert_array_equal(A, [[1.0, 0.25], [-2.0, 5.0], [3.0, 0.5]])


def test_load_rapidin_json_partial_lists(tmp_path):
    # train 1 is in neither list of test 0 (retrieved with top_k 1 of 3)
    e = {"helpful": [2], "helpful_infl": [3.0], "harmful": [0], "harmful_infl": [-1.0]}
    p = write_rapidin(tmp_path / "r.json", {0: e})
    with pytest.raises(RapidunError, match="neither list"):
        load_rapidin_json(p, 3, 1)
    A = load_rapidin_json(p, 3, 1, fill=-math.inf)
    np.testing.assert_array_equal(A, [[-1.0], [-math.inf], [3.0]])


def test_load_rapidin_json_errors(tmp_path):
    good = entry([0, 1], [1.0, 0.0])
    with pytest.raises(RapidunError, match="missing \\[1\\]"):
        load_rapidin_json(write_rapidin(tmp_path / "a.json", {0: good}), 2, 2)
    with pytest.raises(RapidunError, match="out of range"):
        load_rapidin_json(write_rapidin(tmp_path / "b.json", {0: entry([0, 5], [1.0, 0.0])}), 2, 1)
    clash = dict(good, harmful_infl=[0.0, 2.0])
    with pytest.raises(RapidunError, match="different values"):
        load_rapidin_json(write_rapidin(tmp_path / "c.json", {0: clash}), 2, 1)
    with pytest.raises(RapidunError, match="equal length"):
        load_rapidin_json(write_rapidin(tmp_path / "d.json", {0: dict(good, helpful_infl=[1.0])}), 2, 1)
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(RapidunError, match="cannot read"):
        load_rapidin_json(tmp_path / "e.json", 2, 1)


# --- the authors' released weights -----------------------------------------------------------------------------


def reference_weights(name):
    rows = [json.loads(line) for line in (REF / name).read_text().splitlines() if line.strip()]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    return torch.tensor([r["weight"] for r in rows], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference_views():
    return {
        "FF": load_rapidin_json(REF / "influence_results_40_FTF.json", 40, 40),
        "FR": load_rapidin_json(REF / "influence_results_40_FTR.json", 40, 120),
        "RF": load_rapidin_json(REF / "influence_results_120_RTF.json", 120, 40),
        "RR": load_rapidin_json(REF / "influence_results_120_RTR.json", 120, 120),
    }


def test_reference_files_load_completely(reference_views):
    raw = json.loads((REF / "influence_results_40_FTR.json").read_text())
    e = raw["7"]  # test (retain) sample 7: its most helpful forget sample
    assert reference_views["FR"][e["helpful"][0], 7] == e["helpful_infl"][0]
    assert reference_views["FR"][e["harmful"][0], 7] == e["harmful_infl"][0]
    for v in reference_views.values():
        assert np.isfinite(v).all()


def test_reproduces_the_authors_weights(reference_views):
    cfg = WeightingConfig(top_k=40, include_self=True, tau_forget=0.7, tau_retain=1.2, w_min=0.2, w_max=3.0, floor=1e-3)
    out = rapidun_weights(**reference_views, cfg=cfg)
    want_f, want_r = reference_weights("forget_weights.jsonl"), reference_weights("retain_weights.jsonl")
    torch.testing.assert_close(out["w_forget"], want_f, atol=1e-9, rtol=0)
    torch.testing.assert_close(out["w_retain"], want_r, atol=1e-9, rtol=0)
    # the documented statistics of the released weights
    w_f = out["w_forget"].numpy()
    assert (round(w_f.min(), 3), round(w_f.max(), 3), round(float(np.median(w_f)), 3)) == (0.146, 2.184, 0.728)
    assert len(np.unique(out["w_retain"].numpy().round(12))) == 3
    # why: most retain scores aggregate to 0, so MAD = 0 and the floor saturates every non-zero score
    assert out["center_retain"] == 0.0 and out["scale_retain"] == 1e-3
    assert out["sat_low_retain"] + out["sat_high_retain"] == pytest.approx(
        float((out["S_retain"] != 0).double().mean())
    )


def test_reference_weights_need_self_pairs_included(reference_views):
    want_f = reference_weights("forget_weights.jsonl")
    out = rapidun_weights(**reference_views, cfg=WeightingConfig())  # our default excludes self-pairs
    assert (out["w_forget"] - want_f).abs().max() > 0.1
