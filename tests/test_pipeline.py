"""Run-folder rules of the pipeline (no model needed)."""

from __future__ import annotations

import json

import pytest

from rapidun.config import load_config
from rapidun.errors import RapidunError
from rapidun.pipeline import prepare_out


def test_prepare_out_claims_empty_and_reuses_same_run(tmp_path):
    cfg = load_config(None, ["scenario.seed=1"])
    out = prepare_out(tmp_path / "run", cfg, overwrite=False)
    assert (out / "run.json").is_file() and (out / "config.resolved.yaml").is_file()
    assert "seed: 1" in (out / "config.resolved.yaml").read_text()
    prepare_out(out, cfg, overwrite=False)  # same config: resume, no error


def test_prepare_out_refuses_a_different_run_unless_overwrite(tmp_path):
    out = prepare_out(tmp_path / "run", load_config(None, ["scenario.seed=1"]), overwrite=False)
    (out / "report.json").write_text("{}")
    other = load_config(None, ["scenario.seed=2"])
    with pytest.raises(RapidunError, match=r"different config.*--overwrite"):
        prepare_out(out, other, overwrite=False)
    assert (out / "report.json").read_text() == "{}"  # nothing lost
    prepare_out(out, other, overwrite=True)
    assert "seed: 2" in (out / "config.resolved.yaml").read_text()


def test_overwrite_removes_only_what_the_replaced_output_wrote(tmp_path):
    from rapidun.pipeline import mark_complete

    a, b = load_config(None, ["scenario.seed=1"]), load_config(None, ["scenario.seed=2"])
    out = prepare_out(tmp_path / "run", a, overwrite=False)
    (out / "report.json").write_text("{}")
    (out / "seeds").mkdir()
    mark_complete(out)  # a finished run records what it wrote
    (out / "my_notes.txt").write_text("mine")  # the user adds files afterwards
    (out / "report.md").write_text("my own report.md")  # even under a name rapidun uses
    prepare_out(out, a, overwrite=False)  # the same run resumed: the user's files stay foreign
    mark_complete(out)
    assert set(json.loads((out / "run.json").read_text())["written"]) == {
        "config.resolved.yaml", "report.json", "run.json", "seeds",
    }  # fmt: skip
    prepare_out(out, b, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "report.md").read_text() == "my own report.md"
    assert not (out / "report.json").exists() and not (out / "seeds").exists()
    assert json.loads((out / "run.json").read_text())["foreign"] == ["my_notes.txt", "report.md"]
    mark_complete(out)
    assert "my_notes.txt" not in json.loads((out / "run.json").read_text())["written"]


def test_overwrite_of_an_unfinished_output_removes_only_rapidun_names(tmp_path):
    a, b = load_config(None, ["scenario.seed=1"]), load_config(None, ["scenario.seed=2"])
    out = prepare_out(tmp_path / "run", a, overwrite=False)  # never marked complete: no record of its files
    (out / "eval").mkdir()
    (out / "probes_mine.jsonl").write_text("")
    (out / "data.csv").write_text("user data")
    prepare_out(out, b, overwrite=True)
    assert not (out / "eval").exists() and not (out / "probes_mine.jsonl").exists()
    assert (out / "data.csv").read_text() == "user data"


def test_prepare_out_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(RapidunError, match="holds no rapidun run"):
        prepare_out(tmp_path, load_config(None), overwrite=False)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_retrain_projection_is_measured_throughput_times_corpus_tokens():
    from rapidun.compare import PAPER_CORPORA, retrain_projection

    train = {"tokens": 12_000, "samples": 100, "epochs": 2, "tokens_per_s": 300.0}
    p = retrain_projection(train, epochs=2)
    assert p["projected"] is True and p["tokens_per_sample"] == 60.0
    for name, n in PAPER_CORPORA.items():
        assert p["retrain_s"][name] == pytest.approx(n * 60.0 * 2 / 300.0)
    assert PAPER_CORPORA == {"dolly": 7192, "alpaca": 52002}


def test_unknown_method_in_config_is_an_error_naming_the_valid_ones():
    from rapidun.methods import get_method

    with pytest.raises(RapidunError, match=r"unlearn\.methods = \['rapidun', 'bogus'\]: must be .*uniform"):
        load_config(None, ["unlearn.methods=[rapidun,bogus]"])
    with pytest.raises(RapidunError, match=r"unknown unlearning method 'bogus'.*uniform"):
        get_method("bogus")


def test_more_seeds_extend_the_same_run(tmp_path):
    out = prepare_out(tmp_path / "run", load_config(None, ["compare.n_seeds=1"]), overwrite=False)
    prepare_out(out, load_config(None, ["compare.n_seeds=3", "compare.n_boot=50"]), overwrite=False)  # no error


def test_claim_out_raises_the_same_error_in_one_process(tmp_path):
    from rapidun.pipeline import claim_out

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("user data")
    with pytest.raises(RapidunError, match="holds no rapidun run"):
        claim_out(tmp_path / "x", load_config(None, []), overwrite=False)
    assert (tmp_path / "x" / "mine.txt").read_text() == "user data"


def test_report_json_is_strict_json():
    import json
    import math

    from rapidun.pipeline import finite_json

    r = finite_json({"a": math.inf, "b": [1.0, -math.inf, math.nan, {"c": 2}], "d": "x", "e": None, "f": 3})
    assert r == {"a": None, "b": [1.0, None, None, {"c": 2}], "d": "x", "e": None, "f": 3}
    json.dumps(r, allow_nan=False)


def test_compare_reference_must_be_a_listed_method(tmp_path):
    from rapidun.compare import stage_methods

    cfg = load_config(None, ["unlearn.methods=[uniform,ga]"])
    with pytest.raises(RapidunError, match=r"compare.reference='rapidun' is not in unlearn.methods"):
        stage_methods(cfg, tmp_path, {}, {}, {}, None)


def test_a_bad_reference_fails_before_any_model_is_built(tmp_path, monkeypatch):
    from rapidun import pipeline

    def boom(*a, **k):  # the first stage that builds anything
        raise AssertionError("stage_base ran before the methods were checked")

    monkeypatch.setattr(pipeline, "stage_base", boom)
    cfg = load_config(None, ["unlearn.methods=[uniform]"])
    with pytest.raises(RapidunError, match=r"compare.reference='rapidun' is not in unlearn.methods \['uniform'\]"):
        pipeline.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
