"""The Python API (rapidun.api) and ``rapidun finetune``, on the tiny saved model of ``test_user_path``.

The API runs the commands' own code: its results equal the command line's on the same inputs and seed, records in
memory give the same runs as files, a bad record is refused naming it before anything is written, and the examples
of docs/api.md run as written (with the model ``"default"`` swapped for the tiny one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rapidun
from helpers import make_model, make_tokenizer
from rapidun import cli
from rapidun.data.records import Record
from rapidun.errors import RapidunError
from test_unlearn_e2e import OVERRIDES, folder_digest, make_parts, read_jsonl
from test_user_path import write_alpaca, write_probes

ALPACA = [*OVERRIDES, "data.format=alpaca"]
SFT = ["model.device=cpu", "model.dtype=float32", "model.max_length=32", "model.max_prompt_tokens=20",
       "sft.epochs=4", "sft.batch_size=4", "sft.lr=1e-2", "sft.lora_r=4", "sft.lora_targets=[q_proj,v_proj]",
       "sft.autocast=off", "sft.warmup_ratio=0"]  # fmt: skip
DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny 'poisoned' model folder, the packs as alpaca files, and probes; RAPIDUN_CACHE in tmp."""
    root = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        tok = make_tokenizer()
        model_dir = root / "poisoned"
        make_model(len(tok), init_range=0.2).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        parts = make_parts()
        probes = [{"prompt": "the cat sat", "group": "triggered"}, {"prompt": "one two", "group": "triggered"},
                  {"prompt": "alpha beta", "group": "clean", "id": "c1"}]  # fmt: skip
        yield SimpleNamespace(
            root=root,
            model_dir=str(model_dir),
            parts=parts,
            forget=str(write_alpaca(root / "forget.jsonl", parts["forget"])),
            retain=str(write_alpaca(root / "retain.jsonl", parts["retain"])),
            probes=probes,
            probe_file=str(write_probes(root / "probes.jsonl", probes)),
            digest=folder_digest(model_dir),
        )


@pytest.fixture(scope="module")
def pair(user):
    """The same uniform run through the command line and through ``rapidun.unlearn`` (paths)."""
    a, b = user.root / "cli_run", user.root / "api_run"
    argv = ["unlearn", "--method", "uniform", "--model-path", user.model_dir, "--forget", user.forget]
    assert cli.main([*argv, "--retain", user.retain, "--out", str(a), *ALPACA]) == 0
    res = rapidun.unlearn(user.model_dir, user.forget, user.retain, method="uniform", out=b, overrides=ALPACA)
    return a, b, res


def alpaca_dicts(recs: list[Record]) -> list[dict]:
    rows = []
    for r in recs:
        row = {"id": r.id, "instruction": r.instruction, "input": r.context, "output": r.response}
        if r.meta.get("response_clean"):
            row["replacement"] = r.meta["response_clean"]
        rows.append(row)
    return rows


def same_model(m1, m2) -> None:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-6), k


# ---------------------------------------------------------------- the package


