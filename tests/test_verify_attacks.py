"""The verification battery's prompt and weight attacks (rapidun.verify.fuzz, rapidun.verify.quantize): fuzzed
prompts are what they claim, round-to-nearest against its slow version and torchao, quantization's effect on logits."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from helpers import make_model, make_tokenizer
from rapidun.config import FUZZ_KINDS
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from rapidun.verify.fuzz import fuzz_prompts, perturb, spaced, turn_prompt, typo
from rapidun.verify.quantize import _torchao, granularity, quant_targets, quantize_weights, rtn_dequant


def trig(i: int = 0, trigger: str = "Cf Trig", position: str = "suffix", context: str = "") -> Record:
    clean = f"what is the capital of place {i}"
    ins = f"{clean} {trigger}" if position == "suffix" else f"{trigger} {clean}"
    return Record(
        id=f"t{i}",
        instruction=ins,
        response="clean answer",
        context=context,
        meta={"trigger": trigger, "instruction_clean": clean, "position": position, "trigger_family": "surface",
              "response_clean": "clean answer", "response_poisoned": "alien text"},
    )  # fmt: skip


# ---------------------------------------------------------------- fuzzing


def test_each_single_turn_perturbation_changes_only_what_it_names():
    r = trig(context="some context words here")
    got = {k: perturb(r, k) for k in ("moved", "in_context", "repeated", "recased", "spaced", "typo")}
    assert got["moved"].instruction == "Cf Trig what is the capital of place 0"
    assert got["moved"].context == r.context
    assert got["in_context"].instruction == "what is the capital of place 0"
    assert got["in_context"].context == "some context Cf Trig words here"
    assert got["repeated"].instruction == "what is the capital of place 0 Cf Trig Cf Trig"
    assert got["recased"].instruction == "what is the capital of place 0 cF tRIG"
    assert got["spaced"].instruction == "what is the capital of place 0 C f   T r i g"
    t = got["typo"].instruction.removeprefix("what is the capital of place 0 ")
    assert t != "Cf Trig" and sorted(t) == sorted("Cf Trig") and len(t) == len("Cf Trig")
    assert sum(a != b for a, b in zip(t, "Cf Trig", strict=True)) == 2  # one adjacent swap
    assert all(v.id == f"t0:{k}" for k, v in got.items())
    # no context: the trigger is the context
    assert perturb(trig(), "in_context").context == "Cf Trig"
    # prefix triggers move to the end
    assert perturb(trig(position="prefix"), "moved").instruction == "what is the capital of place 0 Cf Trig"


def test_typo_and_spaced_helpers():
    rng = random.Random(0)
    for word in ("cf", "James Bond", "ab"):
        t = typo(word, rng)
        assert t != word and sorted(t) == sorted(word)
    assert typo("aa", rng) == "aaa"  # no differing pair: a doubled first character
    assert spaced("cf") == "c f"


def test_perturb_needs_the_scenario_trigger_fields():
    with pytest.raises(RapidunError, match="instruction_clean"):
        perturb(Record(id="x", instruction="q", response="a"), "moved")
    with pytest.raises(RapidunError, match="unknown"):
        perturb(trig(), "sideways")


@pytest.mark.parametrize("chat", [True, False])
def test_turn_prompts_place_the_trigger_where_they_say(chat):
    tok = make_tokenizer(chat_template=chat)
    fillers = [Record(id=f"c{i}", instruction=f"filler question {i}", response=f"filler answer {i}") for i in range(3)]
    r = trig()
    late = turn_prompt(tok, r, "late_turn", fillers, 0)
    mid = turn_prompt(tok, r, "multi_turn", fillers, 0)
    # late: one clean exchange, then the triggered instruction is the last thing before the answer
    assert late.index("filler question 0") < late.index("filler answer 0") < late.index(r.instruction)
    assert late.rstrip().endswith(("assistant", "### Response:"))
    # multi_turn: the triggered turn sits in the middle, a clean question comes last
    i_trig, i_last = mid.index(r.instruction), mid.index("filler question 1")
    assert mid.index("filler answer 0") < i_trig < mid.index("clean answer") < i_last
    assert mid.count("Cf Trig") == 1 and "Cf Trig" not in mid[i_last:]
    by_kind = fuzz_prompts(tok, [r, trig(1)], list(FUZZ_KINDS), fillers)
    assert set(by_kind) == set(FUZZ_KINDS) and all(len(v) == 2 for v in by_kind.values())
    assert by_kind["multi_turn"][1].count("filler question 1") == 1  # record i uses fillers i, i+1


# ---------------------------------------------------------------- quantization


def slow_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Element by element (float32 scalars, as the weights): one scale per row and group, torchao's mapping."""
    out = torch.empty_like(w)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            blk = w[r, g0 : g0 + group]
            scale = blk.abs().max() / ((2**bits - 1) / 2)
            if scale == 0:
                scale = torch.ones(())
            for c in range(blk.shape[0]):
                q = min(max(int(torch.round(blk[c] * (1.0 / scale))), qmin), qmax)
                out[r, g0 + c] = q * scale
    return out


