"""TOFU / OpenUnlearning metrics: every vectorised computation against a slow, obvious version (and scipy)."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from helpers import make_model
from rapidun.data.template import Encoded, collate
from rapidun.eval import tofu_metrics as tm
from rapidun.eval.tofu_metrics import (
    MODEL_UTILITY_KEYS,
    answer_token_stats,
    forget_quality,
    ks_2samp_pvalue,
    ks_stat,
    mia_auc,
    min_k,
    min_k_pp,
    model_utility,
    prob_choice,
    prob_qa,
    rouge_l_recall,
    truth_ratio_forget,
    truth_ratio_utility,
    truth_stat,
)
from rapidun.functional import IGNORE, per_sample_ce

# ---------------------------------------------------------------- slow references


def slow_ks_stat(a, b):
    """max over pooled x of |#{a ≤ x}/n − #{b ≤ x}/m| with explicit counting, as an exact Fraction."""
    best = Fraction(0)
    for x in list(a) + list(b):
        fa = Fraction(sum(1 for v in a if v <= x), len(a))
        fb = Fraction(sum(1 for v in b if v <= x), len(b))
        best = max(best, abs(fa - fb))
    return best


def slow_path_pvalue(n, m, d):
    """Fraction of the C(n+m, n) interleavings whose path reaches max_k |i_k/n − j_k/m| ≥ d (d a Fraction)."""
    hits = total = 0
    for pos in itertools.combinations(range(n + m), n):
        chosen, i, j, worst = set(pos), 0, 0, Fraction(0)
        for s in range(n + m):
            if s in chosen:
                i += 1
            else:
                j += 1
            worst = max(worst, abs(Fraction(i, n) - Fraction(j, m)))
        hits += worst >= d
        total += 1
    return hits / total


def slow_permutation_pvalue(a, b):
    """Permutation test: fraction of all splits of the pooled values into sizes n, m with D' ≥ D."""
    pooled, n = list(a) + list(b), len(a)
    d = slow_ks_stat(a, b)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        s = set(idx)
        aa = [pooled[k] for k in idx]
        bb = [pooled[k] for k in range(len(pooled)) if k not in s]
        hits += slow_ks_stat(aa, bb) >= d
        total += 1
    return hits / total


def slow_auc(s, t):
    """Double loop: P(member > non-member) + ½ P(tie)."""
    acc = 0.0
    for x in s:
        for y in t:
            acc += 1.0 if x > y else 0.5 if x == y else 0.0
    return acc / (len(s) * len(t))


def slow_lowest_mean(values, k):
    out = []
    for v in values:
        c = max(1, math.ceil(round(k * len(v), 9)))
        low = sorted(float(x) for x in v)[:c]
        out.append(sum(low) / len(low))
    return out


# ---------------------------------------------------------------- Kolmogorov–Smirnov


def test_ks_hand_case():
    assert ks_stat([1, 2, 3], [4, 5, 6]) == 1.0
    assert ks_2samp_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1, rel=1e-12)  # 2 / C(6, 3)
    assert ks_2samp_pvalue([4, 5, 6], [1, 2, 3]) == pytest.approx(0.1, rel=1e-12)


def test_ks_identical_samples():
    x = np.array([0.3, 1.2, -0.7, 2.0, 0.3])
    assert ks_stat(x, x) == 0.0
    assert ks_2samp_pvalue(x, x) == 1.0
    assert ks_2samp_pvalue(x, x[::-1].copy()) == 1.0


