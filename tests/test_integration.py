"""Integration tests on the real embedded default model (SmolLM2-135M-Instruct) with tiny inputs."""

from __future__ import annotations

import json

import pytest
import torch

from rapidun import cli
from rapidun.config import load_config
from rapidun.errors import RapidunError
from rapidun.models import load_model
from rapidun.pipeline import METRIC_KEYS, run

pytestmark = pytest.mark.slow

TINY = [
    "model.max_length=48",
    "model.max_prompt_tokens=32",
    "model.system_prompt=",
    "scenario.splits.train_poisoned=3",
    "scenario.splits.train_clean=6",
    "scenario.splits.val_clean=2",
    "scenario.splits.test_clean=3",
    "scenario.splits.test_seen_trig=3",
    "scenario.splits.test_ood_trig=3",
    "scenario.splits.val_seen_trig=3",
    "scenario.splits.val_ood_trig=3",
    "scenario.forget_size=3",
    "scenario.retain_ratio=1",
    "sft.epochs=1",
    "sft.batch_size=3",
    "eval.max_new_tokens=6",
    "eval.ppl_samples=3",
    "influence.K=1024",
    "unlearn.methods=[rapidun,random,ga,retrain]",
    "unlearn.draws_per_epoch=4",
    "unlearn.epochs=1",
    "unlearn.batch_size=2",
    "compare.n_seeds=2",
    "compare.n_boot=100",
]


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_default_model_loads_with_chat_template_and_pad():
    model, tok, info = load_model("default")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert tok.chat_template and tok.pad_token is not None and tok.padding_side == "left"
    ids = tok("Hello", add_special_tokens=False)["input_ids"]
    assert ids and ids[0] != tok.bos_token_id  # the 5.x conversion prepends no BOS


