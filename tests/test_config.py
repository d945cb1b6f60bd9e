"""Config loading: defaults, YAML, dotted overrides, validation errors, shipped configs, field help."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rapidun.config import RunConfig, ScenarioConfig, SFTConfig, apply_overrides, describe, dump_yaml, load_config
from rapidun.errors import RapidunError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "src" / "rapidun" / "configs").glob("*.yaml"))


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.sft == SFTConfig()
    assert cfg.scenario == ScenarioConfig()
    assert cfg.model.max_prompt_tokens < cfg.model.max_length
    assert [f.name for f in cfg.scenario.trigger_families()] == ["surface", "style", "semantic"]


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  lr: 1.0e-3\n  epochs: 5\nscenario:\n  splits:\n    train_clean: 99\n", encoding="utf-8")
    cfg = load_config(p, ["sft.lr=0.0005", "scenario.splits.train_clean=50", "eval.keywords=[foo, bar]"])
    assert cfg.sft.lr == pytest.approx(5e-4)
    assert isinstance(cfg.sft.lr, float)
    assert cfg.sft.epochs == 5  # from the YAML, untouched by overrides
    assert cfg.scenario.splits.train_clean == 50
    assert cfg.scenario.splits.train_poisoned == 60  # default kept
    assert cfg.eval.keywords == ["foo", "bar"]


def test_override_float_in_e_notation():
    """``sft.lr=5e-4`` is the example the override error message itself gives; PyYAML reads it as a string."""
    cfg = load_config(None, ["sft.lr=5e-4"])
    assert cfg.sft.lr == pytest.approx(5e-4)


def test_yaml_float_in_e_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  lr: 5e-4\n", encoding="utf-8")
    assert load_config(p).sft.lr == pytest.approx(5e-4)


def test_int_accepted_for_float_field():
    cfg = load_config(None, ["sft.lr=1"])
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)


def test_override_without_equals_errors():
    with pytest.raises(RapidunError, match="key=value"):
        apply_overrides({}, ["sft.lr"])


def test_unknown_key_names_valid_keys():
    with pytest.raises(RapidunError) as ei:
        load_config(None, ["sft.learning_rate=1e-3"])
    msg = str(ei.value)
    assert "learning_rate" in msg
    assert "'lr'" in msg and "'epochs'" in msg


def test_unknown_top_level_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 1\n", encoding="utf-8")
    with pytest.raises(RapidunError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "trainer" in msg and "'sft'" in msg and str(p) in msg


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("sft.epochs=2.5", "sft.epochs"),
        ("sft.epochs=abc", "sft.epochs"),
        ("sft.lr=true", "sft.lr"),
        ("eval.early_stop=1", "eval.early_stop"),
        ("sft.lora_targets=q_proj", "sft.lora_targets"),
        ("data.fields=[a]", "data.fields"),
        ("sft=3", "sft"),
    ],
)
def test_wrong_type_errors(override, where):
    with pytest.raises(RapidunError, match=where.replace(".", r"\.")):
        load_config(None, [override])


def test_override_into_empty_yaml_section(tmp_path):
    """``sft:`` with every key commented out is an empty section (YAML null), not a scalar."""
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  # lr: 1.0e-3\n", encoding="utf-8")
    assert load_config(p).sft == SFTConfig()
    assert load_config(p, ["sft.epochs=7"]).sft.epochs == 7


def test_override_on_non_mapping_yaml_is_a_user_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RapidunError, match="mapping"):
        load_config(p)
    with pytest.raises(RapidunError):
        load_config(p, ["sft.epochs=7"])


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(RapidunError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n", encoding="utf-8")
    with pytest.raises(RapidunError, match="invalid YAML"):
        load_config(bad)


def test_config_by_shipped_name(tmp_path, monkeypatch):
    by_name = load_config("demo")
    by_path = load_config(ROOT / "src" / "rapidun" / "configs" / "demo.yaml")
    assert by_name == by_path
    assert by_name.unlearn.lr != RunConfig().unlearn.lr  # the demo's CPU settings, not SPEC's defaults
    # a file of that name in the working directory wins over the shipped config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("sft:\n  epochs: 7\n", encoding="utf-8")
    assert load_config("demo").sft.epochs == 7
    with pytest.raises(RapidunError, match=r"does not exist.*shipped with rapidun: demo"):
        load_config("nosuch")


def test_shipped_configs_exist():
    assert SHIPPED, "no YAML files under configs/"


def _is_study(path):
    return path.name.startswith("study")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    if _is_study(path):  # a study file: every scenario config and method override must load
        from rapidun.study import load_study

        spec = load_study(path)
        assert spec.scenarios and spec.methods
        return
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.max_prompt_tokens < cfg.model.max_length
    assert cfg.scenario.forget_size <= cfg.scenario.splits.train_poisoned
    for fam in cfg.scenario.trigger_families():
        assert fam.position in ("prefix", "suffix")


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["sft.lr=0.0005", "scenario.splits.train_clean=50"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_yaml(cfg), encoding="utf-8")
    assert load_config(p) == cfg
    assert yaml.safe_load(p.read_text(encoding="utf-8"))["sft"]["lr"] == pytest.approx(5e-4)


def test_families_from_yaml_dicts():
    cfg = load_config(None, ['scenario.families=[{name: x, position: prefix, seen: ["!!"], ood: ["??"]}]'])
    fams = cfg.scenario.trigger_families()
    assert [(f.name, f.position, f.seen, f.ood) for f in fams] == [("x", "prefix", ["!!"], ["??"])]


def test_describe_lists_fields_with_help():
    lines = describe()
    assert any(line.startswith("sft.lr = 0.001  # ") and "learning rate" in line for line in lines)
    assert any(line.startswith("scenario.splits.train_clean = 400  # ") for line in lines)
    assert any(line.startswith("model.name = 'default'") for line in lines)
    assert all("  # " in line and line.split("  # ", 1)[1].strip() for line in lines), "every field has help"
    keys = [line.split(" = ", 1)[0] for line in lines]
    assert len(keys) == len(set(keys))
    assert "scenario.splits" not in keys  # nested sections are expanded, not listed


def test_cli_takes_a_shipped_config_by_name(capsys):
    from rapidun import cli

    assert cli.main(["config", "--config", "demo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["unlearn"]["lr"] == load_config("demo").unlearn.lr
    assert cli.main(["config", "--config", "nosuch"]) == 2
    assert "shipped with rapidun: demo" in capsys.readouterr().err


def test_constants_have_one_home_and_config_checks_does_not_import_config():
    import dataclasses
    import subprocess
    import sys

    from rapidun import constants
    from rapidun.config import SplitSizes, UnlearnConfig

    assert tuple(f.name for f in dataclasses.fields(SplitSizes)) == constants.SPLIT_NAMES
    assert UnlearnConfig().utility_budget == constants.UTILITY_BUDGET
    code = "import sys, rapidun.config_checks; print('rapidun.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # no cycle: the checks need only the constants