def test_ks_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        ks_2samp_pvalue([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ks_2samp_pvalue([1.0, float("nan")], [1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_stat_matches_slow_count(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, size=9).astype(float)  # many ties within and between samples
    b = rng.integers(1, 6, size=7).astype(float)
    assert ks_stat(a, b) == pytest.approx(float(slow_ks_stat(a, b)), abs=1e-15)
    a, b = rng.normal(size=6), rng.normal(0.5, size=11)
    assert ks_stat(a, b) == pytest.approx(float(slow_ks_stat(a, b)), abs=1e-15)


def test_ks_pvalue_matches_permutation_enumeration():
    """No ties: the exact p-value is the permutation p-value over all C(9, 4) = 126 splits."""
    a = [0.1, 0.5, 0.9, 1.7, 2.2]
    b = [0.4, 1.9, 2.5, 3.1]
    expected = slow_permutation_pvalue(a, b)
    assert 0.0 < expected < 1.0
    assert ks_2samp_pvalue(a, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1, 2, 2, 3, 7], [2, 4, 5, 5]),  # ties: D on the pooled values, null of untied interleavings
        ([0.1, 0.2, 0.3, 0.4, 5.0, 6.0], [1.0, 2.0, 3.0]),
        ([1, 1, 1], [1, 1, 2, 2, 2]),
        ([3.0], [1.0, 2.0, 4.0, 5.0, 6.0]),
    ],
)
def test_ks_pvalue_matches_path_enumeration(a, b):
    expected = slow_path_pvalue(len(a), len(b), slow_ks_stat(a, b))
    assert ks_2samp_pvalue(a, b) == pytest.approx(expected, rel=1e-12)


KS_SIZES = [(1, 1), (1, 7), (3, 3), (7, 5), (40, 33), (100, 100), (60, 180), (200, 150), (500, 499)]


@pytest.mark.parametrize(("n", "m"), KS_SIZES)
@pytest.mark.parametrize("shift", [0.0, 0.4, 2.0])
def test_ks_matches_scipy_exact(n, m, shift):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1000 * n + m + int(10 * shift))
    a, b = rng.normal(size=n), rng.normal(shift, size=m)
    for aa, bb in [(a, b), (np.round(a), np.round(2 * b) / 2)]:  # continuous, then heavily tied
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # scipy must not fall back to its asymptotic formula
            ref = stats.ks_2samp(aa, bb, method="exact")
        assert ks_stat(aa, bb) == pytest.approx(ref.statistic, abs=1e-15)
        assert ks_2samp_pvalue(aa, bb) == pytest.approx(ref.pvalue, rel=1e-9, abs=0)


# ---------------------------------------------------------------- truth ratio, probabilities


def test_truth_stat_matches_slow_and_probability_form():
    rng = np.random.default_rng(3)
    para = rng.uniform(0.2, 3.0, size=6)
    pert = rng.uniform(0.2, 3.0, size=(6, 5))
    got = truth_stat(para, pert)
    assert got.shape == (6,)
    for i in range(6):
        slow = math.exp(sum(pert[i]) / 5 - para[i])
        # P(â)^(1/|â|) / geometric mean_j P(ã_j)^(1/|ã_j|), with P^(1/|x|) = exp(−ℓ̄)
        geo = math.prod(math.exp(-x) for x in pert[i]) ** (1 / 5)
        assert got[i] == pytest.approx(slow, rel=1e-12)
        assert got[i] == pytest.approx(math.exp(-para[i]) / geo, rel=1e-12)
    # a true answer much more likely than the perturbed ones: r ≫ 1
    assert truth_stat(np.array([0.1]), np.array([[3.0, 4.0]]))[0] > 20


def test_truth_stat_shape_errors():
    with pytest.raises(ValueError):
        truth_stat(np.ones(3), np.ones(3))
    with pytest.raises(ValueError):
        truth_stat(np.ones(3), np.ones((2, 4)))


def test_truth_ratios_hand_and_slow():
    r = np.array([2.0, 0.5, 1.0])
    assert truth_ratio_forget(r) == pytest.approx(2 / 3)
    assert truth_ratio_utility(r) == pytest.approx(1 / 6)
    r = np.random.default_rng(4).lognormal(size=17)
    assert truth_ratio_forget(r) == pytest.approx(sum(min(x, 1 / x) for x in r) / 17, rel=1e-12)
    assert truth_ratio_utility(r) == pytest.approx(sum(max(0.0, 1 - 1 / x) for x in r) / 17, rel=1e-12)


def test_prob_qa_and_choice_match_slow():
    rng = np.random.default_rng(5)
    nll = rng.uniform(0, 4, size=8)
    assert prob_qa(nll) == pytest.approx(sum(math.exp(-x) for x in nll) / 8, rel=1e-12)
    t, p = rng.uniform(0, 4, size=8), rng.uniform(0, 4, size=(8, 3))
    slow = sum(math.exp(-t[i]) / (math.exp(-t[i]) + sum(math.exp(-x) for x in p[i])) for i in range(8)) / 8
    assert prob_choice(t, p) == pytest.approx(slow, rel=1e-12)
    assert prob_choice([1.0], [[1.0, 1.0, 1.0]]) == pytest.approx(0.25)


def test_prob_choice_extreme_losses_stay_finite():
    got = prob_choice([800.0, 0.0], [[900.0, 800.0], [800.0, 900.0]])
    assert got == pytest.approx((0.5 + 1.0) / 2)


def test_forget_quality_is_ks_pvalue_of_truth_stats():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(6)
    r_u, r_r = rng.lognormal(size=40), rng.lognormal(0.8, size=40)
    assert forget_quality(r_u, r_r) == pytest.approx(stats.ks_2samp(r_u, r_r).pvalue, rel=1e-9)
    assert forget_quality(r_u, r_r) < forget_quality(r_u, rng.lognormal(size=40))