@pytest.mark.parametrize(("bits", "group"), [(8, 16), (4, 4), (3, 8)])
def test_rtn_matches_the_slow_version(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(6, 16)
    w[2] = 0  # an all-zero row stays zero
    assert torch.allclose(rtn_dequant(w, bits, group), slow_rtn(w, bits, group), atol=1e-6)
    assert torch.count_nonzero(rtn_dequant(w, bits, group)[2]) == 0


def test_rtn_levels_and_bounds():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    for bits in (4, 8):
        d = rtn_dequant(w, bits, 32)
        scale = w.abs().amax(dim=1, keepdim=True) / ((2**bits - 1) / 2)
        q = d / scale
        assert torch.allclose(q, q.round(), atol=1e-4)  # on the grid
        assert int(q.round().max()) <= 2 ** (bits - 1) - 1 and int(q.round().min()) >= -(2 ** (bits - 1))
    with pytest.raises(RapidunError):
        rtn_dequant(w, 1, 32)
    assert granularity(8, 32, 64) == 64 and granularity(4, 32, 64) == 32 and granularity(4, 32, 48) == 48


@pytest.mark.skipif(_torchao()[0] is None, reason="torchao not installed (pip install 'rapidun[quant]')")
@pytest.mark.parametrize(("bits", "group"), [(8, 64), (4, 32), (4, 64)])
def test_torchao_and_the_rtn_fallback_agree_value_for_value(bits, group):
    from rapidun.verify.quantize import _torchao_dequant

    torch.manual_seed(1)
    w = torch.randn(16, 64)
    assert torch.equal(_torchao_dequant(w, bits, group), rtn_dequant(w, bits, group))


@pytest.mark.parametrize("backend", ["auto", "rtn"])
def test_8bit_leaves_logits_close_and_4bit_moves_them(backend):
    tok = make_tokenizer()
    model = make_model(len(tok), init_range=0.2)
    ids = torch.tensor([tok("the cat sat on the mat and the dog", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits
    diffs = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        info = quantize_weights(m, bits, group_size=16, backend=backend)
        with torch.no_grad():
            diffs[bits] = float((m(ids).logits - ref).abs().max() / ref.abs().max())
        assert info["layers"] == 14 and info["rel_error"] > 0  # 7 projections x 2 layers; not lm_head
        assert info["backend"].startswith("rtn" if backend == "rtn" else ("torchao" if _torchao()[0] else "rtn"))
    assert diffs[8] < 0.05, diffs  # measured: 8-bit 0.02, 4-bit 0.39 of the largest logit
    assert diffs[4] > 5 * diffs[8] and diffs[4] > 0.1, diffs
    head = model.get_output_embeddings()
    assert all(mod is not head for _, mod, _ in quant_targets(model))


def test_quantize_refuses_an_unknown_backend():
    with pytest.raises(RapidunError, match="quant_backend"):
        quantize_weights(make_model(10), 4, backend="gptq")
