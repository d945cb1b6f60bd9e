"""`rapidun study`: the study file's validation — what loads, and every bad file refused with where and why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rapidun.errors import RapidunError
from rapidun.study import (
    METHOD_SECTIONS,
    load_study,
    run_study,
    scenario_config,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def write_study(folder: Path, text: str, name: str = "study.yaml") -> Path:
    """A study file in ``folder`` next to ``run.yaml`` (a small valid run config)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "run.yaml").exists():
        (folder / "run.yaml").write_text("scenario:\n  seed: 3\nunlearn:\n  lr: 1.0e-4\n", encoding="utf-8")
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


SCEN = "scenarios:\n  - {name: a, config: run.yaml}\n"


# ---------------------------------------------------------------- load_study


def test_load_study_minimal_string_methods_and_defaults(tmp_path):
    p = write_study(tmp_path, SCEN + "methods: [uniform, rapidun, {method: ga}]\n")
    spec = load_study(p)
    assert [(m.label, m.method, m.overrides) for m in spec.methods] == [
        ("uniform", "uniform", []),
        ("rapidun", "rapidun", []),
        ("ga", "ga", []),
    ]
    s = spec.settings
    assert (s.reference, s.n_seeds, s.ppl_factor, s.n_boot) == ("uniform", 5, 1.10, 2000)
    assert [(sc.name, sc.config, sc.overrides) for sc in spec.scenarios] == [("a", "run.yaml", [])]


def test_load_study_labels_overrides_and_scenario_config_relative_to_the_file(tmp_path):
    text = (
        "study: {reference: base, n_seeds: 2, ppl_factor: 1.5, n_boot: 30}\n"
        "scenarios:\n  - {name: a, config: run.yaml, overrides: [scenario.splits.val_seen_trig=7]}\n"
        "methods:\n  - {label: base, method: uniform}\n"
        "  - {label: rapidun_t2, method: rapidun, overrides: [weighting.tau_forget=2.0, unlearn.lr=3e-4]}\n"
    )
    spec = load_study(write_study(tmp_path / "sub", text))
    assert spec.settings.reference == "base" and spec.settings.n_seeds == 2 and spec.settings.n_boot == 30
    cfg = scenario_config(spec, spec.scenarios[0])
    assert cfg.scenario.seed == 3 and cfg.scenario.splits.val_seen_trig == 7  # file + scenario override
    m = spec.methods[1]
    got = with_overrides(cfg, m.overrides)
    assert got.weighting.tau_forget == 2.0 and got.unlearn.lr == 3e-4
    assert cfg.unlearn.lr == 1e-4 and cfg.weighting.tau_forget != 2.0  # the scenario's config is not modified
    assert with_overrides(cfg, []) is cfg