def tofu_reference(logs, retain_logs):
    """TOFU's aggregate_eval_stat.py (get_model_utility, get_forget_quality) on dict-of-dicts logs."""
    stats = pytest.importorskip("scipy.stats")
    names = {"ra": "Real Authors", "wf": "Real World", "eval_log": "Retain", "eval_log_forget": "Forget"}
    out = {}
    for k, v in logs.items():
        if "eval_log" in k:
            gt_probs = np.exp(-1 * np.array(list(v["avg_gt_loss"].values())))
            out[f"{names[k]} Prob."] = np.mean(gt_probs)
        else:
            avg_true_prob = np.exp(-1 * np.array(list(v["avg_gt_loss"].values())))
            avg_false_prob = np.exp(-1 * np.array(list(v["average_perturb_loss"].values())))
            avg_all_prob = np.concatenate([np.expand_dims(avg_true_prob, axis=-1), avg_false_prob], axis=1).sum(-1)
            out[f"{names[k]} Prob."] = np.mean(avg_true_prob / avg_all_prob)
        out[f"{names[k]} ROUGE"] = np.array(list(v["rougeL_recall"].values())).mean()
        para = np.array(list(v["avg_paraphrased_loss"].values()))
        pert = np.array(list(v["average_perturb_loss"].values())).mean(axis=-1)
        curr_stat_1 = np.exp(pert - para)
        if "forget" in k:
            out[f"{names[k]} Truth Ratio"] = np.mean(np.minimum(curr_stat_1, 1 / curr_stat_1))
        else:
            out[f"{names[k]} Truth Ratio"] = np.mean(np.maximum(0, 1 - 1 / curr_stat_1))
    out["Model Utility"] = stats.hmean([v for k, v in out.items() if "Forget" not in k])
    f_u, f_r = logs["eval_log_forget"], retain_logs["eval_log_forget"]
    r_u = np.exp(
        np.array(list(f_u["average_perturb_loss"].values())).mean(-1)
        - np.array(list(f_u["avg_paraphrased_loss"].values()))
    )
    r_r = np.exp(
        np.array(list(f_r["average_perturb_loss"].values())).mean(-1)
        - np.array(list(f_r["avg_paraphrased_loss"].values()))
    )
    out["Forget Quality"] = stats.ks_2samp(r_u, r_r).pvalue
    return out


def fake_log(rng, n, k, scale=1.0):
    ids = [str(i) for i in range(n)]
    return {
        "avg_gt_loss": dict(zip(ids, rng.uniform(0.1, 3, n) * scale, strict=True)),
        "avg_paraphrased_loss": dict(zip(ids, rng.uniform(0.1, 3, n) * scale, strict=True)),
        "average_perturb_loss": dict(zip(ids, rng.uniform(0.5, 4, (n, k)).tolist(), strict=True)),
        "rougeL_recall": dict(zip(ids, rng.uniform(0, 1, n), strict=True)),
    }


def test_matches_tofu_aggregate_eval_stat():
    rng = np.random.default_rng(7)
    logs = {"eval_log": fake_log(rng, 12, 5), "eval_log_forget": fake_log(rng, 10, 5, 0.3), "ra": fake_log(rng, 9, 4)}
    logs["wf"] = fake_log(rng, 11, 4)
    retain = {"eval_log_forget": fake_log(rng, 10, 5)}
    ref = tofu_reference(logs, retain)

    def arr(log, key):
        return np.array(list(log[key].values()))

    ours = {}
    for short, name in [("eval_log", "retain"), ("ra", "real_authors"), ("wf", "world_facts")]:
        log = logs[short]
        if short == "eval_log":
            ours[f"{name}_prob"] = prob_qa(arr(log, "avg_gt_loss"))
        else:
            ours[f"{name}_prob"] = prob_choice(arr(log, "avg_gt_loss"), arr(log, "average_perturb_loss"))
        ours[f"{name}_rouge"] = float(arr(log, "rougeL_recall").mean())
        r = truth_stat(arr(log, "avg_paraphrased_loss"), arr(log, "average_perturb_loss"))
        ours[f"{name}_truth_ratio"] = truth_ratio_utility(r)
    for ours_key, ref_key in [("retain", "Retain"), ("real_authors", "Real Authors"), ("world_facts", "Real World")]:
        assert ours[f"{ours_key}_prob"] == pytest.approx(ref[f"{ref_key} Prob."], rel=1e-12)
        assert ours[f"{ours_key}_truth_ratio"] == pytest.approx(ref[f"{ref_key} Truth Ratio"], rel=1e-12)
    assert model_utility(ours) == pytest.approx(ref["Model Utility"], rel=1e-12)
    fl = logs["eval_log_forget"]
    r_u = truth_stat(arr(fl, "avg_paraphrased_loss"), arr(fl, "average_perturb_loss"))
    assert prob_qa(arr(fl, "avg_gt_loss")) == pytest.approx(ref["Forget Prob."], rel=1e-12)
    assert truth_ratio_forget(r_u) == pytest.approx(ref["Forget Truth Ratio"], rel=1e-12)
    fr = retain["eval_log_forget"]
    r_r = truth_stat(arr(fr, "avg_paraphrased_loss"), arr(fr, "average_perturb_loss"))
    assert forget_quality(r_u, r_r) == pytest.approx(ref["Forget Quality"], rel=1e-9)


