"""Issue 12: every user error caught early and clearly (one message, exit 2), outputs owned, interrupts clean.

Property-based (hypothesis): random values for every config field, random override strings and random YAML files
fed to ``load_config``, and random argument lists fed to the CLI's checks, may raise only ``RapidunError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidun import cli
from rapidun.config import RunConfig, field_type, load_config
from rapidun.config_checks import CHECKS, validate
from rapidun.errors import RapidunError
from rapidun.pipeline import mark_complete, prepare_out


def _fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


FIELDS = _fields()
VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "nan", ".inf", "-.inf", "null", "~", "[]", "{}", "[1, a]", "{a: 1}", "1e-4", "0", "-1"]),
    st.booleans(),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4), st.floats()), max_size=3),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_user_errors(fn, *a):
    try:
        return fn(*a)
    except RapidunError as e:
        assert str(e).strip(), "an error must say something"
        return None


def _render(v) -> str:
    return json.dumps(v, allow_nan=True) if not isinstance(v, str) else v


def test_every_field_has_a_check_or_is_free_text():
    free = {"model.name", "model.system_prompt", "data.source", "data.fields", "data.split", "scenario.families",
            "scenario.poison_source", "scenario.poison_responses", "eval.early_stop", "eval.keywords",
            "influence.param_regex", "influence.normalize", "influence.hotwords", "influence.diagnostics",
            "weighting.include_self", "unlearn.merge", "unlearn.distill_freeze_reset", "unlearn.distill_base",
            "compare.reference", "verify.enabled", "trace.auto_hotwords", "trace.baselines",
            "trace.compare"}  # fmt: skip
    assert set(FIELDS) - set(CHECKS) == free
    assert set(CHECKS) <= set(FIELDS)
    validate(load_config(None))  # the defaults are valid
    for p in Path("configs").glob("*.yaml"):
        if "study" not in p.name:
            load_config(p)  # every shipped config is valid


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=4))
def test_random_field_values_give_a_valid_config_or_a_rapidun_error(pairs):
    cfg = _only_user_errors(load_config, None, [f"{k}={_render(v)}" for k, v in pairs])
    if cfg is not None:  # accepted: then every check holds, and numbers are finite
        for k, chk in CHECKS.items():
            v = cfg
            for part in k.split("."):
                v = getattr(v, part)
            assert chk(v), (k, v)
            if isinstance(v, float):
                assert math.isfinite(v)


@SETTINGS
@given(st.lists(st.text(alphabet=string.printable + "äßλ\u200d", max_size=30), max_size=4))
def test_random_override_strings_raise_only_rapidun_errors(overrides):
    _only_user_errors(load_config, None, overrides)


@SETTINGS
@given(st.text(alphabet=string.printable + "äλ", max_size=200))
def test_random_yaml_files_raise_only_rapidun_errors(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text, encoding="utf-8")
    _only_user_errors(load_config, p, [])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("unlearn.lr=0", "unlearn.lr"),
        ("unlearn.lr=nan", "unlearn.lr"),
        ("sft.lr=-1e-3", "sft.lr"),
        ("unlearn.epochs=0", "unlearn.epochs"),
        ("unlearn.batch_size=0", "unlearn.batch_size"),
        ("eval.batch_size=-3", "eval.batch_size"),
        ("model.max_prompt_tokens=500", "max_prompt_tokens must be < max_length"),
        ("scenario.forget_size=1000", "forget_size must be <= train_poisoned"),
        ("weighting.w_max=0.1", "w_min must be < w_max"),
        ("model.dtype=float8", "model.dtype"),
        ("model.device=gpu", "model.device"),
        ("influence.mode=l2", "influence.mode"),
        ("unlearn.fisher_alphas=[]", "unlearn.fisher_alphas"),
        ("sft.lora_targets=[]", "sft.lora_targets"),
        ("unlearn.lora_dropout=1.5", "unlearn.lora_dropout"),
    ],
)
def test_bad_values_are_named_with_what_they_must_be(override, field):
    with pytest.raises(RapidunError, match="must") as e:
        load_config(None, [override])
    assert field in str(e.value)


# --- the CLI: one message, exit status 2, before any model is loaded or any folder claimed ---------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: validation must come first."""
    import rapidun.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "with_adapter", boom)
    monkeypatch.setattr(models, "default_model_dir", boom)