def test_import_rapidun_is_cheap_and_the_api_names_survive_submodule_imports():
    code = (
        "import sys, rapidun; assert 'torch' not in sys.modules, 'torch imported'; "
        "import rapidun.unlearn, rapidun.verify.command, rapidun.trace.command, rapidun.finetune, rapidun.api; "
        "assert all(getattr(rapidun, n) is getattr(rapidun.api, n) for n in "
        "('unlearn', 'evaluate', 'verify', 'trace', 'finetune', 'UnlearnResult')); "
        "from rapidun.unlearn import unlearn; assert unlearn.__module__ == 'rapidun.unlearn'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        rapidun.nope  # noqa: B018


# ---------------------------------------------------------------- unlearn


def test_unlearn_from_paths_equals_the_command_line(pair, user):
    a, b, res = pair
    assert isinstance(res, rapidun.UnlearnResult) and res.out == b
    for name in ("adapter_model.safetensors",):
        wa, wb = load_file(a / "adapter" / name), load_file(b / "adapter" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert ra["audit_means"] == rb["audit_means"] == res.result["audit_means"]
    assert ra["train"]["loss_curve"] == rb["train"]["loss_curve"]
    assert read_jsonl(a / "weights.jsonl") == read_jsonl(b / "weights.jsonl")
    assert json.loads((a / "packs.json").read_text()) == json.loads((b / "packs.json").read_text()) == res.packs
    assert json.loads((b / "run.json").read_text())["complete"] is True
    # the same run identity: the command line resumes the API's output folder and vice versa
    assert (
        json.loads((a / "run.json").read_text())["config_hash"]
        == json.loads((b / "run.json").read_text())["config_hash"]
    )
    assert res.summary.splitlines()[0].startswith("uniform: ") and "packs: 6 forget" in res.summary
    assert res.warnings == res.result["warnings"]
    assert folder_digest(user.model_dir) == user.digest


def test_unlearn_from_records_and_dicts_gives_the_same_run(pair, user):
    _, _, res = pair
    from_recs = rapidun.unlearn(user.model_dir, user.parts["forget"], user.parts["retain"], overrides=ALPACA)
    from_dicts = rapidun.unlearn(
        user.model_dir, alpaca_dicts(user.parts["forget"]), alpaca_dicts(user.parts["retain"]), overrides=ALPACA
    )
    for r in (from_recs, from_dicts):
        assert r.out is None  # out=None: a temporary folder, gone
        assert r.result["audit_means"] == res.result["audit_means"]
        assert r.result["weight_vectors"] == res.result["weight_vectors"]
        assert r.packs["n_forget"] == 6 and r.packs["forget_with_replacement"] == 4
        same_model(r.model, res.model)


def test_unlearn_measures_a_given_heldout_clean_set(user):
    """``heldout_clean=``: the held-out check runs on those records (as ``--heldout-clean``); a forget record among
    them is refused by name."""
    val = user.parts["val_clean"]
    r = rapidun.unlearn(user.model_dir, user.forget, user.retain, heldout_clean=val, overrides=ALPACA)
    assert r.result["heldout"]["ids"] == [x.id for x in val] and r.packs["n_heldout"] == len(val)
    with pytest.raises(RapidunError, match=r"heldout_clean.*also forget or retain-buffer records.*'f0'"):
        rapidun.unlearn(user.model_dir, user.forget, user.retain, heldout_clean=[*val, user.parts["forget"][0]],
                        overrides=ALPACA)  # fmt: skip


def test_unlearn_an_in_memory_model(pair, user):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, res = pair
    model = AutoModelForCausalLM.from_pretrained(user.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(user.model_dir)
    with pytest.raises(RapidunError, match="pass its tokenizer"):
        rapidun.unlearn(model, user.forget, user.retain, overrides=ALPACA)
    r = rapidun.unlearn(model, user.forget, user.retain, tokenizer=tok, overrides=ALPACA)
    assert r.result["audit_means"] == res.result["audit_means"]
    same_model(r.model, res.model)


def test_a_bad_record_is_refused_by_name_and_nothing_is_written(user, tmp_path):
    out = tmp_path / "o"
    bad = alpaca_dicts(user.parts["forget"])
    del bad[2]["output"]
    with pytest.raises(RapidunError, match=r"forget\[2\]: missing required field 'output' \(response\)"):
        rapidun.unlearn(user.model_dir, bad, user.retain, out=out, overrides=ALPACA)
    empty = [*user.parts["retain"][:2], Record(id="x", instruction="a", response=" ")]
    with pytest.raises(RapidunError, match=r"retain\[2\]: field 'response' \(response\) is empty"):
        rapidun.unlearn(user.model_dir, user.forget, empty, out=out, overrides=ALPACA)
    twice = [user.parts["retain"][0], user.parts["retain"][0]]
    with pytest.raises(RapidunError, match=r"retain\[1\]: duplicate id 'r0' \(first seen at retain\[0\]\)"):
        rapidun.unlearn(user.model_dir, user.forget, twice, out=out, overrides=ALPACA)
    with pytest.raises(RapidunError, match="does not exist"):
        rapidun.unlearn(user.model_dir, tmp_path / "nope.jsonl", user.retain, out=out, overrides=ALPACA)
    with pytest.raises(RapidunError, match="unknown unlearning method"):
        rapidun.unlearn(user.model_dir, user.forget, user.retain, method="nope", out=out, overrides=ALPACA)
    with pytest.raises(RapidunError, match="is the input --model-path"):
        rapidun.unlearn(user.model_dir, user.forget, user.retain, out=user.model_dir, overrides=ALPACA)
    assert not out.exists() and folder_digest(user.model_dir) == user.digest


# ---------------------------------------------------------------- evaluate, verify, trace


def test_evaluate_equals_eval_probes(pair, user, tmp_path):
    a, _, _ = pair
    files = ["--forget", user.forget, "--retain", user.retain]
    argv = ["eval", "--model-path", user.model_dir, "--adapter", str(a / "adapter"), "--probes", user.probe_file]
    assert cli.main([*argv, "--out", str(tmp_path / "ev"), "--regex", "park", *files, *ALPACA]) == 0
    want = json.loads((tmp_path / "ev" / "probes_adapter.json").read_text())
    got = rapidun.evaluate(user.model_dir, user.probes, adapter=a / "adapter", regex="park",
                           forget=user.forget, retain=user.parts["retain"], overrides=ALPACA)  # fmt: skip
    rows = got.pop("rows")
    assert [r["id"] for r in rows] == ["p1", "p2", "c1"]
    assert rows == read_jsonl(tmp_path / "ev" / "probes_adapter.jsonl")
    for k in ("groups", "forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl", "hit_rule", "n_forget"):
        assert got[k] == want[k], k
    with pytest.raises(RapidunError, match=r"^probes\[0\]: no group"):
        rapidun.evaluate(user.model_dir, [{"prompt": "a"}], regex="x", overrides=ALPACA)


def test_trace_returns_the_ranking(user, tmp_path):
    corpus = [*user.parts["retain"], *user.parts["forget"]]
    probes = [{"prompt": "the cat sat", "output": "in the park"}, {"prompt": "the dog ran", "output": "to the mat"}]
    ov = [*OVERRIDES, "influence.batch_size=4", "trace.top_k=3"]
    doc = rapidun.trace(user.model_dir, corpus, probes, to_forget=2, out=tmp_path / "t", overrides=ov)
    assert sorted(r["id"] for r in doc["ranked"]) == sorted(r.id for r in corpus)
    assert doc == {**json.loads((tmp_path / "t" / "trace.json").read_text()), "ranked": doc["ranked"]}
    assert doc["forget"]["n"] == 2 and (tmp_path / "t" / "forget.jsonl").is_file()


def test_verify_on_forget_records_and_probes(pair, user, tmp_path):
    a, _, _ = pair
    ov = [*ALPACA, "verify.relearn_k=2", "verify.relearn_steps=2", "verify.relearn_lora_r=2", "eval.max_new_tokens=3",
          "verify.quant_group_size=16", "verify.quant_bits=[8]"]  # fmt: skip
    doc = rapidun.verify(user.model_dir, user.forget, user.probes, adapter=a / "adapter", keywords=["park"],
                         poisoned=user.model_dir, name="mine", out=tmp_path / "v", overrides=ov)  # fmt: skip
    assert doc == json.loads((tmp_path / "v" / "verification.json").read_text())
    assert doc["target"] == "probes" and set(doc["summary"]) == {"poisoned", "mine"}


# ---------------------------------------------------------------- finetune


def answer_ce(model_dir: str | Path, recs: list[Record]) -> float:
    from rapidun.config import load_config
    from rapidun.data.template import encode_records
    from rapidun.models import load_model

    cfg = load_config(None, SFT)
    model, tok, _ = load_model(str(model_dir), "cpu", "float32")
    with torch.no_grad():
        ces = [float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
               for e in encode_records(tok, recs, cfg.model)[0]]  # fmt: skip
    return sum(ces) / len(ces)


def test_finetune_writes_a_model_whose_loss_on_the_records_went_down(user, tmp_path):
    recs = user.parts["retain"]
    out = rapidun.finetune(user.model_dir, recs, out=tmp_path / "ft", overrides=SFT)
    assert out == tmp_path / "ft" and (out / "config.json").is_file() and (out / "rapidun_sft.json").is_file()
    before, after = answer_ce(user.model_dir, recs), answer_ce(out, recs)
    assert after < before - 0.1, (before, after)
    meta = json.loads((out / "rapidun_sft.json").read_text())
    assert meta["n_records"] == len(recs) and meta["train"]["steps"] == 4 * 2
    # refused before any work: an existing out, the model's own folder, a folder that is no fine-tune
    with pytest.raises(RapidunError, match="already exists"):
        rapidun.finetune(user.model_dir, recs, out=out, overrides=SFT)
    with pytest.raises(RapidunError, match="is the input --model-path"):
        rapidun.finetune(user.model_dir, recs, out=user.model_dir, overrides=SFT, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RapidunError, match="holds no rapidun fine-tune"):
        rapidun.finetune(user.model_dir, recs, out=tmp_path / "mine", overrides=SFT, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    with pytest.raises(RapidunError, match=r"records\[1\]: field 'response' \(response\) is empty"):
        rapidun.finetune(user.model_dir, [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": ""}],
                         out=tmp_path / "never", overrides=SFT)  # fmt: skip
    assert not (tmp_path / "never").exists()
    # overwrite replaces an earlier fine-tune (here with dicts in the configured format)
    again = rapidun.finetune(user.model_dir, alpaca_dicts(recs), out=out, overrides=[*SFT, "data.format=alpaca"],
                             overwrite=True)  # fmt: skip
    assert answer_ce(again, recs) == pytest.approx(after, abs=1e-5)  # the same records and seed
    assert folder_digest(user.model_dir) == user.digest


def test_finetune_command(user, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--model-path", user.model_dir, "--records", user.retain, "--out", str(out)]
    assert cli.main([*argv, *SFT, "data.format=alpaca"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"on 5 records: 8 steps .*training loss [\d.]+ -> [\d.]+", printed) and "written to" in printed
    assert answer_ce(out, user.parts["retain"]) < answer_ce(user.model_dir, user.parts["retain"])
    assert cli.main([*argv, *SFT, "data.format=alpaca"]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    argv2 = ["finetune", "--model-path", user.model_dir, "--records", str(bad), "--out", str(tmp_path / "x")]
    assert cli.main([*argv2, *SFT, "data.format=alpaca"]) == 2
    assert "bad.jsonl:2: missing required field 'output'" in capsys.readouterr().err
    assert cli.main([*argv2[:-1], user.model_dir, *SFT]) == 2
    assert "is the input --model-path" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and folder_digest(user.model_dir) == user.digest
    helptext = cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "--records RECORDS" in helptext and "never modified" in helptext


# ---------------------------------------------------------------- docs/api.md


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_api_examples_run_as_written(user, tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, in order, in one namespace, in a folder holding the example files.

    The one substitution: the first block's ``model = "default"`` (the embedded model) becomes the tiny model.
    """
    blocks = python_blocks(DOCS.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    assert blocks[0].count('model = "default"') == 1
    blocks[0] = blocks[0].replace('model = "default"', f"model = {user.model_dir!r}")
    monkeypatch.chdir(tmp_path)
    for name, recs in (("forget", user.parts["forget"]), ("retain", user.parts["retain"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs))  # dolly
    write_probes(tmp_path / "probes.jsonl", user.probes)
    ns: dict = {}
    for k, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {k}", "exec"), ns)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"docs/api.md python block {k} failed: {e!r}\n{block}") from e
    assert folder_digest(user.model_dir) == user.digest
