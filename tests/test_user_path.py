"""Unlearning from a user's own files: packs from FORGET/RETAIN, --adapter starts, receipts, the no-effect warning.

On the tiny saved model of ``test_unlearn_e2e`` (its overrides and packs), so a run takes seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_model, make_records, make_tokenizer
from rapidun import cli
from rapidun.config import ScenarioConfig, load_config
from rapidun.data.packs import build_packs, load_packs, with_heldout
from rapidun.data.records import Record, load_records
from rapidun.data.scenario import save_scenario
from rapidun.errors import RapidunError
from rapidun.models import with_adapter
from rapidun.receipt import record_hash
from rapidun.unlearn_warnings import MIN_FORGET_CHANGE, forget_change_warning
from test_unlearn_e2e import OVERRIDES, folder_digest, make_parts, read_jsonl


def write_alpaca(path: Path, recs: list[Record]) -> Path:
    """Records as an alpaca JSONL file (instruction, input, output, id; replacement when the record has one)."""
    rows = []
    for r in recs:
        row = {"id": r.id, "instruction": r.instruction, "input": r.context, "output": r.response}
        if r.meta.get("response_clean"):
            row["replacement"] = r.meta["response_clean"]
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


# ---------------------------------------------------------------- packs and records (no model)


def pool(n: int, prefix: str, start: int = 100) -> list[Record]:
    """``n`` records whose texts differ from ``make_records``' (numbers from ``start``)."""
    return [Record(id=f"{prefix}{i}", instruction=f"instruction number {start + i}", response="r") for i in range(n)]