@pytest.fixture
def files(tmp_path):
    f = tmp_path / "forget.jsonl"
    f.write_text(json.dumps({"instruction": "q", "response": "bad"}) + "\n")
    r = tmp_path / "retain.jsonl"
    r.write_text(json.dumps({"instruction": "q2", "response": "good"}) + "\n")
    m = tmp_path / "model"
    m.mkdir()
    for n in ("config.json", "model.safetensors", "tokenizer.json"):
        (m / n).write_text("{}")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        json.dumps({"instruction": "q", "response": "x"}).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n'
    )
    return {"forget": str(f), "retain": str(r), "model": str(m), "bad": str(bad), "root": tmp_path}


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def test_cli_user_errors_are_one_message_and_exit_2_before_any_work(files, capsys, no_model_load):
    out = files["root"] / "out"
    u = ["unlearn", "--method", "uniform", "--model-path", files["model"], "--out", out]
    fr = ["--forget", files["forget"], "--retain", files["retain"]]
    cases = [
        ([*u, *fr, "unlearn.epochs=0"], "unlearn.epochs = 0"),
        ([*u, *fr, "unlearn.lr=nan"], "unlearn.lr = nan"),
        ([*u, *fr, "unlearn.lr=0"], "unlearn.lr = 0"),
        ([*u, *fr, "unlearn.batch_size=0"], "unlearn.batch_size"),
        ([*u, *fr, "nodots=1"], "unknown key"),
        ([*u, *fr, "sft.lr"], "expected key=value"),
        ([*u, "--forget", files["root"] / "nope.jsonl", "--retain", files["retain"]], "does not exist"),
        ([*u, "--forget", files["root"], "--retain", files["retain"]], "is a folder"),
        ([*u, "--forget", files["bad"], "--retain", files["retain"]], "latin1.jsonl:2: not UTF-8"),
        ([*u, *fr, "--adapter", files["root"]], "no adapter_config.json"),
        ([*u, "--scenario", files["root"]], "not a scenario folder"),
        (["unlearn", "--method", "uniform", "--model-path", files["root"] / "nomodel", "--out", out, *fr], "does not"),
        (["unlearn", "--method", "uniform", "--model-path", files["forget"], "--out", out, *fr], "is a file"),
        (
            ["eval", "--model-path", files["model"], "--out", Path(files["model"]) / "ev", "--probes", files["forget"]],
            "is the input --model-path",
        ),
        (["eval", "--model-path", files["model"], "--out", files["root"], "--probes", files["forget"]], "lies inside"),
        (["scenario", "--config", files["root"] / "none.yaml", "--out", out], "does not exist"),
    ]
    for argv, msg in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2, (argv, err)
        assert msg in err, (msg, err)
        assert "Traceback" not in err and err.count("rapidun: error:") == 1
        assert not out.exists(), f"{argv}: a refused command must not claim --out"


