"""The ``rapidun unlearn`` command on the tiny saved model of :mod:`test_unlearn_e2e`: what it writes, what it
refuses (an --out on or inside the model, an unknown method, distill without its base) and a run stopped by a
non-finite loss. Every run checks the model folder is left byte-for-byte unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rapidun import cli
from rapidun.config import ScenarioConfig, load_config
from rapidun.data.scenario import save_scenario
from test_unlearn_e2e import OVERRIDES, folder_digest, load_base, peft_logits, probe_ids, read_jsonl, tiny_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with tiny_env(tmp_path_factory.mktemp("cli")) as e:
        yield e


@pytest.fixture(scope="module")
def scenario_dir(env):
    folder = env.root / "scenario"
    save_scenario(env.parts, folder, ScenarioConfig(), {"source": "test"})
    return str(folder)


def cli_unlearn(env, scenario_dir, out, *extra):
    return cli.main(
        ["unlearn", "--scenario", scenario_dir, "--model-path", env.model_dir, "--out", str(out), *extra, *OVERRIDES]
    )


def test_cli_unlearn_rapidun(env, scenario_dir, capsys):
    out = env.root / "cli_rapidun"
    assert cli_unlearn(env, scenario_dir, out, "--method", "rapidun") == 0
    stdout = capsys.readouterr().out
    assert "timings (s): influence" in stdout and "time " in stdout and "training" in stdout
    assert "forget CE poisoned" in stdout
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "rapidun" and res["complete"] is True and res["timings"]["influence_s"] > 0
    weights = read_jsonl(out / "weights.jsonl")
    assert [w["id"] for w in weights] == [r.id for r in env.parts["forget"] + env.parts["retain"]]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "influence" / "views.pt").is_file()
    assert not (out / "merged").exists()
    assert folder_digest(env.model_dir) == env.digest
    # the same command again reuses the influence views and says so
    assert cli_unlearn(env, scenario_dir, out, "--method", "rapidun") == 0
    assert "influence reused" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["influence_cached"] is True


def test_cli_unlearn_merge_writes_a_loadable_merged_model(env, scenario_dir, capsys):
    out = env.root / "cli_merge"
    assert cli_unlearn(env, scenario_dir, out, "--method", "ga", "--merge") == 0
    assert "merged/" in capsys.readouterr().out
    assert (out / "merged" / "config.json").is_file()
    ids = probe_ids(env)
    with torch.no_grad():
        got = load_base(out / "merged")(input_ids=ids).logits
    assert torch.allclose(got, peft_logits(env.model_dir, out / "adapter", ids), atol=1e-4)
    assert folder_digest(env.model_dir) == env.digest


def test_cli_unlearn_refuses_out_equal_to_model_path(env, scenario_dir, capsys):
    spelled = str(Path(env.model_dir).parent / "." / Path(env.model_dir).name)
    for out in (env.model_dir, spelled):
        assert cli_unlearn(env, scenario_dir, out, "--method", "uniform") == 2
        err = capsys.readouterr().err
        assert "--out" in err and "is the input --model-path" in err and "Traceback" not in err
    assert folder_digest(env.model_dir) == env.digest


def test_cli_unlearn_refuses_out_inside_model_path(env, scenario_dir, capsys):
    out = Path(env.model_dir) / "sub"
    assert cli_unlearn(env, scenario_dir, out, "--method", "uniform") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "inside" in err
    assert not out.exists()
    assert folder_digest(env.model_dir) == env.digest  # nothing created or changed inside the model folder


def test_cli_unlearn_non_finite_loss_fails_with_an_incomplete_result(env, scenario_dir, capsys):
    # a sibling whose name starts with the model folder's name is not "inside" it
    out = Path(env.model_dir + "_nonfinite")
    # α_a·CE(poisoned) overflows float32 at the first forget draw: the loss is −inf
    assert cli_unlearn(env, scenario_dir, out, "--method", "uniform", "unlearn.ascent_alpha=1e39") == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "outputs written to" in err
    res = json.loads((out / "result.json").read_text())
    assert res["complete"] is False and "loss became" in res["stopped"]
    assert res["train"]["steps"] < 4 and all(math.isfinite(v) for v in res["train"]["loss_curve"])
    assert (out / "adapter" / "adapter_config.json").is_file()  # the last good adapter is kept
    assert folder_digest(env.model_dir) == env.digest


@pytest.mark.parametrize("method", ["nope", "retrain"])
def test_cli_unlearn_rejects_unknown_method(env, scenario_dir, tmp_path, capsys, method):
    with pytest.raises(SystemExit) as e:
        cli_unlearn(env, scenario_dir, tmp_path / "out", "--method", method)
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_documented_autocast_off_is_accepted_unquoted(tmp_path):
    cfg = load_config(None, ["unlearn.autocast=off", "sft.autocast=off"])
    assert cfg.unlearn.autocast == "off" and cfg.sft.autocast == "off"
    (tmp_path / "c.yaml").write_text("unlearn:\n  autocast: off\n")
    assert load_config(tmp_path / "c.yaml").unlearn.autocast == "off"


def test_cli_unlearn_distill_needs_the_base(env, scenario_dir, tmp_path, capsys):
    assert cli_unlearn(env, scenario_dir, tmp_path / "out", "--method", "distill") != 0
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before writing anything
    out = tmp_path / "ok"
    ov = ["--method", "distill", "--base", env.model_dir, "unlearn.distill_steps=2", "unlearn.distill_batch_size=2"]
    assert cli_unlearn(env, scenario_dir, out, *ov) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["distill"]["base"] == env.model_dir and res["distill"]["train"]["steps"] >= 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert folder_digest(env.model_dir) == env.digest
