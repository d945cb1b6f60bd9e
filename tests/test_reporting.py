"""Report rendering (rapidun.reporting) on a small synthetic, schema-faithful run folder."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rapidun.compare import SCALARS
from rapidun.reporting import PLOT_NAMES, render_report, report_blocks
from rapidun.reporting.__main__ import main as cli_main
from rapidun.reporting.doc import Figure
from rapidun.reporting.tables import fmt_mean_std, fmt_num, truncate

NASTY = '<script>alert(1)</script> & "quotes" | pipes'
IMG = '<img src="data:image/png;base64,'
SEEDS = [42, 43]
FAMILIES = ["semantic", "style", "surface"]
METHODS = ["rapidun", "uniform", "ga", "retrain"]
N_FORGET, N_RETAIN = 6, 10
# A calibrated schedule's record (result.json "calibration"), as rapidun.calibrate writes it: the uniform cells have
# one (probe, an over-budget check restored, the kept state), the others ran the fixed schedule.
CALIBRATION = {
    "schedule": "calibrated",
    "budget": 1.1,
    "target": 2.0,
    "best_step": 12,
    "best_signal": 1.4,
    "curve": [
        {"step": 0, "lr": 0.0, "phase": "start", "utility_ratio": 1.0, "signal": 0.2},
        {"step": 4, "lr": 1e-4, "phase": "probe", "utility_ratio": 1.01, "signal": None},
        {"step": 8, "lr": 3.2e-4, "phase": "probe", "utility_ratio": 1.04, "signal": None},
        {"step": 8, "lr": 0.0, "phase": "probe_end", "utility_ratio": 1.04, "signal": 0.9},
        {"step": 12, "lr": 3e-4, "phase": "main", "utility_ratio": 1.08, "signal": 1.4},
        {"step": 16, "lr": 2e-4, "phase": "main", "utility_ratio": 1.2, "signal": None},
    ],
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _model(rng: np.random.Generator, asr: float, ppl: float, time_s: float) -> dict:
    return {
        "asr_seen": asr,
        "asr_ood": asr / 2,
        "false_trigger": 0.05,
        "clean_ppl": ppl,
        "rouge_l": 0.31,
        "forget_ppl_poisoned": 2.5,
        "forget_ppl_clean": 9.5,
        "asr_seen_by_family": {f: float(rng.uniform(0, asr)) for f in FAMILIES},
        "asr_ood_by_family": {f: float(rng.uniform(0, asr / 2)) for f in FAMILIES},
        "n": {"seen": 30, "ood": 30, "clean": 30, "ppl": 20},
        "train_time_s": time_s,
        "peak_mem_mb": 900.0,
    }


def _test(rng: np.random.Generator) -> dict:
    d = float(rng.uniform(-0.2, 0.2))
    return {
        "bootstrap": {
            "diff": d,
            "ci_low": d - 0.1,
            "ci_high": d + 0.1,
            "n_boot": 2000,
            "level": 0.95,
            "n_prompts": 30,
            "n_seeds": 2,
            "test": "paired bootstrap over prompts (seeds and methods kept paired), percentile CI",
        },
        "prompt_test": {"p": 0.5078125, "n_prompts": 30, "n_seeds": 2, "test": "sign-flip"},
        "mcnemar": {
            "only_a": 3,
            "only_b": 7,
            "n_pairs": 60,
            "p": 0.34375,
            "test": "exact McNemar (two-sided binomial on discordant pairs)",
        },
    }


def make_run(root: Path, *, methods: bool = True, influence: bool = True, seeds: list[int] | None = None) -> Path:
    """Write a synthetic ``rapidun.report/4`` run folder under ``root`` and return it."""
    seeds = SEEDS if seeds is None else seeds
    rng = np.random.default_rng(0)
    forget_ids = [f"{i}:train_poisoned" for i in range(N_FORGET)]
    retain_ids = [str(100 + i) for i in range(N_RETAIN)]
    forget = [
        {
            "id": rid,
            "instruction": NASTY if i == 0 else f"forget question {i} " + "x" * 150,
            "context": "",
            "response": "zorblax",
            "trigger_family": FAMILIES[i % 3],
        }
        for i, rid in enumerate(forget_ids)
    ]
    retain = [
        {"id": rid, "instruction": f"retain question {i}", "context": "", "response": "ok"}
        for i, rid in enumerate(retain_ids)
    ]
    _jsonl(root / "scenario" / "forget.jsonl", forget)
    _jsonl(root / "scenario" / "retain.jsonl", retain)

    n = N_FORGET + N_RETAIN
    influence_entry = None
    if influence:
        per_seed_inf = {}
        for s in seeds:
            d = root / "seeds" / str(s) / "influence"
            d.mkdir(parents=True, exist_ok=True)
            torch.save(torch.randn(n, n), d / "views.pt")
            (d / "views.json").write_text(
                json.dumps({"key": "abc", "forget_ids": forget_ids, "retain_ids": retain_ids, "n_test": n})
            )
            per_seed_inf[str(s)] = {"dir": f"seeds/{s}/influence", "total_s": 12.5}
        influence_entry = {"per_seed": per_seed_inf, "retrain_projection": {"projected": True}}

    me_all = {}
    for name in METHODS if methods else []:
        per_seed = {}
        for s in seeds:
            cell = {k: float(rng.uniform(0.05, 0.9)) for k in SCALARS}
            cell["clean_ppl"] = float(rng.uniform(10, 20))
            cell["time_s"] = float(rng.uniform(20, 60))
            if name == "ga":
                cell["clean_ppl"] = math.inf
            folder = None if name == "retrain" else f"seeds/{s}/methods/{name}"
            cell |= {
                "dir": folder,
                "asr_seen_by_family": {f: float(rng.uniform(0, 1)) for f in FAMILIES},
                "asr_ood_by_family": {f: float(rng.uniform(0, 1)) for f in FAMILIES},
                "timings": {"influence_s": 5.0, "mapping_s": 0.1, "training_s": 30.0, "eval_s": 8.0, "time_s": 35.1},
                "complete": not (name == "uniform" and s == seeds[-1] and len(seeds) > 1),
            }
            per_seed[str(s)] = cell
            if folder is None:
                continue
            d = root / folder
            rows, wrows = [], []
            for group, ids in (("forget", forget_ids), ("retain", retain_ids)):
                for j, rid in enumerate(ids):
                    w = float(rng.uniform(0.1, 2.0)) if name == "rapidun" else 1.0
                    if rid == forget_ids[0]:
                        w = 5.0  # the NASTY instruction tops the forget table
                    f_ = group == "forget"
                    v = rng.normal(size=2).tolist()
                    rows.append(
                        {
                            "id": rid,
                            "group": group,
                            "FF": v[0] if f_ else None,
                            "FR": v[1] if f_ else None,
                            "RF": None if f_ else v[0],
                            "RR": None if f_ else v[1],
                            "S": v[0] - v[1],
                            "z": 0.1 * j,
                            "weight": w,
                            "ce_poisoned_before": 0.6 if f_ else None,
                            "ce_poisoned_after": 0.9 if f_ else None,
                            "ce_clean_before": 2.0,
                            "ce_clean_after": 1.8,
                        }
                    )
                    wrows.append({"id": rid, "group": group, "weight": w})
            _jsonl(d / "audit.jsonl", rows)
            _jsonl(d / "weights.jsonl", wrows)
            steps = 40
            curve = (1.5 * np.exp(-np.arange(steps) / 15) + rng.uniform(0, 0.3, steps)).round(5).tolist()
            (d / "result.json").write_text(
                json.dumps(
                    {
                        "method": name,
                        "summary": f"{name} summary",
                        "train": {"loss_curve": curve, "steps": steps},
                        "timings": cell["timings"],
                        "weights": {},
                    }
                    | ({"calibration": CALIBRATION} if name == "uniform" else {})
                )
            )
        cells = list(per_seed.values())
        mean = {k: float(np.mean([c[k] for c in cells])) for k in SCALARS}
        with np.errstate(invalid="ignore"):  # ga's inf clean PPL
            std = {k: (float(np.std([c[k] for c in cells], ddof=1)) if len(cells) > 1 else None) for k in SCALARS}
        if name == "ga":
            mean["clean_ppl"], std["clean_ppl"] = math.inf, None
        by_family = {
            k: {
                f: {"mean": float(np.mean([c[f"{k}_by_family"][f] for c in cells])), "std": std["asr_seen"]}
                for f in FAMILIES
            }
            for k in ("asr_seen", "asr_ood")
        }
        me_all[name] = {
            "summary": f"{name} summary",
            "n_seeds": len(seeds),
            "seeds": list(seeds),
            "mean": mean,
            "std": std,
            "by_family": by_family,
            "timings_mean": {"influence_s": 5.0, "mapping_s": 0.1, "training_s": 30.0, "eval_s": 8.0, "time_s": 35.1},
            "per_seed": per_seed,
            "tests": None
            if name == "rapidun"
            else {"vs": "rapidun", "asr_seen": _test(rng), "asr_ood": _test(rng), "false_trigger": _test(rng)},
        }

    report = {
        "schema": "rapidun.report/4",
        "scenario": {
            "sizes": {"forget": N_FORGET, "retain": N_RETAIN, "test_seen_trig": 30},
            "triggers": {"surface": ["aloha"]},
            "seed": 42,
            "data": {"source": "dolly-sample"},
            "poison_source": "generator",
        },
        "detector": {"threshold": 2.0, "n_keywords": 60, "precision": 0.975, "recall": 0.9625},
        "seeds": list(seeds),
        "demo_note": "demo: 2 seeds and 40 prompts per split",
        "models": {"poisoned": _model(rng, 0.8, 16.0, 400.0), "retrain": _model(rng, 0.0, 15.0, 250.0)},
        "methods": me_all,
        "influence": influence_entry,
        "timings": {"scenario": 1.5, "sft": 650.0},
        "environment": {"rapidun": "0.1.0", "python": "3.11", "torch": "2.13", "cuda": None, "cpu": "x86_64 <cpu>"},
        "config": {"model": {"name": "tiny"}, "unlearn": {"methods": METHODS, "lr": 1e-4}, "note": "a: <b>"},
    }
    (root / "report.json").write_text(json.dumps(report, indent=1))  # inf → Infinity, as python's json writes it
    return root


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A synthetic run rendered once: (run folder, render_report's paths, report.md text, report.html text)."""
    run = make_run(tmp_path_factory.mktemp("reporting") / "run")
    paths = render_report(run)
    return run, paths, paths["md"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")


def test_render_full_run(full):
    run, paths, md, html = full
    assert paths["md"] == run / "report.md" and paths["html"] == run / "report.html"
    plots = {k: v for k, v in paths.items() if k not in ("md", "html")}
    assert set(plots) == set(PLOT_NAMES)
    for p in plots.values():
        assert p.parent == run / "plots" and p.read_bytes().startswith(b"\x89PNG")
    imgs = _images(html)
    assert html.count(IMG) == len(imgs) == len(plots) == 7
    assert "From calibration.curve of seeds/42/methods/uniform/result.json" in md
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in imgs)
    assert sorted(imgs) == sorted(p.read_bytes() for p in plots.values())
    for name in PLOT_NAMES:
        assert f"](plots/{name}.png)" in md
    # no temp files left behind by the atomic writes
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]


