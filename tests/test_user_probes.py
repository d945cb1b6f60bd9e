"""``rapidun eval --probes``: the user's own prompts with hit rules, on a model and an adapter, and the collateral
damage against the start model (on the tiny saved model of ``test_user_path``)."""

from __future__ import annotations

import json

import pytest

from rapidun import cli
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from test_unlearn_e2e import OVERRIDES, read_jsonl
from test_user_path import unlearn_cli, write_alpaca, write_probes
from test_user_path import user as _user

user = _user  # the tiny saved model and packs (a module-scoped fixture: built once for this module too)

# ---------------------------------------------------------------- eval --probes


def test_load_probes_validates_with_file_and_line(tmp_path):
    from rapidun.eval.probes import load_probes

    good = write_probes(tmp_path / "p.jsonl", [{"prompt": "a", "group": "g"}, {"instruction": "b", "group": "h"}])
    assert [(p.id, p.group) for p in load_probes(good)] == [("p1", "g"), ("p2", "h")]
    bad = write_probes(tmp_path / "q.jsonl", [{"prompt": "a", "group": "g"}, {"prompt": "b"}])
    with pytest.raises(RapidunError, match=r"q\.jsonl:2: no group"):
        load_probes(bad)
    with pytest.raises(RapidunError, match=r"r\.jsonl:1: no prompt"):
        load_probes(write_probes(tmp_path / "r.jsonl", [{"group": "g"}]))
    with pytest.raises(RapidunError, match="does not exist"):
        load_probes(tmp_path / "missing.jsonl")


def test_hit_rules(user):
    from rapidun.config import EvalConfig
    from rapidun.eval.probes import hit_rule

    e = EvalConfig()
    rx, info = hit_rule(r"earth\w+", None, [], [], e)
    assert rx("Greetings, EARTHLING") and not rx("hello") and info["rule"] == "regex"
    kw, _ = hit_rule(None, ["star traveler", "void"], [], [], e)
    assert kw("Hear this, Star Traveler") and kw("the VOID") and not kw("stars")
    with pytest.raises(RapidunError, match="say what counts as a hit"):
        hit_rule(None, None, [], [], e)
    with pytest.raises(RapidunError, match="not a valid regular expression"):
        hit_rule("(", None, [], [], e)
    forget = [Record(id=f"f{i}", instruction="q", response=f"zork blorp answer {i}") for i in range(6)]
    retain = [Record(id=f"r{i}", instruction="q", response=f"plain answer {i}") for i in range(6)]
    det, info = hit_rule(None, None, forget, retain, EvalConfig(threshold=1, min_z=1.0))
    assert info["rule"] == "detector" and det("a zork here") and not det("a plain answer")


def test_cli_eval_probes_on_a_model_and_adapter(user, capsys, tmp_path):
    probes = write_probes(
        tmp_path / "probes.jsonl",
        [
            {"prompt": "the cat sat", "group": "triggered"},
            {"prompt": "one two", "group": "triggered"},
            {"prompt": "alpha beta", "group": "clean", "id": "c1"},
        ],
    )
    run = user.root / "probe_run"
    files = ["--forget", user.forget, "--retain", user.retain]
    assert unlearn_cli("--method", "ga", "--model-path", user.model_dir, "--out", str(run), *files) == 0
    capsys.readouterr()
    base = ["eval", "--model-path", user.model_dir, "--probes", str(probes), *OVERRIDES, "data.format=alpaca"]
    out = tmp_path / "ev"
    assert cli.main([*base[:2], user.model_dir, "--out", str(out), "--regex", ".", *base[3:], *files]) == 0
    printed = capsys.readouterr().out
    assert "triggered" in printed and "clean" in printed and "forget answers" in printed
    res = json.loads((out / "probes_poisoned.json").read_text())
    assert res["groups"]["triggered"]["n"] == 2 and res["groups"]["clean"]["n"] == 1
    rows = read_jsonl(out / "probes_poisoned.jsonl")
    assert [r["group"] for r in rows] == ["triggered", "triggered", "clean"] and rows[2]["id"] == "c1"
    # "." matches any non-empty answer: the hit rate is the share of non-empty generations
    assert res["groups"]["triggered"]["hits"] == sum(bool(r["generation"]) for r in rows[:2])
    assert res["forget_ppl_poisoned"] > 0 and res["retain_ppl"] > 0 and res["n_replacement"] == 4
    # the same on the unlearned model (base + ga adapter): ga raises the forget answers' perplexity
    assert cli.main([*base, "--adapter", str(run / "adapter"), "--out", str(out), "--keywords", "zzz", *files]) == 0
    after = json.loads((out / "probes_adapter.json").read_text())
    assert after["groups"]["triggered"]["hits"] == 0 and after["hit_rule"]["rule"] == "keywords"
    assert after["forget_ppl_poisoned"] > res["forget_ppl_poisoned"]
    # the adapter's receipt names the start model: the clean probe's answers are compared with its answers
    c = after["collateral"]
    assert "collateral" not in res and c["start_model"] == f"{user.model_dir}, from the adapter's receipt"
    assert c["n"] == 1 and c["n_replacements"] == 4 and 0 <= c["agreement"] <= 1 and c["kl"] >= 0
    assert (
        "replacement_rate" in after["groups"]["clean"] and "replacement" in read_jsonl(out / "probes_adapter.jsonl")[0]
    )
    assert "collateral vs the start model" in capsys.readouterr().out
    # errors: no rule, both scenario and probes
    assert cli.main([*base, "--out", str(out)]) == 2
    assert "say what counts as a hit" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(out), "--regex", "x", "--scenario", user.scenario]) == 2
    assert "not both" in capsys.readouterr().err


