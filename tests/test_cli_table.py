"""The printed tables of `rapidun compare`/`run`/`demo` come from report.json alone."""

from __future__ import annotations

from rapidun.cli import print_table
from rapidun.compare import aggregate


def _m(asr: float, ppl: float) -> dict:
    fam = {"surface": asr, "style": asr, "semantic": asr}
    return {"asr_seen": asr, "asr_ood": asr / 2, "false_trigger": 0.0, "clean_ppl": ppl, "rouge_l": 0.2,
            "forget_ppl_poisoned": 3.0, "forget_ppl_clean": 9.0,
            "asr_seen_by_family": fam, "asr_ood_by_family": fam}  # fmt: skip


def _cell(asr: float, ppl: float, time_s: float, retrain_s: float = 250.0, dolly: float | None = 3000.0) -> dict:
    return _m(asr, ppl) | {
        "time_s": time_s,
        "timings": {"training_s": time_s, "eval_s": 30.0},
        "peak_mem_mb": 900.0,
        "speedup_vs_retrain": retrain_s / time_s,
        "speedup_vs_retrain_at_scale": {"dolly": dolly / time_s if dolly else None, "alpaca": None},
    }


def test_methods_table_shows_mean_std_speedups_tests_and_the_projection(capsys):
    tests = {
        "vs": "rapidun",
        "asr_seen": {
            "bootstrap": {"diff": -0.05, "ci_low": -0.1, "ci_high": 0.0, "test": "paired bootstrap"},
            "prompt_test": {"p": 0.25, "test": "sign-flip on prompts"},
            "mcnemar": {"only_a": 3, "only_b": 0, "p": 0.0625, "test": "exact McNemar"},
        },
    }
    report = {
        "models": {
            "poisoned": _m(0.8, 16.0) | {"train_time_s": 300.0},
            "retrain": _m(0.0, 15.0) | {"train_time_s": 250.0},
        },
        "methods": {
            "rapidun": aggregate({"42": _cell(0.1, 17.0, 120.0), "43": _cell(0.2, 18.0, 130.0)}, "r") | {"tests": None},
            "ga": aggregate({"42": _cell(0.0, 3.4e20, 80.0), "43": _cell(0.0, 3.4e20, 80.0)}, "g") | {"tests": tests},
            "retrain": aggregate({"reference": _cell(0.0, 15.0, 250.0, dolly=None)}, "sft") | {"tests": None},
        },
        "influence": {
            "retrain_projection": {
                "corpus_samples": {"dolly": 7192},
                "retrain_s": {"dolly": 3000.0},
                "retrain_tokens_per_s": 290.0,
            }
        },
        "detector": {"n_keywords": 60, "precision": 1.0, "recall": 1.0},
        "timings": {"scenario": 0.1},
        "demo_note": "demo: 2 seed(s)",
    }
    print_table(report)
    out = capsys.readouterr().out
    lines = out.splitlines()
    rapidun = next(line for line in lines if line.startswith("rapidun"))
    # mean ± sample std over the two seeds: ASR 0.15 ± 0.071, time 125 s, 250/125 = 2.0x, Dolly 3000/125 = 24.0x
    assert "0.150±0.071" in rapidun and " 125 " in rapidun and "2.0x" in rapidun and "24.0x" in rapidun
    ga = next(line for line in lines if line.startswith("ga "))
    assert "3.4e+20" in ga
    retrain = next(line for line in lines if line.startswith("retrain") and " 1 " in line)
    assert retrain.rstrip().endswith("-")
    assert "projected" in out and "7,192" in out
    paired = next(line for line in lines if line.startswith("ga ") and "[" in line)
    assert "-0.050 [-0.100, +0.000]" in paired and "0.25" in paired
    assert "0.0625" not in paired  # the headline p is the prompt-level test's, not the pooled McNemar's
    assert "paired bootstrap" in out and "sign-flip on prompts" in out and "demo: 2 seed(s)" in out


def test_demo_note_states_what_the_demo_trims():
    from rapidun.cli import _demo_config, demo_note
    from rapidun.config import load_config

    note = demo_note(load_config(_demo_config(), []))
    assert note.startswith("demo: 1 seed(s) (compare's default 3)")
    assert "40/40/40 seen/OOD/clean prompts (default 60/60/60)" in note and "rapidun, uniform" in note