def test_shipped_study_files_load():
    spec = load_study(ROOT / "configs" / "study.yaml")
    assert spec.settings.reference == "uniform" and spec.settings.n_seeds == 5
    assert [s.name for s in spec.scenarios] == ["demo"]
    labels = [m.label for m in spec.methods]
    assert labels[0] == "uniform" and "rapidun" in labels and len(labels) == len(set(labels))
    assert all(m.label == m.method for m in spec.methods)
    demo = scenario_config(spec, spec.scenarios[0])
    assert demo.scenario.splits.val_seen_trig == 80 and demo.scenario.splits.test_ood_trig == 80
    paper_spec = load_study(ROOT / "configs" / "study_paper.yaml")
    assert paper_spec.settings.reference == "uniform_lr1e-4" and paper_spec.settings.n_seeds == 5
    paper = scenario_config(paper_spec, paper_spec.scenarios[0])
    assert paper.scenario.splits.val_seen_trig == 80 and paper.scenario.forget_size == 40
    for m in paper_spec.methods:  # the screening's labels and settings, so its seed-42 cells are reused
        assert m.overrides == ["unlearn.lr=1e-4"]
    screen = {m.label: m for m in load_study(ROOT / "configs" / "study_paper_screen.yaml").methods}
    assert all(screen[m.label] == m for m in paper_spec.methods)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (SCEN + "methods: [uniform]\nextra: 1\n", r"unknown key\(s\) \['extra'\].*valid keys"),
        ("study: {refrence: uniform}\n" + SCEN + "methods: [uniform]\n", r"study: unknown key.*refrence"),
        (SCEN + "methods:\n  - {label: u, method: uniform, weight: 2}\n", r"methods\[0\]: unknown key.*weight"),
        (SCEN + "methods: [uniform, uniform]\n", r"duplicate method label.*'uniform'"),
        (SCEN + "methods: [uniform, {label: uniform, method: rapidun}]\n", r"duplicate method label"),
        (SCEN + "  - {name: a, config: run.yaml}\nmethods: [uniform]\n", r"duplicate scenario name.*'a'"),
        ("study: {reference: ga}\n" + SCEN + "methods: [uniform, rapidun]\n", r"reference 'ga' is not one of"),
        (SCEN + "methods: [rapidun]\n", r"reference 'uniform' is not one of"),  # default reference, not listed
        (SCEN + "methods: [uniform, retrain]\n", r"methods\[1\].*'retrain' is each scenario's reference"),
        (SCEN + "methods: [uniform, bogus]\n", r"unknown unlearning method 'bogus'.*uniform"),
        (SCEN + "methods: []\n", r"at least one scenario and one method"),
        ("methods: [uniform]\n", r"at least one scenario and one method"),
        (SCEN + "methods: ['bad label']\n", r"methods\[0\]\.label 'bad label'"),
        ("scenarios:\n  - {name: a/b, config: run.yaml}\nmethods: [uniform]\n", r"scenarios\[0\]\.name 'a/b'"),
        ("study: {n_seeds: 0}\n" + SCEN + "methods: [uniform]\n", r"n_seeds and n_boot must be >= 1"),
        ("study: {ppl_factor: 0}\n" + SCEN + "methods: [uniform]\n", r"ppl_factor > 0"),
        ("study: {n_seeds: many}\n" + SCEN + "methods: [uniform]\n", r"study\.n_seeds: expected int"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("scenarios: [\n", r"invalid YAML"),
        ("scenarios:\n  - run.yaml\nmethods: [uniform]\n", r"scenarios\[0\]: expected a mapping"),
        (SCEN + "methods:\n  - {label: u, method: uniform, overrides: unlearn.lr=1}\n", r"overrides: expected a list"),
    ],
    ids=[
        "unknown_key",
        "unknown_setting",
        "unknown_method_key",
        "dup_label",
        "dup_label_mixed",
        "dup_scenario",
        "reference_not_a_label",
        "default_reference_missing",
        "retrain",
        "unknown_method",
        "no_methods",
        "no_scenarios",
        "bad_label",
        "bad_scenario_name",
        "n_seeds_0",
        "ppl_factor_0",
        "n_seeds_text",
        "not_mapping",
        "bad_yaml",
        "scenario_not_mapping",
        "overrides_not_list",
    ],
)
def test_load_study_refuses_bad_files(tmp_path, text, match):
    p = write_study(tmp_path, text)
    with pytest.raises(RapidunError, match=match) as ei:
        load_study(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ("[unlearn.lr=fast]", r"unlearn\.lr: expected float"),
        ("[unlearn.nope=1]", r"unknown key.*nope"),
        ("[unlearn.lr]", r"expected key=value"),
        ("[unlearn.lr=-1]", r"unlearn\.lr = -1.*must be"),  # a range check, not only the type
        ("[unlearn.batch_size=0]", r"unlearn\.batch_size = 0.*must be"),
    ],
)
def test_a_bad_method_override_fails_at_load(tmp_path, overrides, match):
    p = write_study(
        tmp_path, SCEN + f"methods:\n  - uniform\n  - {{label: r2, method: rapidun, overrides: {overrides}}}\n"
    )
    with pytest.raises(RapidunError, match=match):
        load_study(p)


def test_a_bad_method_override_error_says_where(tmp_path):
    p = write_study(
        tmp_path, SCEN + "methods:\n  - uniform\n  - {label: r2, method: rapidun, overrides: [unlearn.lr=fast]}\n"
    )
    with pytest.raises(RapidunError, match=r"(method |methods\[1\] \()r2\)?: .*unlearn\.lr: expected float") as ei:
        load_study(p)
    assert str(p) in str(ei.value)