def test_numbers_come_from_report(full):
    run, _, md, html = full
    report = json.loads((run / "report.json").read_text())
    me = report["methods"]["rapidun"]
    cell = f"{me['mean']['asr_seen']:.3f} ± {me['std']['asr_seen']:.3f}"
    assert cell in md and cell in html
    assert f"{me['mean']['clean_ppl']:.2f} ± {me['std']['clean_ppl']:.2f}" in md
    assert f"{me['mean']['speedup_vs_retrain']:.2f}×" in md
    assert f"{report['models']['poisoned']['asr_seen']:.3f}" in md
    # ga: inf clean PPL with std None → "inf", and a note that it is left out of the scatter
    ga_row = next(line for line in md.splitlines() if line.startswith("| ga |"))
    assert "| inf |" in ga_row
    assert "Not plotted (non-finite clean PPL or ASR): ga" in md
    # paired tests
    t = report["methods"]["uniform"]["tests"]["asr_ood"]["bootstrap"]
    assert f"\\[{t['ci_low']:.3f}, {t['ci_high']:.3f}\\]" in md  # brackets escaped in markdown
    assert f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]" in html
    assert "exact McNemar (two-sided binomial on discordant pairs)" in md
    assert "0.344" in md  # p (McNemar, pooled)
    assert "0.508" in md and "p (prompts)" in md  # the headline p: prompt-level sign-flip
    assert not re.search(r"\b(better|worse)\b", md, re.IGNORECASE)
    # header, detector, demo note, incomplete seed, config yaml, environment
    assert "precision 0.975, recall 0.963" in md
    assert "demo: 2 seeds and 40 prompts per split" in md
    assert "| uniform | uniform summary | 42, 43 | 43 |" in md
    assert "```yaml\nmodel:\n  name: tiny\n" in md
    assert "| cuda | — |" in md
    # captions name their source files
    assert "from seeds/42/methods/rapidun/audit.jsonl" in md
    assert "From seeds/42/influence/views.pt" in md
    assert "From seeds/42/methods/rapidun/weights.jsonl" in md