def test_a_config_refused_by_validation_does_not_claim_out(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _run(["scenario", "--out", out, "unlearn.lr=0"], capsys)
    assert rc == 2 and not out.exists()
    small = ["scenario.splits.train_clean=40", "scenario.splits.train_poisoned=20", "scenario.retain_ratio=2"]
    rc, err = _run(["scenario", "--out", out, *small, "data.limit=400"], capsys)
    assert rc == 0, err  # the corrected rerun needs no --overwrite
    assert json.loads((out / "run.json").read_text())["complete"] is True


def test_overrides_swallowed_by_keywords_are_caught(files, capsys, no_model_load):
    argv = ["eval", "--model-path", files["model"], "--out", files["root"] / "o", "--probes", files["forget"]]
    rc, err = _run([*argv, "--keywords", "alien", "eval.max_new_tokens=4"], capsys)
    assert rc == 2 and "look like config overrides" in err


def test_interrupt_is_one_line_and_status_130(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_scenario", interrupted)
    rc, err = _run(["scenario", "--out", tmp_path / "o"], capsys)
    assert rc == 130 and "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, tmp_path, capsys):
    def buggy(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "cmd_scenario", buggy)
    rc, err = _run(["scenario", "--out", tmp_path / "o"], capsys)
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err and "this is a bug" in err


def test_a_full_disk_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "x.json"))

    monkeypatch.setattr(cli, "cmd_scenario", full)
    rc, err = _run(["scenario", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no space left" in err and "x.json" in err and "rerun" in err and "Traceback" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cmd=st.sampled_from(["unlearn", "eval", "compare", "influence", "scenario", "poison", "config"]),
    flags=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "--forget",
                    "--retain",
                    "--probes",
                    "--adapter",
                    "--scenario",
                    "--train",
                    "--test",
                    "--model-path",
                    "--config",
                    "--method",
                    "--regex",
                    "--keywords",
                ]
            ),
            st.sampled_from(["missing.jsonl", "", "dir", "model", "forget", "bad", "uniform", "(", "rapidun"]),
        ),
        max_size=5,
    ),
    overrides=st.lists(
        st.sampled_from(["unlearn.lr=0", "x=1", "sft.epochs=-1", "model.max_length=4", "eval.k=1"]),
        min_size=1,
        max_size=2,
    ),
)
def test_random_arguments_raise_only_user_errors(files, capsys, no_model_load, cmd, flags, overrides):
    root = files["root"]
    where = {"missing.jsonl": root / "missing.jsonl", "dir": root, "model": files["model"], "forget": files["forget"],
             "bad": files["bad"]}  # fmt: skip
    argv = [cmd, *overrides, "--out", root / "fuzz-out"]  # overrides first: --keywords takes what follows it
    for flag, v in flags:
        argv += [flag, where.get(v, v)]
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: unknown flag or a bad --method choice (its own one-line usage error)
        assert e.code == 2
        return
    err = capsys.readouterr().err
    # every override list holds an invalid one, so no command may succeed or start work
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (root / "fuzz-out").exists()


# --- outputs: owned, complete or absent ----------------------------------------------------------------------


def test_overwrite_removes_everything_the_replaced_run_wrote(tmp_path):
    cfg = load_config(None)
    out = prepare_out(tmp_path / "o", cfg, False, "unlearn", {"method": "uniform"})
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_text("old")
    (out / "adapter").mkdir()
    with pytest.raises(RapidunError, match="holds a `unlearn` output with a different config or inputs"):
        prepare_out(out, cfg, False, "unlearn", {"method": "ga"})
    assert (out / "merged" / "model.safetensors").is_file()  # refused: nothing lost
    prepare_out(out, cfg, True, "unlearn", {"method": "ga"})
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "run.json"]
    same = prepare_out(out, cfg, False, "unlearn", {"method": "ga"})  # the same run resumes
    assert same == out


def test_eval_onto_another_kind_of_output_is_refused(tmp_path):
    cfg = load_config(None)
    out = prepare_out(tmp_path / "o", cfg, False)  # a compare run folder
    (out / "detector.json").write_text("{}")
    with pytest.raises(RapidunError, match="holds a `run` output"):
        prepare_out(out, cfg, False, "eval", {"scenario": "x"})
    assert (out / "detector.json").read_text() == "{}"


def test_overwrite_never_deletes_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(RapidunError, match="never deletes files it did not write"):
        prepare_out(tmp_path, load_config(None), True)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_complete_only_at_the_end(tmp_path):
    out = prepare_out(tmp_path / "o", load_config(None), False)
    assert json.loads((out / "run.json").read_text())["complete"] is False
    mark_complete(out)
    assert json.loads((out / "run.json").read_text())["complete"] is True
    prepare_out(out, load_config(None), False)  # resumed: running again until its end
    assert json.loads((out / "run.json").read_text())["complete"] is False
