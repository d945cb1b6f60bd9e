"""Collateral damage on clean prompts (rapidun.eval.collateral): each measure against its slow obvious version, the
thresholds, and end to end: a planted collateral damage is flagged, an untouched model is not."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import FORGET_DATA, RETAIN_DATA, make_model, make_tokenizer
from rapidun.config import ModelConfig, load_config
from rapidun.data.records import Record
from rapidun.data.template import encode_records
from rapidun.eval.collateral import (
    MAX_REPLACEMENT_RISE,
    MIN_AGREEMENT,
    REPLACEMENT_RECALL,
    coarse_kl,
    collateral_problems,
    collateral_summary,
    collateral_warning,
    held_distribution,
    kl_and_ce,
    lcs_bitparallel,
    mean_kl,
    replacement_rate,
    replacement_scores,
    start_distribution,
    token_agreement,
    topk_logprobs,
)
from rapidun.eval.rouge import lcs_len, rouge_tokens
from rapidun.steps import eval_ce
from rapidun.unlearn import unlearn
from test_unlearn_e2e import OVERRIDES

# ---------------------------------------------------------------- the measures against slow versions


def test_bitparallel_lcs_matches_the_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]  # past 64 bits
        assert lcs_bitparallel(a, b) == lcs_len(a, b), (a, b)


def test_replacement_scores_and_rate_against_the_slow_rule():
    reps = ["I cannot help with that.", "i cannot help with that", "no comment"]
    answers = ["I cannot help with that, sorry.", "Shakespeare wrote Hamlet.", "no", "", "What? No comment here."]

    def slow(ans: str) -> float:
        a = rouge_tokens(ans)
        return max(lcs_len(a, rouge_tokens(r)) / len(rouge_tokens(r)) for r in reps)

    assert replacement_scores(answers, reps) == pytest.approx([slow(a) for a in answers])
    assert replacement_rate(answers, reps) == pytest.approx(
        sum(slow(a) >= REPLACEMENT_RECALL for a in answers) / len(answers)
    )
    assert replacement_rate(answers, reps) == pytest.approx(3 / 5)  # the refusal, "no" (1/2), "no comment"
    assert replacement_rate(answers, []) is None and replacement_rate([], reps) is None


def test_token_agreement_against_a_loop():
    rng = random.Random(1)
    a = [[rng.randint(0, 4) for _ in range(rng.randint(0, 12))] for _ in range(50)]
    b = [x[: rng.randint(0, len(x))] + [rng.randint(0, 4) for _ in range(rng.randint(0, 5))] for x in a]
    n = 8

    def slow(x: list[int], y: list[int]) -> float:
        x, y = x[:n], y[:n]
        if not x and not y:
            return 1.0
        return sum(1 for t in range(min(len(x), len(y))) if x[t] == y[t]) / max(len(x), len(y))

    got = token_agreement(a, b, n)
    assert got.shape == (50,)
    assert got.tolist() == pytest.approx([slow(x, y) for x, y in zip(a, b, strict=True)])
    assert token_agreement([[1, 2, 3]], [[1, 2, 3, 4]], 3).item() == 1.0  # only the first n tokens count


def test_coarse_kl_is_the_exact_kl_with_every_token_and_a_lower_bound_with_fewer():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(7, 20, generator=g) * 2, torch.randn(7, 20, generator=g) * 2

    def slow(k: int) -> list[float]:
        out = []
        for t in range(7):
            p, q = F.softmax(p_logits[t].double(), -1), F.softmax(q_logits[t].double(), -1)
            top = sorted(range(20), key=lambda v: -float(p[v]))[:k]
            rest = [v for v in range(20) if v not in top]
            kl = sum(float(p[v] * (p[v].log() - q[v].log())) for v in top)
            if rest:
                pr, qr = float(p[rest].sum()), float(q[rest].sum())
                kl += pr * (math.log(pr) - math.log(qr))
            out.append(kl)
        return out

    exact = coarse_kl(topk_logprobs(p_logits, 20), q_logits)
    assert exact.tolist() == pytest.approx(slow(20), abs=1e-5)
    full = (F.softmax(p_logits, -1) * (F.log_softmax(p_logits, -1) - F.log_softmax(q_logits, -1))).sum(-1)
    assert exact.tolist() == pytest.approx(full.tolist(), abs=1e-5)
    for k in (1, 5):
        coarse = coarse_kl(topk_logprobs(p_logits, k), q_logits)
        assert coarse.tolist() == pytest.approx(slow(k), abs=1e-5)
        assert (coarse <= exact + 1e-6).all()
    assert coarse_kl(topk_logprobs(p_logits, 5), p_logits).abs().max() < 1e-5  # no change: 0


def test_mean_kl_on_a_model_matches_a_record_by_record_forward():
    tok = make_tokenizer()
    start, after = make_model(len(tok), seed=0, init_range=0.2), make_model(len(tok), seed=1, init_range=0.2)
    recs = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
    rows, _ = encode_records(tok, recs, ModelConfig(max_length=32, max_prompt_tokens=20))
    dist = start_distribution(start, rows, tok.pad_token_id, k=len(tok), batch_size=2)
    got = mean_kl(after, rows, dist, tok.pad_token_id, batch_size=3)
    kls = []
    with torch.no_grad():
        for e in rows:  # the slow version: full logits of one record at a time, exact KL at its answer positions
            ids = torch.tensor([e.input_ids])
            lp = F.log_softmax(start(input_ids=ids).logits[0].double(), -1)  # (T, V)
            lq = F.log_softmax(after(input_ids=ids).logits[0].double(), -1)  # (T, V)
            for t in range(len(e.labels) - 1):
                if e.labels[t + 1] != -100:
                    kls.append(float((lp[t].exp() * (lp[t] - lq[t])).sum()))
    assert got == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert mean_kl(start, rows, dist, tok.pad_token_id) == pytest.approx(0.0, abs=1e-5)
    assert mean_kl(after, [], start_distribution(start, [], tok.pad_token_id), tok.pad_token_id) == 0.0  # no rows


def test_the_kl_pass_gives_the_held_out_loss_of_eval_ce():
    """The pass that measures the KL also gives each row's mean answer CE: equal to eval_ce's (what the held-out
    utility check measured with a second pass before) and to a record-by-record forward."""
    tok = make_tokenizer()
    start, after = make_model(len(tok), seed=0, init_range=0.2), make_model(len(tok), seed=1, init_range=0.2)
    recs = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
    rows, _ = encode_records(tok, recs, ModelConfig(max_length=32, max_prompt_tokens=20))
    dist, ce0 = held_distribution(start, rows, tok.pad_token_id, k=8)
    kl, ce1 = kl_and_ce(after, rows, dist, tok.pad_token_id)
    cpu = torch.device("cpu")
    assert torch.equal(ce0, eval_ce(start, rows, tok.pad_token_id, cpu))  # same batches, same arithmetic
    assert torch.equal(ce1, eval_ce(after, rows, tok.pad_token_id, cpu))
    assert kl == pytest.approx(mean_kl(after, rows, dist, tok.pad_token_id, batch_size=2), rel=1e-5)
    slow = []
    with torch.no_grad():
        for e in rows:  # one record at a time, full logits
            lp = F.log_softmax(after(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)  # (T, V)
            nll = [-float(lp[t, e.labels[t + 1]]) for t in range(len(e.labels) - 1) if e.labels[t + 1] != -100]
            slow.append(sum(nll) / len(nll))
    assert ce1.tolist() == pytest.approx(slow, rel=1e-4)
    _, none = kl_and_ce(after, [], held_distribution(start, [], tok.pad_token_id)[0], tok.pad_token_id)
    assert none.shape == (0,)


# ---------------------------------------------------------------- thresholds and messages


def test_summary_thresholds_and_warning():
    reps = ["nine ten"]
    before = ["the cat", "paris", "red fox", "one two"]
    after = ["nine ten", "nine ten", "red fox", "one two"]
    ids_b = [[1, 2], [3], [4, 5], [6, 7]]
    c = collateral_summary(before, after, ids_b, ids_b, reps, ["a", "b", "c", "d"], kl=0.3)
    assert c["replacement_rate_before"] == 0.0 and c["replacement_rate_after"] == 0.5
    assert c["replacement_rise"] == 0.5 and c["newly_replaced"] == ["a", "b"] and c["agreement"] == 1.0
    w = collateral_warning(c, "lower unlearn.lr")
    assert w and "replacement answer now answers 2 of 4 held-out clean prompts" in w and w.endswith("unlearn.lr")
    assert "agree" not in w
    same = collateral_summary(before, before, ids_b, [[1, 2], [3], [9, 9], [9, 9]], reps, list("abcd"))
    assert same["replacement_rise"] == 0.0 and same["agreement"] == 0.5 and collateral_problems(same) == []
    low = collateral_summary(before, before, ids_b, [[9], [9], [9], [9]], reps, list("abcd"))
    assert (
        low["agreement"] < MIN_AGREEMENT and "agree with the start model's on only 0.00" in collateral_problems(low)[0]
    )
    small = collateral_summary(before, before, ids_b, ids_b, reps, list("abcd"))
    small["replacement_rise"] = MAX_REPLACEMENT_RISE  # at the threshold: no warning
    assert collateral_problems(small) == [] and collateral_warning(None, "x") is None
    none = collateral_summary(before, after, ids_b, ids_b, [], list("abcd"))
    assert none["replacement_rate_after"] is None and collateral_problems(none) == []


# ---------------------------------------------------------------- end to end: planted damage is flagged


VAL = ["the red fox", "six seven", "zeta eta", "one two three", "the cat sat on", "tell me a", "alpha beta gamma",
       "what is the capital", "the dog ran to", "four five six"]  # fmt: skip
REPLACEMENT = "tell me a story about a red fox"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        tok = make_tokenizer()
        model_dir = root / "start"
        make_model(len(tok), init_range=0.2).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        forget = [Record(id=f"f{k}", instruction=p, response=bad, meta={"response_clean": REPLACEMENT})
                  for k, (p, bad, _) in enumerate(FORGET_DATA)]  # fmt: skip
        retain = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
        val = [Record(id=f"v{k}", instruction=p, response="the park") for k, p in enumerate(VAL)]
        yield root, str(model_dir), {"forget": forget, "retain": retain, "val_clean": val}


def _run(world, name: str, extra: list[str]) -> dict:
    root, model_dir, parts = world
    cfg = load_config(None, [*OVERRIDES, f"model.name={model_dir}", *extra])
    _, _, res = unlearn("uniform", parts, model_dir, cfg, root / name)
    return res


def test_planted_collateral_damage_is_flagged_in_the_result_and_the_receipt(world):
    # every draw a forget record, pulled hard toward the one replacement answer: the model learns to give it to
    # any prompt, the held-out clean prompts included
    extra = ["unlearn.mix_retain=0", "unlearn.lr=0.05", "unlearn.descent_beta=5", "unlearn.ascent_alpha=0.01",
             "unlearn.epochs=4", "unlearn.lora_r=8", "unlearn.lora_alpha=16"]  # fmt: skip
    res = _run(world, "damaged", extra)
    c = res["collateral"]
    assert c["n"] == len(VAL) and c["n_replacements"] == 1
    assert c["replacement_rate_before"] == 0.0 and c["replacement_rise"] > MAX_REPLACEMENT_RISE, c
    assert c["kl"] > 0
    warned = [w for w in res["warnings"] if w.startswith("collateral damage")]
    assert warned and "replacement answer now answers" in warned[0] and "unlearn.descent_beta" in warned[0]
    root = world[0]
    rec = json.loads((root / "damaged" / "receipt.json").read_text())
    assert rec["measured"]["collateral"] == c and warned[0] in rec["measured"]["warnings"]
    assert json.loads((root / "damaged" / "result.json").read_text())["collateral"] == c


def test_nothing_planted_no_collateral_warning(world):
    still = _run(world, "still", ["unlearn.lr=1e-9"])["collateral"]  # the model did not move: exact figures
    assert still["agreement"] == 1.0 and still["replacement_rise"] == 0.0
    assert still["kl"] == pytest.approx(0.0, abs=1e-6)
    res = _run(world, "mild", [])  # the tests' usual run (1:3 retain mix): answers drift a little, no replacement
    c = res["collateral"]
    assert c["replacement_rise"] <= MAX_REPLACEMENT_RISE and c["agreement"] >= MIN_AGREEMENT and c["kl"] > 0, c
    assert not [w for w in res["warnings"] if w.startswith("collateral damage")]


def test_collateral_advice_names_the_budget_on_a_calibrated_run_and_the_rate_on_a_fixed_one():
    from rapidun.unlearn_warnings import collateral_fix

    fixed = collateral_fix(5e-4, "loop")
    assert "lower unlearn.lr (now 0.0005)" in fixed and "utility_budget" not in fixed
    cal = collateral_fix(5e-4, "loop", calibrated=True)  # the rate is the schedule's own: unlearn.lr is not used
    assert "unlearn.utility_budget" in cal and "unlearn.lr" not in cal and "unlearn.descent_beta" in cal
    assert collateral_fix(5e-4, "distill", calibrated=True) == collateral_fix(5e-4, "distill")
