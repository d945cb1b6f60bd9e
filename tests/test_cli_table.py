"""The printed tables of `rapidun run`/`demo` come from report.json alone."""

from __future__ import annotations

from rapidun.cli import print_table


def _m(asr: float, ppl: float) -> dict:
    fam = {"surface": asr, "style": asr, "semantic": asr}
    return {"asr_seen": asr, "asr_ood": asr / 2, "false_trigger": 0.0, "clean_ppl": ppl,
            "asr_seen_by_family": fam, "asr_ood_by_family": fam}  # fmt: skip


def test_methods_table_shows_measured_time_speedups_and_the_projection(capsys):
    report = {
        "models": {
            "poisoned": _m(0.8, 16.0) | {"train_time_s": 300.0},
            "retrain": _m(0.0, 15.0) | {"train_time_s": 250.0},
        },
        "methods": {
            "rapidun": _m(0.1, 17.0)
            | {
                "time_s": 125.0,
                "speedup_vs_retrain": 2.0,
                "speedup_vs_retrain_at_scale": {"dolly": 24.0, "alpaca": 170.0},
            },
            "ga": _m(0.0, 3.4e20)
            | {
                "time_s": 80.0,
                "speedup_vs_retrain": 3.125,
                "speedup_vs_retrain_at_scale": {"dolly": 37.5, "alpaca": 266.0},
            },
            "retrain": _m(0.0, 15.0)
            | {
                "time_s": 250.0,
                "speedup_vs_retrain": 1.0,
                "speedup_vs_retrain_at_scale": {"dolly": None, "alpaca": None},
            },
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
    }
    print_table(report)
    out = capsys.readouterr().out
    rapidun = next(line for line in out.splitlines() if line.startswith("rapidun"))
    assert "125" in rapidun and "2.0x" in rapidun and "24.0x" in rapidun
    ga = next(line for line in out.splitlines() if line.startswith("ga "))
    assert "3.4e+20" in ga
    retrain = [line for line in out.splitlines() if line.startswith("retrain")][-1]
    assert retrain.rstrip().endswith("-")
    assert "projected" in out and "7,192" in out