def test_a_bad_scenario_config_or_override_fails_at_load(tmp_path):
    p = write_study(tmp_path, "scenarios:\n  - {name: a, config: missing.yaml}\nmethods: [uniform]\n")
    with pytest.raises(RapidunError, match=r"config file .*missing\.yaml does not exist"):
        load_study(p)
    p = write_study(
        tmp_path, "scenarios:\n  - {name: a, config: run.yaml, overrides: [eval.bogus=1]}\nmethods: [uniform]\n"
    )
    with pytest.raises(RapidunError, match="bogus"):
        load_study(p)


def test_missing_study_file(tmp_path):
    with pytest.raises(RapidunError, match=r"nope\.yaml does not exist.*configs/study\.yaml"):
        load_study(tmp_path / "nope.yaml")


MISSING = r"missing required key\(s\) "


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (SCEN + "methods:\n  - {label: x}\n", r"methods\[0\]: " + MISSING + r"\['method'\]"),
        (SCEN + "methods:\n  - {overrides: [unlearn.lr=1]}\n", r"methods\[0\]: " + MISSING + r"\['method'\]"),
        ("scenarios:\n  - {name: a}\nmethods: [uniform]\n", r"scenarios\[0\]: " + MISSING + r"\['config'\]"),
        ("scenarios:\n  - {config: run.yaml}\nmethods: [uniform]\n", r"scenarios\[0\]: " + MISSING + r"\['name'\]"),
        ("scenarios:\n  - {}\nmethods: [uniform]\n", r"scenarios\[0\]: " + MISSING + r"\['name', 'config'\]"),
    ],
    ids=["no_method", "no_label_no_method", "no_config", "no_name", "no_name_no_config"],
)
def test_missing_required_keys_are_a_rapidun_error(tmp_path, text, match):
    p = write_study(tmp_path, text)
    with pytest.raises(RapidunError, match=match) as ei:
        load_study(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (SCEN + "methods: uniform\n", r"'methods' must be a list, got str"),
        ("scenarios: {name: a, config: run.yaml}\nmethods: [uniform]\n", r"'scenarios' must be a list, got dict"),
    ],
    ids=["methods", "scenarios"],
)
def test_methods_or_scenarios_not_a_list_is_a_clear_error(tmp_path, text, match):
    p = write_study(tmp_path, text)
    with pytest.raises(RapidunError, match=match) as ei:
        load_study(p)
    assert str(p) in str(ei.value)


def test_unknown_method_error_names_the_file_and_entry(tmp_path):
    p = write_study(tmp_path, SCEN + "methods: [uniform, bogus]\n")
    with pytest.raises(RapidunError, match=r"methods\[1\] \(bogus\): unknown unlearning method 'bogus'") as ei:
        load_study(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("ov", ["scenario.seed=7", "sft.lr=1.0", "data.limit=5"])
def test_method_overrides_outside_the_unlearning_are_refused(tmp_path, ov):
    p = write_study(tmp_path, SCEN + f"methods:\n  - uniform\n  - {{label: u2, method: uniform, overrides: [{ov}]}}\n")
    only = ", ".join(METHOD_SECTIONS)  # unlearn, weighting, influence
    match = rf"methods\[1\] \(u2\): override\(s\) \['{re.escape(ov)}'\].*may override only {only}"
    with pytest.raises(RapidunError, match=match) as ei:
        load_study(p)
    assert str(p) in str(ei.value)


def test_method_overrides_of_the_unlearning_sections_are_accepted(tmp_path):
    ovs = "[unlearn.lr=3e-4, weighting.tau_forget=2.0, influence.seed=9]"
    p = write_study(tmp_path, SCEN + f"methods:\n  - uniform\n  - {{label: u2, method: uniform, overrides: {ovs}}}\n")
    spec = load_study(p)
    got = with_overrides(scenario_config(spec, spec.scenarios[0]), spec.methods[1].overrides)
    assert (got.unlearn.lr, got.weighting.tau_forget, got.influence.seed) == (3e-4, 2.0, 9)


def test_only_names_an_unknown_scenario_before_any_work(tmp_path):
    p = write_study(tmp_path, SCEN + "methods: [uniform]\n")
    out = tmp_path / "out"
    with pytest.raises(RapidunError, match=r"--only \['b'\].*its scenarios: \['a'\]"):
        run_study(p, out, only=["b"])
    assert not out.exists()


# ---------------------------------------------------------------- tests_by_split, select, decision