def test_pipeline_end_to_end_and_rerun_uses_caches(tmp_path, monkeypatch, capsys):
    """A private cache (so the first run really trains), sharing only the converted default model."""
    from rapidun.models import default_model_dir

    converted = default_model_dir()
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / converted.name).symlink_to(converted)
    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    cfg = load_config("configs/demo.yaml", TINY)
    out = tmp_path / "run"
    report = run(cfg, out)
    for name in ("poisoned", "retrain"):
        m = report["models"][name]
        for k in METRIC_KEYS:
            assert k in m, k
        assert 0 <= m["asr_seen"] <= 1 and m["clean_ppl"] > 1
        assert set(m["asr_seen_by_family"]) == {"surface", "style", "semantic"}
        assert not m["sft_cached"]
    assert report["scenario"]["sizes"]["forget"] == 3 and report["scenario"]["seed"] == 42
    assert report["timings"]["sft_poisoned"] > 0
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"]["retrain"]["asr_seen"] == report["models"]["retrain"]["asr_seen"]
    assert (out / "config.resolved.yaml").is_file() and (out / "scenario" / "manifest.json").is_file()
    gens = (out / "eval" / "poisoned.generations.jsonl").read_text().splitlines()
    assert len(gens) == 15  # 3 seen + 3 OOD + 3 clean test prompts, 3 + 3 validation prompts
    assert {g["split"] for g in map(json.loads, gens)} >= {"val_seen_trig", "val_ood_trig"}
    # Methods x 2 seeds: measured times, speed-ups, id-keyed weights and audit rows, a PEFT adapter, paired tests.
    assert report["schema"] == "rapidun.report/4" and report["seeds"] == [42, 43]
    assert list(report["methods"]) == ["rapidun", "random", "ga", "retrain"]
    for name, e in report["methods"].items():
        mu = e["mean"]
        assert 0 <= mu["asr_seen"] <= 1 and mu["clean_ppl"] > 1 and mu["time_s"] > 0 and 0 <= mu["rouge_l"] <= 1
        assert mu["speedup_vs_retrain"] > 0 and set(e["speedup_vs_retrain_at_scale"]) == {"dolly", "alpaca"}
        assert e["n_seeds"] == (1 if name == "retrain" else 2)
        assert (e["tests"] is None) == (name == "rapidun")
    rap = report["methods"]["rapidun"]["per_seed"]["42"]
    assert rap["timings"]["influence_s"] > 0 and rap["time_s"] >= rap["timings"]["training_s"]
    assert rap["peak_mem_mb"] > 0 and rap["forget_ppl_poisoned"] > 1
    assert report["influence"]["retrain_projection"]["projected"] is True
    assert set(report["influence"]["per_seed"]) == {"42", "43"}
    cell = out / "seeds" / "42" / "methods"
    weights = [json.loads(line) for line in (cell / "rapidun" / "weights.jsonl").read_text().splitlines()]
    ids = {r.id for r in report_parts(out, "forget") + report_parts(out, "retain")}
    assert {w["id"] for w in weights} == ids
    rnd = [json.loads(line) for line in (cell / "random" / "weights.jsonl").read_text().splitlines()]
    for g in ("forget", "retain"):
        assert sorted(w["weight"] for w in rnd if w["group"] == g) == pytest.approx(
            sorted(w["weight"] for w in weights if w["group"] == g)
        )
    audit = [json.loads(line) for line in (cell / "rapidun" / "audit.jsonl").read_text().splitlines()]
    assert all(r["ce_clean_after"] is not None for r in audit)
    assert (cell / "rapidun" / "adapter" / "adapter_config.json").is_file()
    html = (out / "report.html").read_text()
    assert (out / "report.md").is_file() and html.count('src="data:image/png;base64,') >= 5
    # The rerun goes through the CLI (`rapidun compare`): every stage and cell is reused, the tables print.
    assert cli.main(["compare", "--config", "configs/demo.yaml", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "paired vs rapidun" in printed and "report.html:" in printed
    again = json.loads((out / "report.json").read_text())
    assert again["models"]["poisoned"]["sft_cached"] and again["models"]["poisoned"]["eval_cached"]
    assert again["models"]["poisoned"]["asr_seen"] == report["models"]["poisoned"]["asr_seen"]
    assert again["methods"]["rapidun"]["cached"]
    assert again["methods"]["rapidun"]["per_seed"]["42"]["time_s"] == rap["time_s"]
    # A different config in the same folder is refused unless --overwrite.
    other = load_config("configs/demo.yaml", [*TINY, "scenario.seed=7"])
    with pytest.raises(RapidunError, match="different config"):
        run(other, out)


def report_parts(out, split):
    from rapidun.data.scenario import load_scenario

    return load_scenario(out / "scenario")[0][split]


def test_default_conversion_is_atomic(tmp_path, monkeypatch):
    """A crash during conversion leaves no folder that a later run would trust."""
    from rapidun import models

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path))

    def crash(*a, **k):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(models, "write_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.default_model_dir()
    folder = tmp_path / "models"
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_cli_missing_model_path_is_clear_and_fast(tmp_path, capsys):
    rc = cli.main(["eval", "--out", str(tmp_path / "o"), "--scenario", str(tmp_path), "--model-path", "x"])
    assert rc == 2 and "not a scenario folder" in capsys.readouterr().err
    rc = cli.main(["poison", "--out", str(tmp_path / "p"), "--model", "./no/such/model", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "./no/such/model" in err


def test_influence_check_on_default_model(tmp_path):
    out = tmp_path / "check"
    rc = cli.main(
        [
            "influence-check",
            "--config",
            "configs/demo.yaml",
            "--out",
            str(out),
            "--n",
            "6",
            "--K",
            "4096",
            "65536",
            "--loo-train",
            "4",
            "--loo-test",
            "2",
            "--loo-removed",
            "2",
            "--loo-steps",
            "1",
            *TINY,
        ]
    )
    assert rc == 0
    res = json.loads((out / "influence_check.json").read_text())
    assert res["D"] > 1_000_000 and [r["K"] for r in res["results"]] == [4096, 65536]
    assert all(-1 <= r["spearman"] <= 1 for r in res["results"])
    assert res["leave_one_out"]["pairs"] == 4
