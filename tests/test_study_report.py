"""Study report rendering (rapidun.reporting.study_report) on a small synthetic study.json (no model)."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest

from rapidun.errors import RapidunError
from rapidun.reporting.doc import Figure, Table
from rapidun.reporting.study_report import DASH, forest_plot, render_study, safe_name, study_blocks

IMG = '<img src="data:image/png;base64,'
PNG = b"\x89PNG"
LABELS = ["uniform", "rapidun_lr1", "ga+kl"]
SCENARIOS = ["Backdoor-A", "backdoor b"]
METRICS = ["asr_trig", "asr_seen", "asr_ood"]


def _m(asr: float, ppl: float | None, rouge: float | None = 0.31) -> dict:
    return {
        "asr_seen": asr,
        "asr_ood": asr / 2,
        "asr_trig": 0.75 * asr,
        "false_trigger": 0.05,
        "clean_ppl": ppl,
        "rouge_l": rouge,
    }


def _test(diff: float, p: float, p_holm: float | None) -> dict:
    return {
        "diff": diff,
        "ci_low": diff - 0.1,
        "ci_high": diff + 0.1,
        "p": p,
        "p_holm": p_holm,
        "n_prompts": 160,
        "n_seeds": 3,
    }


def _scenario(k: int) -> dict:
    methods = {
        "uniform": {
            "method": "uniform",
            "overrides": [],
            "n_seeds": 3,
            "val": {"mean": _m(0.30, 10.5), "std": _m(0.02, 0.1)},
            "test": {"mean": _m(0.32, 10.6), "std": None},
            "diagnostics": {"steps": 40, "grad_norm": 1.25},
        },
        "rapidun_lr1": {
            "method": "rapidun",
            "overrides": ["unlearn.lr=1e-4"],
            "n_seeds": 3,
            "val": {"mean": _m(0.10, 10.8, None), "std": _m(0.01, 0.2, None)},
            "test": {"mean": _m(0.12, 10.9), "std": _m(0.01, 0.2)},
            "diagnostics": {"steps": 40, "weights": {"forget_mean": 1.5, "retain_mean": 0.9}, "ess": None},
        },
        "ga+kl": {
            "method": "ga",
            "overrides": ["unlearn.kl=1.0"],
            "n_seeds": None,
            "val": {"mean": _m(0.05, 14.0), "std": None},  # over the 1.10 × 10.0 limit
            "test": {"mean": _m(0.06, 14.2), "std": None},
            "diagnostics": None,
        },
    }
    tests = {
        split: {
            "rapidun_lr1": {m: _test(-0.2 - 0.01 * i, 0.001, 0.01234) for i, m in enumerate(METRICS)},
            "ga+kl": {m: _test(-0.25, 0.0001, 0.000012345 if m == "asr_trig" else None) for m in METRICS},
        }
        for split in ("val", "test")
    }
    return {
        "config": f"configs/scenario_{k}.yaml",
        "run_dir": f"runs/study/s{k}",
        "sizes": {"val_seen_trig": 80, "val_ood_trig": 80, "test_seen_trig": 80, "test_ood_trig": 80},
        "models": {"poisoned": {"val": _m(0.9, 10.0), "test": _m(0.92, 10.1)}, "retrain": {"val": None}},
        "ppl_limit": {"val": 11.0, "test": 11.11 if k == 0 else None},
        "methods": methods,
        "tests": tests,
        "selected": "rapidun_lr1" if k == 0 else None,
        "selected_reason": "lowest val asr_trig within the perplexity limit" if k == 0 else None,
    }


def _study() -> dict:
    return {
        "schema": "rapidun.study/1",
        "study_file": "configs/study.yaml",
        "reference": "uniform",
        "seeds": [42, 43, 44],
        "selection": {"metric": "asr_trig", "split": "val", "ppl_factor": 1.10, "rule": "Lowest val ASR trig."},
        "scenarios": {name: _scenario(k) for k, name in enumerate(SCENARIOS)},
        "decision": "rapidun_lr1 has the lower test ASR in Backdoor-A; no label was selected in backdoor b.",
    }


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[dict[str, Path], str, str]:
    (tmp_path / "study.json").write_text(json.dumps(_study()), encoding="utf-8")
    paths = render_study(tmp_path)
    return paths, paths["md"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")


def _rows(md: str, *cells: str) -> list[str]:
    """Markdown table lines holding every one of ``cells`` as a whole cell."""
    return [ln for ln in md.splitlines() if ln.startswith("|") and all(f"| {c} |" in ln for c in cells)]


def test_render_study_writes_every_file(rendered, tmp_path):
    paths, _, _ = rendered
    names = [f"forest_{s}_{split}" for s in ("backdoor_a", "backdoor_b") for split in ("test", "val")]
    assert set(paths) == {"md", "html", *names}
    assert paths["md"] == (tmp_path / "study.md").resolve()
    for name in names:
        assert paths[name] == (tmp_path / "plots" / f"{name}.png").resolve()
        assert paths[name].read_bytes().startswith(PNG)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_markdown_content(rendered):
    _, md, _ = rendered
    for label in LABELS:
        assert label in md
    for scenario in SCENARIOS:
        assert f"## {scenario}" in md
    assert "](plots/forest_backdoor_a_test.png)" in md and "](plots/forest_backdoor_b_val.png)" in md
    # Holm p values, three significant digits; a null Holm p shows a dash.
    assert _rows(md, "rapidun_lr1", "ASR trig.", "0.001", "0.0123", "160 × 3")
    assert _rows(md, "ga+kl", "ASR trig.", "0.0001", "1.23e-05")
    assert _rows(md, "ga+kl", "ASR seen", "0.0001", DASH)
    assert "-0.200 \\[-0.300, -0.100\\]" in md
    assert "Lowest val ASR trig." in md and md.rstrip().endswith("no label was selected in backdoor b.")
    assert "better" not in md.lower()


def test_null_fields_render_as_dash(rendered):
    _, md, _ = rendered
    # rouge_l null in the val mean; std null for the whole test split of uniform; n_seeds null.
    assert _rows(md, "rapidun_lr1", "3", "0.100 ± 0.010", DASH)
    assert _rows(md, "uniform", "3", "0.240", "0.320")
    assert _rows(md, "ga+kl †", DASH)
    # retrain has no test entry and a null val entry: every metric cell is a dash.
    retrain = _rows(md, "retrain (model)")
    assert len(retrain) == 4 and all(ln.count(f"| {DASH} ") == 7 for ln in retrain)
    # nested diagnostics as "k v" pairs, missing keys and null diagnostics as dashes.
    assert _rows(md, "rapidun_lr1", "40", "forget_mean 1.5, retain_mean 0.9", DASH)
    assert f"| ga+kl | {DASH} | {DASH} | {DASH} | {DASH} |" in md
    assert "**selected on validation:** " + DASH in md


def test_dagger_marks_rows_over_the_perplexity_limit():
    blocks = study_blocks(_study())
    tables = [b for b in blocks if isinstance(b, Table) and b.headers[0] == "Model / method"]
    assert len(tables) == 4  # two scenarios × (val, test)
    marked = [[r[0] for r in t.rows if r[0].endswith("†")] for t in tables]
    assert marked == [["ga+kl †"], ["ga+kl †"], ["ga+kl †"], []]  # second scenario has no test limit
    assert "11.00" in tables[0].caption and "1.10" in tables[0].caption
    assert "no row is marked" in tables[3].caption


def test_html_embeds_the_plots(rendered):
    _, _, html = rendered
    assert html.count(IMG) == 4
    start = html.index(IMG) + len(IMG)
    assert base64.b64decode(html[start : html.index('"', start)]).startswith(PNG)
    assert "ga+kl" in html and "<script" not in html


def test_forest_plot_png():
    png = forest_plot([("a", -0.2, -0.3, -0.1), ("b", 0.05, math.nan, math.nan), ("c", 0.1, -0.4, 0.6)], "t", "x")
    assert png.startswith(PNG)
    assert forest_plot([], "empty", "x").startswith(PNG)


def test_names_are_sanitized_and_unique():
    assert safe_name("Backdoor-A") == "backdoor_a"
    assert safe_name("<b>x</b> & y") == "b_x_b_y"
    study = _study()
    study["scenarios"] = {"a b": _scenario(0), "A-B": _scenario(1)}
    names = [b.name for b in study_blocks(study) if isinstance(b, Figure)]
    assert names == ["forest_a_b_test", "forest_a_b_val", "forest_a_b_2_test", "forest_a_b_2_val"]


def test_sparse_study_does_not_crash(tmp_path):
    assert study_blocks({})  # every field missing
    study = {"scenarios": {"s": {"methods": {"m": None}, "tests": {"test": {"m": {"asr_trig": None}}}}, "x": None}}
    (tmp_path / "study.json").write_text(json.dumps(study), encoding="utf-8")
    paths = render_study(tmp_path)
    md = paths["md"].read_text(encoding="utf-8")
    assert set(paths) == {"md", "html"}
    assert "expected 'rapidun.study/1'" in md and "No decision in study.json." in md


def test_stale_forest_plots_are_removed(tmp_path):
    (tmp_path / "plots").mkdir()
    stale, other = tmp_path / "plots" / "forest_old_test.png", tmp_path / "plots" / "asr_by_family.png"
    stale.write_bytes(PNG)
    other.write_bytes(PNG)
    (tmp_path / "study.json").write_text(json.dumps(_study()), encoding="utf-8")
    render_study(tmp_path)
    assert not stale.exists() and other.exists()


def test_missing_or_bad_study_json(tmp_path):
    with pytest.raises(RapidunError, match=r"study\.json") as e:
        render_study(tmp_path)
    assert str(tmp_path / "study.json") in str(e.value)
    (tmp_path / "study.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RapidunError, match="JSON object"):
        render_study(tmp_path)
    (tmp_path / "study.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RapidunError, match="not readable as JSON"):
        render_study(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json"]  # a refused render writes nothing