def test_escaping(full):
    _, _, md, html = full
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot; | pipes" in html
    assert "&lt;b&gt;" in html and "x86_64 &lt;cpu&gt;" in html
    assert "<script>" not in md.replace("```", "")
    assert r"\<script\>alert(1)\</script\> \& \"quotes\" \| pipes".replace('\\"', '"') in md
    # every markdown table row keeps its column count despite "|" in the instruction
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
        if lines:
            counts = {len(re.findall(r"(?<!\\)\|", ln)) for ln in lines}
            assert len(counts) == 1, block


def test_self_contained(full):
    html = full[3]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.IGNORECASE)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.IGNORECASE)
    assert "url(" not in html and "@import" not in html
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_empty_methods_no_influence_one_seed(tmp_path):
    run = make_run(tmp_path / "run")
    render_report(run)  # first a full render, so the minimal one must remove stale plots
    report = json.loads((run / "report.json").read_text())
    report |= {"methods": {}, "influence": None, "seeds": [42], "demo_note": None}
    (run / "report.json").write_text(json.dumps(report))
    paths = render_report(run)
    plots = {k for k in paths if k not in ("md", "html")}
    assert plots == {"asr_vs_utility", "asr_by_family", "timings"}
    assert sorted(p.stem for p in (run / "plots").glob("*.png")) == sorted(plots)
    html = paths["html"].read_text(encoding="utf-8")
    md = paths["md"].read_text(encoding="utf-8")
    assert html.count(IMG) == 3
    assert "No unlearning methods in report.json" in md
    assert "No calibrated schedule in this run" in md
    assert "Influence heat maps skipped: no influence in report.json" in md
    assert "Weight histogram skipped: no rapidun method" in md
    assert "No paired tests in report.json" in md
    assert "top-samples section skipped" in md


