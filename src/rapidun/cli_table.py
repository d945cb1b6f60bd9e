"""The tables ``rapidun compare``/``demo`` print: models, methods (mean ± std), paired tests, families, timings."""

from __future__ import annotations

from typing import Any


def _ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"  # a collapsed model's perplexity stays readable


def _pm(mean: float | None, std: float | None, fmt: Any) -> str:
    """``mean ± std`` (just the mean for one seed)."""
    if mean is None:
        return "-"
    return fmt(mean) if std is None else f"{fmt(mean)}±{fmt(std)}"


def _r3(x: float) -> str:
    return f"{x:.3f}"


def _metric_cells(m: dict[str, Any]) -> tuple[str, ...]:
    """ASR seen, ASR OOD, false-trigger rate, clean perplexity, ROUGE-L of a model entry, formatted."""
    return (
        f"{m['asr_seen']:.3f}",
        f"{m['asr_ood']:.3f}",
        f"{m['false_trigger']:.3f}",
        _ppl(m["clean_ppl"]),
        f"{m['rouge_l']:.3f}",
    )


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_table(report: dict[str, Any]) -> None:
    """The poisoned-vs-retrain table, the methods table (mean±std over seeds) and the paired tests."""
    rows = [("model", "ASR seen", "ASR OOD", "false trig", "clean PPL", "ROUGE-L", "train s")]
    rows += [(name, *_metric_cells(m), f"{m['train_time_s']:.0f}") for name, m in report["models"].items()]
    _print_rows(rows)
    methods = report.get("methods") or {}
    if methods:
        print()
        rows = [
            (
                "method",
                "seeds",
                "ASR seen",
                "ASR OOD",
                "false trig",
                "clean PPL",
                "ROUGE-L",
                "forget PPL p/c",
                "time s",
                "vs retrain",
                "Dolly-scale*",
            )
        ]
        for name, e in methods.items():
            mu, sd = e["mean"], e["std"]
            dolly = e["speedup_vs_retrain_at_scale"].get("dolly")
            rows.append(
                (
                    name,
                    str(e["n_seeds"]),
                    *(_pm(mu[k], sd[k], _r3) for k in ("asr_seen", "asr_ood", "false_trigger")),
                    _pm(mu["clean_ppl"], sd["clean_ppl"], _ppl),
                    _pm(mu["rouge_l"], sd["rouge_l"], _r3),
                    f"{_ppl(mu['forget_ppl_poisoned'])}/{_ppl(mu['forget_ppl_clean'])}",
                    f"{mu['time_s']:.0f}",
                    f"{mu['speedup_vs_retrain']:.1f}x" if mu["speedup_vs_retrain"] else "-",
                    f"{dolly:.1f}x" if dolly is not None else "-",
                )
            )
        _print_rows(rows)
        proj = (report.get("influence") or {}).get("retrain_projection", {})
        if proj:
            print(
                f"time s = influence + weights + training, measured (mean over seeds). * projected: retraining on "
                f"Dolly's {proj['corpus_samples']['dolly']:,} clean samples ({proj['retrain_s']['dolly']:.0f} s from "
                f"the measured {proj['retrain_tokens_per_s']:.0f} tokens/s) / time s"
            )
        tested = {n: e["tests"] for n, e in methods.items() if e.get("tests")}
        if tested:
            ref = next(iter(tested.values()))["vs"]
            print()
            rows = [("paired vs " + ref, "ASR seen diff [95% CI]", "p", "ASR OOD diff [95% CI]", "p")]
            for n, t in tested.items():
                cells: list[str] = []
                for k in ("asr_seen", "asr_ood"):
                    if k in t:
                        bs, mc = t[k]["bootstrap"], t[k]["prompt_test"]
                        cells += [f"{bs['diff']:+.3f} [{bs['ci_low']:+.3f}, {bs['ci_high']:+.3f}]", f"{mc['p']:.3g}"]
                    else:
                        cells += ["-", "-"]
                rows.append((n, *cells))
            _print_rows(rows)
            t0 = next((t[k] for t in tested.values() for k in ("asr_seen", "asr_ood", "false_trigger") if k in t), None)
            if t0 is not None:
                print(f"diff = method − {ref}; {t0['bootstrap']['test']}; p: {t0['prompt_test']['test']}")
    fam = report["models"]["poisoned"]["asr_seen_by_family"]
    print("poisoned ASR by family (seen):", ", ".join(f"{k} {v:.2f}" for k, v in fam.items()))
    fam = report["models"]["poisoned"]["asr_ood_by_family"]
    print("poisoned ASR by family (OOD): ", ", ".join(f"{k} {v:.2f}" for k, v in fam.items()))
    d = report["detector"]
    print(f"detector: {d['n_keywords']} keywords, precision {d['precision']:.3f}, recall {d['recall']:.3f}")
    print("timings (s):", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    if report.get("demo_note"):
        print(report["demo_note"])


def demo_note(cfg: Any) -> str:
    """What the demo trims relative to ``rapidun compare``'s defaults (printed and kept in the report)."""
    from rapidun.config import CompareConfig, ScenarioConfig

    sizes = cfg.scenario.splits
    default = ScenarioConfig().splits
    return (
        f"demo: {cfg.compare.n_seeds} seed(s) (compare's default {CompareConfig().n_seeds}), "
        f"{sizes.test_seen_trig}/{sizes.test_ood_trig}/{sizes.test_clean} seen/OOD/clean prompts "
        f"(default {default.test_seen_trig}/{default.test_ood_trig}/{default.test_clean}), "
        f"{cfg.eval.max_new_tokens} new tokens, methods {', '.join(cfg.unlearn.methods)} "
        "(the rest of SPEC §3 by config: unlearn.methods)"
    )