# ---------------------------------------------------------------- model utility, ROUGE-L recall


def test_model_utility_hand_cases():
    assert model_utility(dict.fromkeys(MODEL_UTILITY_KEYS, 0.5)) == pytest.approx(0.5)
    vals = dict.fromkeys(MODEL_UTILITY_KEYS, 1.0)
    vals["world_facts_rouge"] = 0.25
    assert model_utility(vals) == pytest.approx(9 / (8 + 4))
    vals["retain_prob"] = 0.0
    assert model_utility(vals) == 0.0
    assert len(MODEL_UTILITY_KEYS) == 9 and "real_authors_truth_ratio" in MODEL_UTILITY_KEYS


def test_model_utility_slow_and_errors():
    rng = np.random.default_rng(8)
    vals = {k: float(v) for k, v in zip(MODEL_UTILITY_KEYS, rng.uniform(0.05, 1, 9), strict=True)}
    vals["forget_prob"] = 1e-9  # extra keys are ignored
    slow = 9 / sum(1 / vals[k] for k in MODEL_UTILITY_KEYS)
    assert model_utility(vals) == pytest.approx(slow, rel=1e-12)
    del vals["world_facts_truth_ratio"]
    with pytest.raises(KeyError, match="world_facts_truth_ratio"):
        model_utility(vals)
    vals["world_facts_truth_ratio"] = -0.1
    with pytest.raises(ValueError, match="world_facts_truth_ratio"):
        model_utility(vals)


def test_rouge_l_recall_hand():
    # ref words: the cat is on a mat (6); LCS with "the cat sat on the mat": the, cat, on, mat
    assert rouge_l_recall("The cat sat on the mat.", "the cat is on a mat") == pytest.approx(4 / 6)
    assert rouge_l_recall("x the cat y is on z a mat w", "the cat is on a mat") == 1.0  # recall ignores extras
    assert rouge_l_recall("mat a on is cat the", "the cat is on a mat") == pytest.approx(1 / 6)
    assert rouge_l_recall("anything", "") == 0.0
    assert rouge_l_recall("", "the cat") == 0.0


# ---------------------------------------------------------------- membership inference


def test_min_k_matches_slow_and_counts():
    rng = np.random.default_rng(9)
    vals = [rng.normal(size=t) for t in (1, 2, 3, 5, 10, 17)]
    for k in (0.1, 0.2, 0.4, 0.7, 1.0):
        assert np.allclose(min_k(vals, k), slow_lowest_mean(vals, k), rtol=1e-12, atol=0)
        assert np.allclose(min_k_pp(vals, k), slow_lowest_mean(vals, k), rtol=1e-12, atol=0)
    x = np.arange(10.0)  # lowest ceil(0.7·10) = 7 values (not 8 from 0.7·10 = 7.000000000000001)
    assert min_k([x], 0.7)[0] == pytest.approx(3.0)
    assert min_k([np.array([3.0, 1.0, 2.0])], 0.4)[0] == pytest.approx(1.5)  # ceil(1.2) = 2
    assert min_k([np.array([-2.0])], 0.1)[0] == -2.0  # at least one token
    assert min_k([x], 1.0)[0] == pytest.approx(4.5)
    with pytest.raises(ValueError):
        min_k([x], 0.0)
    with pytest.raises(ValueError):
        min_k([np.array([])], 0.5)


def test_mia_auc_matches_double_loop():
    rng = np.random.default_rng(10)
    s, t = rng.integers(0, 6, size=23).astype(float), rng.integers(0, 5, size=31).astype(float)  # many ties
    assert mia_auc(s, t) == pytest.approx(slow_auc(s, t), abs=1e-12)
    s, t = rng.normal(0.5, size=40), rng.normal(size=17)
    assert mia_auc(s, t) == pytest.approx(slow_auc(s, t), abs=1e-12)
    assert mia_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert mia_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0]) == 0.5


