"""``rapidun compare`` on a user's own case (files and probes, seeds, paired tests, resume, a retrain reference,
``--heldout-clean``), on the tiny saved model of ``test_user_path``."""

from __future__ import annotations

import json

import pytest

from rapidun import cli
from test_unlearn_e2e import OVERRIDES
from test_user_path import user as _user
from test_user_path import write_alpaca, write_probes

user = _user  # the tiny saved model and packs (a module-scoped fixture: built once for this module too)

# ---------------------------------------------------------------- compare on the user's case


def test_cli_compare_on_files_probes_seeds_tests_and_resume(user, capsys, tmp_path):
    probes = write_probes(
        tmp_path / "probes.jsonl",
        [{"prompt": p, "group": "triggered"} for p in ("the cat sat", "one two", "tell me a story")]
        + [{"prompt": p, "group": "clean"} for p in ("alpha beta", "three four")],
    )
    out = tmp_path / "cmp"
    args = ["compare", "--model-path", user.model_dir, "--forget", user.forget, "--retain", user.retain]
    args += ["--probes", str(probes), "--keywords", "park", "mat", "--retrain-model", user.model_dir, "--out", str(out)]
    extra = ["data.format=alpaca", "unlearn.methods=[uniform,rapidun_aligned]", "compare.n_seeds=2",
             "compare.reference=uniform", "compare.n_boot=200"]  # fmt: skip
    assert cli.main([*args, *OVERRIDES, *extra]) == 0
    printed = capsys.readouterr().out
    assert "hit rate triggered" in printed and "rapidun_aligned" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "rapidun.user_report/1" and rep["n_seeds"] == 2 and rep["reference"] == "uniform"
    assert set(rep["methods"]) == {"uniform", "rapidun_aligned"} and rep["retrain"] == "given"
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "hit rate triggered" in html
    for name in ("uniform", "rapidun_aligned"):  # every method's mean triggered hit rate, as in report.md
        assert f'<td class="r">{rep["methods"][name]["hit_rate"]["triggered"]["mean"]:.3f}' in html
    assert rep["models"]["retrain"]["groups"] == rep["models"]["start"]["groups"]  # the same model, twice
    for m in rep["methods"].values():
        assert m["n_seeds"] == 2 and set(m["hit_rate"]) == {"triggered", "clean"}
        assert m["forget_ppl_poisoned"]["mean"] > 0 and m["retain_ppl"]["mean"] is None  # no held-out records
    t = rep["tests"]["rapidun_aligned"]
    assert t["vs"] == "uniform" and t["triggered"]["bootstrap"]["n_prompts"] == 3
    assert t["triggered"]["bootstrap"]["n_seeds"] == 2 and 0 <= t["clean"]["mcnemar"]["p"] <= 1
    # the paired difference is the mean hit-rate difference over seeds
    diff = (
        rep["methods"]["rapidun_aligned"]["hit_rate"]["triggered"]["mean"]
        - rep["methods"]["uniform"]["hit_rate"]["triggered"]["mean"]
    )
    assert t["triggered"]["bootstrap"]["diff"] == pytest.approx(diff)
    seed_dirs = sorted(p.name for p in (out / "seeds").iterdir())
    assert seed_dirs == ["4", "5"] and (out / "seeds" / "5" / "methods" / "uniform" / "receipt.json").is_file()
    # resume: delete one cell's metrics; only that cell is recomputed
    (out / "seeds" / "5" / "methods" / "uniform" / "metrics.json").unlink()
    assert cli.main([*args, *OVERRIDES, *extra]) == 0
    capsys.readouterr()
    again = json.loads((out / "report.json").read_text())
    cached = {(n, s): c["cached"] for n, m in again["methods"].items() for s, c in m["per_seed"].items()}
    assert cached == {
        ("uniform", "4"): True,
        ("uniform", "5"): False,
        ("rapidun_aligned", "4"): True,
        ("rapidun_aligned", "5"): True,
    }  # fmt: skip  (OVERRIDES: unlearn.seed=4)
    assert again["methods"]["uniform"]["hit_rate"] == rep["methods"]["uniform"]["hit_rate"]
    # dropping a method from unlearn.methods reuses the other method's cells (the list is not part of a cell's key)
    fewer = [e if not e.startswith("unlearn.methods=") else "unlearn.methods=[uniform]" for e in extra]
    assert cli.main([*args, *OVERRIDES, *fewer]) == 0
    capsys.readouterr()
    only = json.loads((out / "report.json").read_text())
    assert set(only["methods"]) == {"uniform"}
    assert all(c["cached"] for c in only["methods"]["uniform"]["per_seed"].values())
    # a missing input is named
    assert cli.main(["compare", "--model-path", user.model_dir, "--forget", user.forget, "--out", str(out)]) == 2
    assert "--retain, --probes" in capsys.readouterr().err