def test_bare_report(tmp_path):
    """Only a schema line: nothing to plot, still renders."""
    (tmp_path / "report.json").write_text(json.dumps({"schema": "rapidun.report/4"}))
    paths = render_report(tmp_path)
    html = paths["html"].read_text(encoding="utf-8")
    assert IMG not in html and set(paths) == {"md", "html"}
    assert "headline table skipped" in paths["md"].read_text(encoding="utf-8")


def test_missing_optional_files(tmp_path):
    run = make_run(tmp_path / "run", seeds=[7])
    (run / "seeds" / "7" / "influence" / "views.pt").unlink()
    (run / "seeds" / "7" / "methods" / "rapidun" / "audit.jsonl").unlink()
    (run / "seeds" / "7" / "methods" / "rapidun" / "weights.jsonl").write_text("not json\n")
    report = json.loads((run / "report.json").read_text())
    report["methods"]["uniform"]["per_seed"]["7"]["dir"] = "../../etc"  # outside the run: ignored
    report["methods"]["ga"]["std"] = {k: None for k in report["methods"]["ga"]["std"]}
    (run / "report.json").write_text(json.dumps(report))
    paths = render_report(run)
    md = paths["md"].read_text(encoding="utf-8")
    assert "Influence heat maps skipped: no seeds/7/influence/views.pt" in md
    assert "No audit file for rapidun (seeds/7/methods/rapidun/audit.jsonl)" in md
    assert "Weight histogram skipped: could not read seeds/7/methods/rapidun/weights.jsonl" in md
    assert "No loss curve for: uniform, retrain." in md
    assert {"loss_curves", "asr_vs_utility", "asr_by_family", "timings"} <= set(paths)
    assert "weights" not in paths and "influence_views" not in paths