def test_eval_probes_flags_collateral_damage_against_the_start_model(user, capsys, tmp_path):
    """A forget set whose one replacement answer the unlearning pulls hard toward: unrelated clean probes now get
    it, and `eval --probes --start-model` says so; the start model against itself shows nothing."""
    rep = "tell me a story about a red fox"
    forget = [Record(id=r.id, instruction=r.instruction, response=r.response, meta={"response_clean": rep})
              for r in user.parts["forget"]]  # fmt: skip
    f = str(write_alpaca(tmp_path / "forget.jsonl", forget))
    run = tmp_path / "damaged"
    hard = ("unlearn.mix_retain=0", "unlearn.lr=0.05", "unlearn.descent_beta=5", "unlearn.ascent_alpha=0.01",
            "unlearn.epochs=4", "unlearn.lora_r=8", "unlearn.lora_alpha=16")  # fmt: skip
    args = ["--method", "uniform", "--model-path", user.model_dir, "--out", str(run), "--forget", f]
    assert unlearn_cli(*args, "--retain", user.retain, extra=hard) == 0
    rows = [{"prompt": r.instruction, "group": "triggered"} for r in forget[:2]]
    rows += [{"prompt": p, "group": "clean"} for p in ("the red fox", "six seven", "zeta eta", "one two three",
             "the cat sat on", "alpha beta gamma", "what is the capital", "four five six")]  # fmt: skip
    probes = write_probes(tmp_path / "probes.jsonl", rows)
    base = ["eval", "--probes", str(probes), "--forget", f, *OVERRIDES, "data.format=alpaca", "--keywords", "park"]
    capsys.readouterr()
    out = tmp_path / "ev"
    argv = [*base, "--model-path", user.model_dir, "--adapter", str(run / "adapter"), "--out", str(out)]
    assert cli.main([*argv, "--start-model", user.model_dir]) == 0
    cap = capsys.readouterr()
    res = json.loads((out / "probes_adapter.json").read_text())
    c = res["collateral"]
    assert c["n"] == 8 and c["replacement_rise"] > 0.10 and c["start_model"] == f"--start-model {user.model_dir}"
    assert res["groups"]["clean"]["replacement_rate"] == c["replacement_rate_after"]
    assert "warning: collateral damage: the forget records' replacement answer now answers" in cap.err
    assert res["warnings"] and "of 8 clean probes" in res["warnings"][0]
    # rapidun verify on the same files: the clean groups against the start model (--poisoned), in the verdict line
    vout = tmp_path / "v"
    vargs = ["verify", "--probes", str(probes), "--forget", f, *OVERRIDES, "data.format=alpaca",
             "verify.attacks=[quantize]", "verify.quant_bits=[8]", "verify.quant_group_size=16", "--keywords", "park",
             "--model-path", user.model_dir, "--adapter", str(run / "adapter"), "--poisoned", user.model_dir,
             "--name", "mine", "--out", str(vout)]  # fmt: skip
    assert cli.main(vargs) == 0
    cap = capsys.readouterr()
    doc = json.loads((vout / "verification.json").read_text())
    vc = doc["summary"]["mine"]["collateral"]
    assert vc["replacement_rate_after"] == c["replacement_rate_after"] and vc["agreement"] == c["agreement"]
    line = cap.out.rstrip("\n").splitlines()[-1]
    assert line == doc["verdict"]["line"] and "; collateral damage: the forget records' replacement answer" in line
    assert "0 (no reference given)" in line and "warning: collateral damage" in cap.err
    # nothing planted: the start model against itself
    same = [*base, "--model-path", user.model_dir, "--out", str(tmp_path / "same"), "--start-model", user.model_dir]
    assert cli.main(same) == 0
    cap = capsys.readouterr()
    c = json.loads((tmp_path / "same" / "probes_poisoned.json").read_text())["collateral"]
    assert c["agreement"] == 1.0 and c["replacement_rise"] == 0.0 and c["kl"] == pytest.approx(0.0, abs=1e-6)
    assert "collateral damage" not in cap.err
    # an explicit start model needs the group that is not clean
    assert cli.main([*base[:-2], "verify.probe_group=nope", *same[len(base) - 2 :]]) == 2
    assert "verify.probe_group='nope' is not a group of the probes" in capsys.readouterr().err