def test_cli_compare_trains_a_retrain_reference_from_retrain_data(user, capsys, tmp_path):
    probes = write_probes(
        tmp_path / "probes.jsonl",
        [{"prompt": "the cat sat", "group": "triggered"}, {"prompt": "alpha beta", "group": "clean"}],
    )
    clean = [*user.parts["retain"], user.parts["forget"][0]]  # one forget record slipped in: it is dropped
    data = write_alpaca(tmp_path / "clean.jsonl", clean)
    out = tmp_path / "cmp"
    args = ["compare", "--model-path", user.model_dir, "--forget", user.forget, "--retain", user.retain,
            "--probes", str(probes), "--keywords", "park", "--retrain-data", str(data), "--out", str(out)]  # fmt: skip
    extra = ["data.format=alpaca", "unlearn.methods=[uniform]", "compare.n_seeds=1", "compare.reference=uniform",
             "compare.n_boot=20", "sft.epochs=1", "sft.batch_size=4", "sft.lora_r=2",
             "sft.lora_targets=[q_proj,v_proj]", "sft.autocast=off"]  # fmt: skip
    assert cli.main([*args, *OVERRIDES, *extra]) == 2  # no base to train from
    assert "--retrain-base" in capsys.readouterr().err and not out.exists()
    both = [*args, "--retrain-model", user.model_dir]
    assert cli.main([*both, *OVERRIDES, *extra]) == 2
    # refused before any training or writing: a reference outside the methods, an unreadable --retrain-data
    based = [*args, "--retrain-base", user.model_dir, *OVERRIDES, *extra]
    assert cli.main([*based, "compare.reference=npo"]) == 2
    assert "compare.reference=npo" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    assert cli.main([*[a if a != str(data) else str(bad) for a in args], "--retrain-base", user.model_dir,
                     *OVERRIDES, *extra]) == 2  # fmt: skip
    assert "bad.jsonl:2" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args, "--retrain-base", user.model_dir, *OVERRIDES, *extra]) == 0
    capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    n = len(user.parts["retain"])
    assert rep["retrain"].startswith(f"trained here from --retrain-data on {user.model_dir}: {n} records (1 forget")
    meta = json.loads((out / "retrain_training.json").read_text())
    assert meta["n_records"] == n and meta["tag"] == "retrain-user"
    assert "retrain" in rep["models"] and set(rep["models"]["retrain"]["groups"]) == {"triggered", "clean"}


def test_cli_compare_measures_a_given_heldout_clean_file(user, capsys, tmp_path):
    """``compare --heldout-clean``: every run's budget and the report's held-out PPL are measured on the file's
    records (without it this retain file is taken as-is and nothing is held out); a file holding a forget record
    is refused before ``--out`` is claimed."""
    probes = write_probes(tmp_path / "probes.jsonl", [{"prompt": "the cat sat", "group": "triggered"}])
    held = write_alpaca(tmp_path / "held.jsonl", user.parts["val_clean"])
    out = tmp_path / "cmp"
    args = ["compare", "--model-path", user.model_dir, "--forget", user.forget, "--retain", user.retain,
            "--probes", str(probes), "--keywords", "park", "--out", str(out)]  # fmt: skip
    extra = ["data.format=alpaca", "unlearn.methods=[uniform]", "compare.n_seeds=1", "compare.reference=uniform",
             "compare.n_boot=20"]  # fmt: skip
    bad = write_alpaca(tmp_path / "bad.jsonl", [*user.parts["val_clean"], user.parts["forget"][1]])
    assert cli.main([*args, "--heldout-clean", str(bad), *OVERRIDES, *extra]) == 2
    assert "bad.jsonl: 1 held-out record(s)" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args, "--heldout-clean", str(held), *OVERRIDES, *extra]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    n = len(user.parts["val_clean"])
    assert rep["packs"]["heldout_path"] == str(held) and rep["packs"]["n_heldout"] == n
    assert f"held-out clean: {n} of {held}" in printed and "held-out PPL" in printed
    assert rep["models"]["start"]["retain_ppl"] > 0 and rep["methods"]["uniform"]["retain_ppl"]["mean"] > 0
    res = json.loads((out / "seeds" / "4" / "methods" / "uniform" / "result.json").read_text())
    assert res["heldout"]["ids"] == [r.id for r in user.parts["val_clean"]]
    assert json.loads((out / "run.json").read_text())["inputs"]["heldout_clean"]["path"] == str(held.resolve())