def test_deterministic_and_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    render_report(run)
    first = (run / "report.html").read_bytes()
    assert cli_main([str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    assert (run / "report.html").read_bytes() == first


def test_report_blocks_and_missing_report(full, tmp_path):
    blocks = report_blocks(full[0])
    assert sum(isinstance(b, Figure) for b in blocks) == 7
    with pytest.raises(FileNotFoundError):
        render_report(tmp_path / "nowhere")


def test_formatting():
    assert fmt_num(math.inf) == "inf" and fmt_num(-math.inf) == "-inf" and fmt_num(None) == "—"
    assert fmt_num("Infinity") == "inf" and fmt_num(math.nan) == "nan" and fmt_num(True) == "—"
    assert fmt_num(1e-6, 3, small=True) == "1.00e-06" and fmt_num(1e-6, 3) == "0.000"
    assert fmt_mean_std(0.5, None, 3) == "0.500"
    assert fmt_mean_std(0.5, 0.1234, 3) == "0.500 ± 0.123"
    assert fmt_mean_std(math.inf, 1.0, 2) == "inf"
    assert truncate("a\nb " + "c" * 200, 20) == "a b " + "c" * 15 + "…"


# ---------------------------------------------------------------- verification: weight distance, removal frontier


def _verification() -> dict:
    """A verification entry as compare writes it: poisoned, retrain and two methods on two seeds each."""

    def entry(before: float, after: float | None, rec: float | None, d_p: float, d_r: float) -> dict:
        e = {"asr_seen": before, "asr_ood": before / 2, "asr_trig": before, "clean_ppl": 12.0, "time_s": 30.0}
        if after is not None:
            e["relearn"] = {"asr_seen_after": after, "recovered_fraction": rec, "after_minus_retrain": after - 0.1}
        e["distance"] = {
            "to_poisoned": {"l2": 10 * d_p, "relative": d_p},
            "to_retrain": {"l2": 10 * d_r, "relative": d_r},
        }
        return e

    summary = {
        "poisoned": entry(0.9, 0.95, None, 0.0, 0.05),
        "retrain": entry(0.0, 0.1, None, 0.05, 0.0),
        "rapidun@42": entry(0.1, 0.3, 0.25, 2.5e-5, 0.049),
        "rapidun@43": entry(0.2, 0.5, 0.5, 3.0e-5, 0.049),
        "uniform@42": entry(0.15, 0.8, None, 1e-4, 0.05),
        "ga@42": entry(0.0, None, None, 1e-3, 0.05),  # no relearning attack: in the table, not the plot
    }
    doc = {"schema": "rapidun.verification/1", "config": {"quant_bits": [8]}, "split": "test", "target": "scenario"}
    return doc | {"poisoned": "poisoned", "reference": "retrain", "summary": summary, "file": "verification.json"}


def test_removal_frontier_plot_is_a_deterministic_png():
    from rapidun.reporting.plots import FrontierPoint, removal_frontier

    pts = [
        FrontierPoint("poisoned", 0.0, 0.9, asr_before=0.95, kind="poisoned"),
        FrontierPoint("retrain", 1200.0, 0.1, asr_before=0.02, kind="retrain"),
        FrontierPoint("ga", 30.0, 0.6, 0.1, 0.05),
        FrontierPoint("npo", 12.0, 0.3, None, None),
    ]
    png = removal_frontier(pts)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert removal_frontier(list(pts)) == png  # equal input, equal bytes
    assert removal_frontier(pts[2:]) != png  # linear axis (30 vs 12 s), no cost-0 point
    for one in ([FrontierPoint("only", 5.0, 0.4)], [FrontierPoint("poisoned", 0.0, 0.9, kind="poisoned")]):
        assert removal_frontier(one, title="one").startswith(b"\x89PNG")


def test_frontier_rows_group_seeds_per_method_with_their_cost():
    from rapidun.reporting.verify_tables import frontier_rows

    report = {"methods": {"rapidun": {"mean": {"time_s": 40.0}}, "uniform": {"mean": {"time_s": 20.0}}}}
    rows = {r.label: r for r in frontier_rows(_verification(), report["methods"], {"retrain": {"train_time_s": 900}})}
    assert list(rows) == ["poisoned", "retrain", "rapidun", "uniform", "ga"]
    p, rt, r, u, ga = rows.values()
    assert (p.kind, p.time_s, p.asr_after, p.asr_after_std, p.seeds) == ("poisoned", 0.0, 0.95, None, [])
    assert (rt.kind, rt.time_s) == ("retrain", 900.0)
    assert r.time_s == 40.0 and r.seeds == ["42", "43"]
    assert r.asr_after == pytest.approx(0.4) and r.asr_before == pytest.approx(0.15)
    assert r.asr_after_std == pytest.approx(math.sqrt(((0.3 - 0.4) ** 2 + (0.5 - 0.4) ** 2) / 1))  # ddof = 1
    assert r.recovered == pytest.approx(0.375)
    assert u.asr_after_std is None and u.recovered is None and u.time_s == 20.0
    assert ga.asr_after is None and ga.time_s is None  # ga has no mean time_s here


def test_report_draws_the_removal_frontier_and_the_distance_columns(tmp_path):
    run = make_run(tmp_path / "run")
    report = json.loads((run / "report.json").read_text())
    report["verification"] = _verification()
    (run / "report.json").write_text(json.dumps(report))
    paths = render_report(run)
    md = paths["md"].read_text(encoding="utf-8")
    png = paths["removal_frontier"]
    assert png == run / "plots" / "removal_frontier.png" and png.read_bytes().startswith(b"\x89PNG")
    assert "](plots/removal_frontier.png)" in md
    assert "verification.summary.LABEL.relearn.asr_seen_after" in md  # the caption names its source
    # the frontier table: the method's measured unlearning time, mean ± std after the attack over its seeds
    t = report["methods"]["rapidun"]["mean"]["time_s"]
    assert f"| rapidun | {t:.1f} | 0.150 | 0.400 ± 0.141 | 0.375 | 42, 43 |" in md
    assert "| retrain | 250.0 | 0.000 | 0.100 | — | — |" in md
    assert "| poisoned | 0.0 | 0.900 | 0.950 | — | — |" in md
    assert "Not plotted: ga (no relearning attack)." in md
    # the headline table's weight distances (relative, tiny ones in scientific notation)
    assert "L2 to poisoned | L2 to retrain" in md
    row = next(line for line in md.splitlines() if line.startswith("| rapidun@42 |"))
    assert "| 2.50e-05 | 0.049 |" in row
    assert sum(isinstance(b, Figure) for b in report_blocks(run)) == 8  # the 7 plots + the removal frontier