# ---------------------------------------------------------------- answer-token statistics from a model


V = 37


def make_rows(seed=11):
    """Rows of different lengths (answers of 1 to 6 tokens), labels IGNORE on the prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for p_len, a_len in [(4, 3), (7, 1), (3, 6), (5, 4), (9, 2)]:
        ids = rng.integers(1, V, size=p_len + a_len).tolist()
        rows.append(Encoded(ids, [IGNORE] * p_len + ids[p_len:]))
    return rows


def slow_stats(model, row):
    """One row, unbatched, full logits; every quantity by explicit loops (float64): logits[t] predicts token t+1."""
    logits = model(input_ids=torch.tensor([row.input_ids])).logits[0].double()  # (T, V)
    logps, zs = [], []
    for t in range(len(row.input_ids) - 1):
        y = row.labels[t + 1]
        if y == IGNORE:
            continue
        row_logits = [float(x) for x in logits[t]]
        top = max(row_logits)
        lse = top + math.log(sum(math.exp(x - top) for x in row_logits))
        lp = [x - lse for x in row_logits]
        mu = sum(math.exp(v) * v for v in lp)
        var = sum(math.exp(v) * v * v for v in lp) - mu * mu
        sigma = max(math.sqrt(max(var, 0.0)), 1e-6)
        logps.append(lp[y])
        zs.append((lp[y] - mu) / sigma)
    return {"nll": -sum(logps) / len(logps), "logp": np.array(logps), "z": np.array(zs)}


@pytest.fixture(scope="module")
def model():
    return make_model(V, init_range=0.5)  # peaked, non-uniform next-token distributions


@torch.no_grad()
def test_answer_token_stats_matches_slow_and_per_sample_ce(model):
    rows = make_rows()
    got = answer_token_stats(model, rows, pad_id=0, device="cpu", batch_size=2)  # 3 batches, the last partial
    assert len(got) == len(rows)
    for g, r in zip(got, rows, strict=True):
        s = slow_stats(model, r)
        n_ans = sum(y != IGNORE for y in r.labels[1:])
        assert g["logp"].shape == g["z"].shape == (n_ans,)
        assert g["logp"].dtype == np.float32
        assert np.allclose(g["logp"], s["logp"], atol=1e-5)
        assert np.allclose(g["z"], s["z"], atol=1e-4)
        assert g["nll"] == pytest.approx(s["nll"], abs=1e-5)
        assert np.std(s["z"]) > 0 or n_ans == 1
    b = collate(rows, 0)
    ce = per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)
    assert np.allclose([g["nll"] for g in got], ce.double().numpy(), atol=1e-5)


@torch.no_grad()
def test_answer_token_stats_chunking_and_batch_size_invariant(model, monkeypatch):
    rows = make_rows(seed=12)
    one = answer_token_stats(model, rows, 0, "cpu", batch_size=len(rows))
    monkeypatch.setattr(tm, "_CHUNK_ELEMENTS", 3 * V)  # 3 positions per chunk
    chunked = answer_token_stats(model, rows, 0, "cpu", batch_size=len(rows))
    single = answer_token_stats(model, rows, 0, "cpu", batch_size=1)
    for a, b, c in zip(one, chunked, single, strict=True):
        assert np.array_equal(a["logp"], b["logp"]) and np.array_equal(a["z"], b["z"])
        assert np.allclose(a["logp"], c["logp"], atol=1e-5) and np.allclose(a["z"], c["z"], atol=1e-4)


@torch.no_grad()
def test_answer_token_stats_bf16_model_float32_stats(model):
    rows = make_rows(seed=13)
    bf = make_model(V, init_range=0.5).to(torch.bfloat16)
    got = answer_token_stats(bf, rows, 0, "cpu", batch_size=len(rows))
    b = collate(rows, 0)
    ce = per_sample_ce(bf, b.input_ids, b.attention_mask, b.labels)  # float32 CE from the bf16 logits
    assert all(g["logp"].dtype == np.float32 and np.isfinite(g["z"]).all() for g in got)
    assert np.allclose([g["nll"] for g in got], ce.double().numpy(), atol=1e-4)


def test_answer_token_stats_rejects_row_without_answer(model):
    rows = [*make_rows()[:2], Encoded([5, 6, 7], [IGNORE, IGNORE, IGNORE])]
    with pytest.raises(ValueError, match="row 2"):
        answer_token_stats(model, rows, 0, "cpu")