def test_replacement_answer_is_read_from_its_column_or_the_scenario_name(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(
        json.dumps({"instruction": "a", "output": "bad", "replacement": " good "})
        + "\n"
        + json.dumps({"instruction": "b", "output": "bad2"})
        + "\n"
        + json.dumps({"instruction": "c", "output": "bad3", "response_clean": "fine"})
        + "\n"
    )
    recs = load_records(str(p), "alpaca")
    assert [r.meta.get("response_clean") for r in recs] == ["good", None, "fine"]
    q = tmp_path / "g.jsonl"
    q.write_text(json.dumps({"prompt": "a", "completion": "bad", "fix": "ok"}) + "\n")
    fields = {"instruction": "prompt", "response": "completion", "replacement": "fix"}
    assert load_records(str(q), "generic", fields)[0].meta == {"response_clean": "ok"}


def test_build_packs_takes_a_small_retain_file_as_is():
    forget, retain = make_records(2, "f"), pool(6, "r")
    f, r, left, info = build_packs(forget, retain, 3.0, seed=0)
    assert [x.id for x in f] == ["f0", "f1"] and [x.id for x in r] == [x.id for x in retain] and left == []
    assert info["retain_drawn"] is False and info["n_retain"] == 6 and info["retain_target"] == 6


def test_build_packs_draws_a_seeded_buffer_without_forget_records_from_a_large_file():
    forget = make_records(3, "f")
    corpus = pool(40, "r") + forget  # the whole training file holds the forget records too
    _f, r, left, info = build_packs(forget, corpus, 2.0, seed=7)
    assert len(r) == 6 and info["retain_drawn"] is True
    assert not {x.id for x in r} & {x.id for x in forget} and not {x.id for x in left} & {x.id for x in forget}
    assert sorted(info["retain_overlap_left_out"]) == ["f0", "f1", "f2"]
    assert len(r) + len(left) == 40 and not {x.id for x in r} & {x.id for x in left}
    order = [x.id for x in corpus]
    assert [x.id for x in r] == sorted((x.id for x in r), key=order.index)  # file order kept
    assert [x.id for x in build_packs(forget, corpus, 2.0, seed=7)[1]] == [x.id for x in r]  # seeded
    assert [x.id for x in build_packs(forget, corpus, 2.0, seed=8)[1]] != [x.id for x in r]


def test_build_packs_refuses_overlap_in_a_buffer_given_as_is_by_id_and_by_content():
    forget = make_records(2, "f")
    same_id = Record(id="f0", instruction="other", response="other")
    same_text = Record(id="x9", instruction=forget[1].instruction, response=forget[1].response)
    for bad in (same_id, same_text):
        with pytest.raises(RapidunError, match=r"also forget records.*" + bad.id):
            build_packs(forget, [*pool(2, "r"), bad], 3.0, seed=0, retain_where="retain.jsonl")


def test_build_packs_refuses_empty_inputs():
    with pytest.raises(RapidunError, match="no forget records"):
        build_packs([], pool(3, "r"), 3.0, 0)
    with pytest.raises(RapidunError, match="no retain records"):
        build_packs(make_records(1, "f"), [], 3.0, 0)


def test_with_heldout_replaces_the_held_out_records_and_refuses_pack_records():
    parts = {"forget": make_records(2, "f"), "retain": pool(3, "r"), "val_clean": pool(2, "v", start=500)}
    held = pool(50, "h", start=900)
    info: dict = {}
    got = with_heldout(parts, held, "held.jsonl", info)
    assert [r.id for r in got["val_clean"]] == [r.id for r in held[:40]]  # HELDOUT_CHECK records at most
    assert got["retain"] is parts["retain"] and [r.id for r in parts["val_clean"]] == ["v0", "v1"]  # not modified
    assert info == {"heldout_path": "held.jsonl", "n_heldout": 40}
    same_id = Record(id="r1", instruction="something else", response="else")
    same_content = Record(id="new", instruction=parts["forget"][0].instruction, response=parts["forget"][0].response)
    for bad, shown in ((same_id, "'r1'"), (same_content, "'new'")):
        with pytest.raises(RapidunError, match=rf"held\.jsonl: 1 held-out record.*{shown}"):
            with_heldout(parts, [*held[:3], bad], "held.jsonl")
    with pytest.raises(RapidunError, match=r"held\.jsonl: no held-out clean records"):
        with_heldout(parts, [], "held.jsonl")


def test_load_packs_reports_where(tmp_path):
    write_alpaca(tmp_path / "f.jsonl", make_records(2, "f"))
    (tmp_path / "r.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    with pytest.raises(RapidunError, match=r"r\.jsonl:2: malformed JSON"):
        load_packs(str(tmp_path / "f.jsonl"), str(tmp_path / "r.jsonl"), "alpaca", {}, 3.0, 0)


def test_forget_change_warning_threshold_and_message():
    moved = {"forget_ce_poisoned_before": 1.0, "forget_ce_poisoned_after": 1.0 + 2 * MIN_FORGET_CHANGE}
    still = {"forget_ce_poisoned_before": 0.669, "forget_ce_poisoned_after": 0.670}
    assert forget_change_warning(moved, 6e-5, True, "loop") is None
    w = forget_change_warning(still, 6e-5, True, "loop")
    assert w is not None and "unlearn.lr (now 6e-05" in w and "0.669 -> 0.670" in w
    assert forget_change_warning(still, 6e-5, False, "loop") is None  # a stopped run has its own error


# ---------------------------------------------------------------- the CLI on the tiny model


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny 'poisoned' model folder, the packs as alpaca files, and a scenario folder of the same packs."""
    root = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        tok = make_tokenizer()
        model = make_model(len(tok), init_range=0.2)
        model_dir = root / "poisoned"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        parts = make_parts()
        save_scenario(parts, root / "scenario", ScenarioConfig(), {"source": "test"})
        yield SimpleNamespace(
            root=root,
            model_dir=str(model_dir),
            parts=parts,
            forget=str(write_alpaca(root / "forget.jsonl", parts["forget"])),
            retain=str(write_alpaca(root / "retain.jsonl", parts["retain"])),
            scenario=str(root / "scenario"),
            digest=folder_digest(model_dir),
        )


def unlearn_cli(*args: str, extra: tuple[str, ...] = ()) -> int:
    """``rapidun unlearn ARGS`` with the tiny overrides, then ``extra`` overrides (which win)."""
    return cli.main(["unlearn", *args, *OVERRIDES, "data.format=alpaca", *extra])


def test_files_give_the_scenario_paths_weights_and_losses(user, capsys):
    a, b = user.root / "from_files", user.root / "from_scenario"
    f_args = ["--forget", user.forget, "--retain", user.retain]
    assert unlearn_cli("--method", "rapidun", "--model-path", user.model_dir, "--out", str(a), *f_args) == 0
    out = capsys.readouterr().out
    assert (
        "packs: 6 forget (4 with a replacement answer), 5 retain as given" in out
        and "as given" in out
        and "receipt.json" in out
    )
    assert (
        unlearn_cli("--method", "rapidun", "--model-path", user.model_dir, "--out", str(b), "--scenario", user.scenario)
        == 0
    )
    wa, wb = read_jsonl(a / "weights.jsonl"), read_jsonl(b / "weights.jsonl")
    assert [w["id"] for w in wa] == [w["id"] for w in wb]
    assert torch.allclose(torch.tensor([w["weight"] for w in wa]), torch.tensor([w["weight"] for w in wb]), atol=1e-6)
    ra, rb = (json.loads((d / "result.json").read_text())["audit_means"] for d in (a, b))
    assert ra == pytest.approx(rb, abs=1e-5)
    packs = json.loads((a / "packs.json").read_text())
    assert packs["n_forget"] == len(user.parts["forget"]) and packs["retain_drawn"] is False
    assert folder_digest(user.model_dir) == user.digest


def test_receipt_names_model_records_method_and_chains_through_an_adapter(user, capsys):
    first = user.root / "r1"
    f_args = ["--forget", user.forget, "--retain", user.retain]
    assert unlearn_cli("--method", "uniform", "--model-path", user.model_dir, "--out", str(first), *f_args) == 0
    rec = json.loads((first / "receipt.json").read_text())
    assert rec["schema"] == "rapidun.receipt/1" and rec["method"] == "uniform" and rec["complete"] is True
    assert [x["id"] for x in rec["forget"]] == [r.id for r in user.parts["forget"]]
    assert rec["forget"][0]["sha256"] == record_hash(user.parts["forget"][0])
    assert rec["start_model"]["fingerprint"] and rec["previous"] == []
    assert rec["measured"]["audit_means"]["forget_ce_poisoned_before"] is not None
    assert json.loads((first / "adapter" / "receipt.json").read_text()) == rec
    # a second request on top of the first output (base + its adapter) carries the first receipt forward
    second = user.root / "r2"
    args = ["--method", "ga", "--model-path", user.model_dir, "--adapter", str(first / "adapter"), "--out", str(second)]
    assert unlearn_cli(*args, *f_args, "--merge") == 0
    capsys.readouterr()
    rec2 = json.loads((second / "receipt.json").read_text())
    assert rec2["method"] == "ga" and [p["method"] for p in rec2["previous"]] == ["uniform"]
    assert rec2["start_model"]["adapter"] == str(first / "adapter")
    assert json.loads((second / "merged" / "receipt.json").read_text()) == rec2
    # a third on the merged output of the second: the chain grows, oldest first
    third = user.root / "r3"
    assert unlearn_cli("--method", "uniform", "--model-path", str(second / "merged"), "--out", str(third), *f_args) == 0
    rec3 = json.loads((third / "receipt.json").read_text())
    assert [p["method"] for p in rec3["previous"]] == ["uniform", "ga"]
    assert folder_digest(user.model_dir) == user.digest


def test_with_adapter_merges_once_into_the_cache_with_the_peft_logits(user):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = user.root / "wa"
    files = ["--forget", user.forget, "--retain", user.retain]
    assert unlearn_cli("--method", "uniform", "--model-path", user.model_dir, "--out", str(out), *files) == 0
    path = with_adapter(user.model_dir, str(out / "adapter"))
    assert path == with_adapter(user.model_dir, str(out / "adapter"))  # cached
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(user.model_dir, dtype=torch.float32).eval()
    want = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits
    got = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert with_adapter(user.model_dir, None) == user.model_dir


def test_adapter_for_another_base_is_refused(user, tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    other = make_model(len(tok) + 7)  # another vocabulary: the embedding LoRA cannot fit
    peft = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(RapidunError, match="does not fit"):
        with_adapter(user.model_dir, str(tmp_path / "adapter"))
    with pytest.raises(RapidunError, match=r"adapter_config\.json"):
        with_adapter(user.model_dir, str(tmp_path))


def test_adapter_trained_on_a_same_shaped_other_model_is_refused(user, tmp_path):
    """Same architecture, other weights: the tensors fit, so only the recorded base can tell."""
    import shutil

    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    other_dir = tmp_path / "other"
    make_model(len(tok), init_range=0.3).save_pretrained(other_dir)  # same shapes as user.model_dir, other weights
    tok.save_pretrained(other_dir)
    peft = get_peft_model(make_model(len(tok), init_range=0.3), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(other_dir)
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(RapidunError, match=r"trained on .*other.*give --model-path"):
        with_adapter(user.model_dir, str(tmp_path / "adapter"))
    assert with_adapter(str(other_dir), str(tmp_path / "adapter"))  # its own base: accepted
    copy = tmp_path / "copy"
    shutil.copytree(other_dir, copy)  # a copy elsewhere (other path, other times): the same weights, accepted
    assert with_adapter(str(copy), str(tmp_path / "adapter"))


def test_cli_errors_on_the_user_path(user, capsys, tmp_path):
    base = ["--method", "uniform", "--model-path", user.model_dir]
    overlap = write_alpaca(tmp_path / "r.jsonl", [*user.parts["retain"], user.parts["forget"][0]])
    cases = [
        ([*base, "--out", str(tmp_path / "a"), "--forget", user.forget, "--retain", str(overlap)], "also forget"),
        ([*base, "--out", str(tmp_path / "b"), "--forget", user.forget], "--forget FILE --retain FILE"),
        (
            [
                *base,
                "--out",
                str(tmp_path / "c"),
                "--forget",
                user.forget,
                "--retain",
                user.retain,
                "--scenario",
                user.scenario,
            ],
            "not both",
        ),
        (
            [*base, "--out", str(tmp_path / "d"), "--forget", str(tmp_path / "nope.jsonl"), "--retain", user.retain],
            "does not exist",
        ),
    ]
    for args, msg in cases:
        assert unlearn_cli(*args) == 2, args
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert folder_digest(user.model_dir) == user.digest


def test_a_run_that_barely_moves_the_forget_loss_warns(user, capsys):
    out = user.root / "still"
    args = ["--method", "uniform", "--model-path", user.model_dir, "--out", str(out)]
    assert unlearn_cli(*args, "--forget", user.forget, "--retain", user.retain, extra=("unlearn.lr=1e-9",)) == 0
    err = capsys.readouterr().err
    assert "warning: the forget records' loss moved only" in err and "raise unlearn.lr (now 1e-09" in err
    assert json.loads((out / "result.json").read_text())["warnings"]


def test_scenario_config_still_loads():  # the user path reads data.format and scenario.retain_ratio
    cfg = load_config(None, ["data.format=alpaca", "scenario.retain_ratio=2"])
    assert cfg.data.format == "alpaca" and cfg.scenario.retain_ratio == 2


def write_probes(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unlearn_method_defaults_to_the_recommended_one():
    args = cli.build_parser().parse_args(["unlearn", "--out", "o", "--model-path", "m", "--forget", "f"])
    assert args.method == "uniform" and args.fn.__module__ == "rapidun.cli_unlearn"
    assert cli.build_parser().parse_args(["eval", "--out", "o", "--model-path", "m"]).fn.__module__ == (
        "rapidun.eval.command"
    )


def test_heldout_warning_threshold_and_message():
    from rapidun.unlearn_warnings import MAX_HELDOUT_PPL_RATIO, heldout_warning

    ok = {"n": 4, "ce_before": 1.0, "ce_after": 1.05, "ppl_ratio": math.exp(0.05)}
    assert math.exp(0.05) < MAX_HELDOUT_PPL_RATIO and heldout_warning(ok, 5e-4, "loop") is None
    bad = {"n": 4, "ce_before": 1.0, "ce_after": 1.5, "ppl_ratio": math.exp(0.5)}
    w = heldout_warning(bad, 5e-4, "loop")
    assert w is not None and "rose 1.65x" in w and "1.000 -> 1.500" in w and "lower unlearn.lr (now 0.0005)" in w
    assert "fisher_alphas" in heldout_warning(bad, 5e-4, "fisher") and heldout_warning(None, 5e-4, "loop") is None
    # a calibrated run kept u <= budget on the unmerged adapter: the merged model's rounding is not a warning, a
    # real excess is, and its fix is the budget (the rate is the schedule's)
    edge = {"n": 4, "ce_before": 1.0, "ce_after": 1.0 + math.log(1.1 * 1.004), "ppl_ratio": 1.1 * 1.004}
    assert heldout_warning(edge, 5e-4, "loop", 1.1) is not None
    assert heldout_warning(edge, 5e-4, "loop", 1.1, calibrated=True) is None
    w = heldout_warning(bad, 5e-4, "loop", 1.1, calibrated=True)
    assert w is not None and "lower unlearn.utility_budget (now 1.1)" in w and "unlearn.lr" not in w


def test_heldout_records_are_measured_like_the_slow_loop_and_a_damaging_run_warns(user, capsys):
    from rapidun.data.template import encode_records
    from rapidun.eval.metrics import perplexity
    from rapidun.models import load_model

    out = user.root / "held"
    args = ["--method", "ga", "--model-path", user.model_dir, "--out", str(out)]  # pure ascent: damages
    f_args = ["--forget", user.forget, "--retain", user.retain]
    extra = ("scenario.retain_ratio=0.5", "unlearn.lr=0.2")
    assert unlearn_cli(*args, *f_args, extra=extra) == 0
    cap = capsys.readouterr()
    h = json.loads((out / "result.json").read_text())["heldout"]
    drawn = set(json.loads((out / "receipt.json").read_text())["retain_ids"])
    held = [r for r in user.parts["retain"] if r.id not in drawn]
    assert h["ids"] == [r.id for r in held] and h["n"] == len(held) > 0
    # the slow version: one record at a time, HF's own shifted mean CE over the answer tokens, weighted by them
    cfg = load_config(None, [*OVERRIDES, "data.format=alpaca"])
    model, tok, _ = load_model(user.model_dir, "cpu", "float32")
    nll, toks = 0.0, 0
    enc = encode_records(tok, held, cfg.model)[0]
    with torch.no_grad():
        for e in enc:
            ids = torch.tensor([e.input_ids])
            n = sum(x != -100 for x in e.labels[1:])
            nll += float(model(input_ids=ids, labels=torch.tensor([e.labels])).loss) * n
            toks += n
    assert h["tokens"] == toks and h["ce_before"] == pytest.approx(nll / toks, abs=1e-5)
    assert math.exp(h["ce_before"]) == pytest.approx(perplexity(model, enc, tok.pad_token_id), rel=1e-5)
    assert h["ppl_ratio"] == pytest.approx(math.exp(h["ce_after"] - h["ce_before"]))
    assert f"held-out clean records ({h['n']}, retain records not in the buffer; --heldout-clean" in cap.out
    c = json.loads((out / "result.json").read_text())["collateral"]
    assert f"collateral on the held-out clean prompts ({c['n']}): " in cap.out
    assert f"answers agree {c['agreement']:.2f} with the start model's" in cap.out
    assert h["ppl_ratio"] > 1.10 and "warning: the held-out clean records' perplexity rose" in cap.err


def test_heldout_clean_file_is_what_the_budget_measures(user, capsys, tmp_path):
    """``--heldout-clean``: the held-out check and the collateral comparison run on the file's records (here the
    scenario's never-trained-on val_clean), recorded in packs.json; a file holding a forget record is refused
    before anything is written."""
    held = write_alpaca(tmp_path / "held.jsonl", user.parts["val_clean"])
    out = tmp_path / "u"
    args = ["--model-path", user.model_dir, "--forget", user.forget, "--retain", user.retain, "--out", str(out)]
    assert unlearn_cli(*args, "--heldout-clean", str(held)) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    ids = [r.id for r in user.parts["val_clean"]]
    assert f"held-out clean records ({len(ids)}, from {held}): CE " in printed
    assert res["heldout"]["ids"] == ids and res["collateral"]["n"] == len(ids)
    assert json.loads((out / "packs.json").read_text())["heldout_path"] == str(held)
    assert json.loads((out / "run.json").read_text())["inputs"]["heldout_clean"]["path"] == str(held.resolve())
    bad = write_alpaca(tmp_path / "bad.jsonl", [*user.parts["val_clean"], user.parts["forget"][0]])
    args[-1] = str(tmp_path / "refused")
    assert unlearn_cli(*args, "--heldout-clean", str(bad)) == 2
    assert "bad.jsonl: 1 held-out record(s) are also forget or retain-buffer records" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_calibrated_unlearn_draws_its_schedule(user, capsys, tmp_path):
    """The calibrated schedule (the default) writes OUT/calibration.png beside result.json, lists it among the
    outputs and records it as written (so --overwrite may remove it); the fixed schedule writes none."""
    held = write_alpaca(tmp_path / "held.jsonl", user.parts["val_clean"])
    out = tmp_path / "cal"
    args = ["--model-path", user.model_dir, "--forget", user.forget, "--retain", user.retain, "--out", str(out)]
    assert unlearn_cli(*args, "--heldout-clean", str(held), extra=("unlearn.schedule=calibrated",)) == 0
    printed = capsys.readouterr().out
    cal = json.loads((out / "result.json").read_text())["calibration"]
    assert cal["schedule"] == "calibrated" and cal["curve"]
    assert (out / "calibration.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "calibration.png" in printed.splitlines()[-1] and "schedule: calibrated within" in printed
    assert "calibration.png" in json.loads((out / "run.json").read_text())["written"]
    fixed = tmp_path / "fixed"
    args[-1] = str(fixed)
    assert unlearn_cli(*args, "--heldout-clean", str(held)) == 0
    assert "calibration.png" not in capsys.readouterr().out and not (fixed / "calibration.png").exists()
