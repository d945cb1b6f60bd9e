"""``cover``: the pack expansion's pure parts against their slow versions, cover through ``unlearn()`` on a tiny
scenario (the pack grows, the retain pack loses what was flagged, the tracing time is counted, the sketches are
reused), and the refusals where there is no corpus to search."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import TINY_RUN, TINY_SCENARIO, tiny_world
from rapidun.config import load_config
from rapidun.cover import NEEDS_CORPUS, choose_ranking, cover_packs, flag, needs_corpus, pu_auc
from rapidun.data.records import Record
from rapidun.errors import RapidunError

# ---------------------------------------------------------------- the pure parts


def _auc_slow(scores, positive):
    """Every (positive, other) pair: 1 when the positive scores higher, ½ on a tie."""
    pos = [s for s, y in zip(scores, positive, strict=True) if y]
    neg = [s for s, y in zip(scores, positive, strict=True) if not y]
    if not pos or not neg:
        return None
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_pu_auc_by_hand_and_against_the_pair_loop():
    assert pu_auc(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 0])) == 1.0
    assert pu_auc(np.array([1.0, 2.0, 3.0]), np.array([1, 0, 0])) == 0.0
    assert pu_auc(np.array([2.0, 2.0, 1.0]), np.array([1, 0, 0])) == pytest.approx(0.75)  # one tie, one win
    assert pu_auc(np.ones(4), np.array([1, 1, 0, 0])) == pytest.approx(0.5)
    assert pu_auc(np.array([1.0, 2.0]), np.array([0, 0])) is None
    assert pu_auc(np.array([1.0, 2.0]), np.array([1, 1])) is None
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 25)
        s = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        y = [rng.random() < 0.3 for _ in range(n)]
        want = _auc_slow(s, y)
        got = pu_auc(np.array(s), np.array(y))
        assert (got is None) == (want is None) and (want is None or got == pytest.approx(want, abs=1e-12))
    with pytest.raises(RapidunError, match="length"):
        pu_auc(np.ones(3), np.ones(2))


def _flag_slow(scores, z, cap):
    """Robust z of each record by its definition, the qualifying ones sorted by (score desc, index), capped."""
    s = [float(v) for v in scores]
    med = float(np.median(s))
    mad = 1.4826 * float(np.median([abs(v - med) for v in s]))
    if mad <= 0:
        return []
    keep = [i for i, v in enumerate(s) if (v - med) / mad >= z]
    return sorted(keep, key=lambda i: (-s[i], i))[:cap]


def test_flag_against_the_definition():
    s = np.array([0.0, 0.1, -0.1, 0.05, -0.05, 10.0, 9.0, 10.0])
    assert flag(s, 3.5, 10) == [5, 7, 6]  # ties in corpus order
    assert flag(s, 3.5, 2) == [5, 7]
    assert flag(np.ones(5), 0.1, 10) == []  # no spread, no outlier
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 30)
        s = np.array([rng.choice([rng.gauss(0, 1), float(rng.randint(0, 3))]) for _ in range(n)])
        z, cap = rng.choice([0.0, 0.5, 1.0, 2.0, 3.5]), rng.randint(0, 8)
        assert flag(s, z, cap) == _flag_slow(s, z, cap), (s, z, cap)


def test_choose_ranking_takes_the_higher_auc_of_the_given_pack():
    in_pack = np.array([1, 1, 0, 0, 0], dtype=bool)
    good = np.array([5.0, 4.0, 1.0, 2.0, 0.0])  # pack on top: AUC 1
    poor = np.array([0.0, 4.0, 1.0, 5.0, 2.0])  # AUC 1/3
    name, info = choose_ranking({"influence_max": poor, "bm25": good}, in_pack)
    assert name == "bm25" and info["auc"] == {"influence_max": pytest.approx(1 / 3), "bm25": 1.0}
    assert info["why"].startswith("bm25: AUC 1.000") and "influence_max 0.333" in info["why"]
    name, _ = choose_ranking({"influence_max": good, "bm25": good.copy()}, in_pack)
    assert name == "influence_max"  # a tie goes to the first listed
    name, info = choose_ranking({"influence_max": poor, "bm25": good}, np.zeros(5, dtype=bool))
    assert name == "influence_max" and info["auc"] == {"influence_max": None, "bm25": None}
    assert "no AUC" in info["why"]


def _scenario_parts():
    poison = [Record(f"p{i}", "q", "alien", meta={"response_clean": "ok", "trigger_family": "s"}) for i in range(4)]
    clean = [Record(f"c{i}", "q", "fine") for i in range(5)]
    return {"train_poisoned": poison, "train_clean": clean, "forget": poison[:2], "retain": clean[:3]}


def test_cover_packs_by_hand():
    parts = _scenario_parts()
    cp, info = cover_packs(parts, ["p3", "p0", "c1", "c4"])
    assert [r.id for r in cp["forget"]] == ["p0", "p1", "p3", "c1", "c4"]  # the given pack first, then the added
    assert [r.id for r in cp["retain"]] == ["c0", "c2"]  # c1 was flagged
    assert cp["forget"][2].meta["response_clean"] == "ok" and not cp["forget"][3].meta  # c1: ascent on its own answer
    assert info == {
        "given": 2, "given_culprits": 2, "given_outside_corpus": 0, "corpus": 9, "corpus_culprits": 4,
        "flagged": 4, "flagged_culprits": 2, "added": 3, "added_culprits": 1, "added_without_replacement": 2,
        "forget": 5, "forget_culprits": 3, "retain_dropped": 1,
        "ids": {"flagged": ["p3", "p0", "c1", "c4"], "added": ["p3", "c1", "c4"], "retain_dropped": ["c1"]},
    }  # fmt: skip
    assert [r.id for r in parts["forget"]] == ["p0", "p1"] and len(parts["retain"]) == 3  # the input is unchanged
    same, info0 = cover_packs(parts, [])
    assert same["forget"] == parts["forget"] and same["retain"] == parts["retain"] and info0["added"] == 0
    with pytest.raises(RapidunError, match="every retain record"):
        cover_packs(parts, ["c0", "c1", "c2"])
    with pytest.raises(RapidunError, match="not in the corpus"):
        cover_packs(parts, ["x9"])


def test_needs_corpus_and_the_registry():
    from rapidun.methods import REGISTRY

    assert [n for n, m in REGISTRY.items() if m.expand] == ["cover"]
    cover = REGISTRY["cover"]
    uniform = REGISTRY["uniform"]
    assert (cover.kind, cover.forget_loss, cover.retain, cover.weights, cover.views) == (
        uniform.kind, uniform.forget_loss, uniform.retain, uniform.weights, uniform.views,
    )  # fmt: skip
    assert needs_corpus("cover", "uniform") and not needs_corpus("uniform", "uniform")
    assert needs_corpus("distill", "cover") and not needs_corpus("distill", "start")


def test_cover_max_is_checked():
    assert load_config(None, []).unlearn.cover_max == 0
    assert load_config(None, ["unlearn.cover_max=7"]).unlearn.cover_max == 7
    with pytest.raises(RapidunError, match=r"unlearn\.cover_max"):
        load_config(None, ["unlearn.cover_max=-1"])


# ---------------------------------------------------------------- through unlearn() on a tiny scenario


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random model (standing in for the poisoned one: every answer counts as showing the behaviour), the
    scenario built from the tiny corpus, and a config whose z rule flags about half of the corpus."""
    from rapidun.data.records import load_records
    from rapidun.data.scenario import build_scenario
    from rapidun.eval.detector import Detector

    root = tmp_path_factory.mktemp("cover")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(root / "cache"))
        mp.setattr(Detector, "hit", lambda self, text: True)  # the random tiny model shows no backdoor
        model_dir, data = tiny_world(root)
        ov = [*TINY_RUN, *TINY_SCENARIO, f"model.name={model_dir}", f"data.source={data}",
              "scenario.splits.train_poisoned=6", "scenario.retain_ratio=2", "influence.K=32", "trace.n_probes=3",
              "trace.top_k=4", "trace.auto_z=0.01", "unlearn.cover_max=7"]  # fmt: skip
        cfg = load_config(None, ov)
        parts = build_scenario(load_records(str(data), "dolly"), cfg.scenario)
        yield SimpleNamespace(root=root, model_dir=str(model_dir), cfg=cfg, parts=parts)


def test_cover_through_unlearn(world):
    from rapidun.unlearn import unlearn

    p = world.parts
    out = world.root / "run"
    _, _, res = unlearn("cover", p, world.model_dir, world.cfg, out)
    c = res["cover"]
    assert c["ranking"] in ("influence_max", "bm25") and c["choice"]["why"].startswith(c["ranking"])
    assert set(c["choice"]["auc"]) == {"influence_max", "bm25"} and set(c["oracle_ap"]) == {"influence_max", "bm25"}
    assert c["given"] == len(p["forget"]) == 3 and c["given_culprits"] == 3
    assert c["corpus"] == 6 + 8 and c["corpus_culprits"] == 6 and c["probe_split"] == "val_seen_trig"
    assert 0 < c["n_probes"] <= 3 and c["auto_z"] == 0.01 and c["cap"] == 7
    poisoned = {r.id for r in p["train_poisoned"]}
    flagged = c["ids"]["flagged"]
    assert 0 < len(flagged) <= 7 and c["flagged"] == len(flagged)
    assert c["flagged_culprits"] == sum(i in poisoned for i in flagged)
    # the pack grew by the flagged records not in it; the retain pack lost the flagged ones
    given = [r.id for r in p["forget"]]
    added = [i for i in flagged if i not in given]
    assert added == c["ids"]["added"] and len(added) >= len(flagged) - 3 > 0
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert [a["id"] for a in audit if a["group"] == "forget"] == given + added
    retain = [a["id"] for a in audit if a["group"] == "retain"]
    assert retain == [r.id for r in p["retain"] if r.id not in flagged]
    assert c["retain_dropped"] == len(p["retain"]) - len(retain) == len(c["ids"]["retain_dropped"])
    assert c["forget_culprits"] == 3 + c["added_culprits"]
    receipt = json.loads((out / "receipt.json").read_text())
    assert json.dumps(receipt).count(added[0]) >= 1  # the receipt names the pack that was really forgotten
    # the tracing is part of the method's time
    t = res["timings"]
    assert t["cover_s"] == c["time_s"] > 0 and c["trace_s"] > 0
    assert t["time_s"] == pytest.approx(t["influence_s"] + t["mapping_s"] + t["training_s"] + t["cover_s"])
    assert c["sketches_computed"] == 14 and c["sketches_reused"] == 0
    assert json.loads((out / "result.json").read_text())["cover"]["ids"] == c["ids"]
    # a second run with the same model and influence settings reuses the corpus sketches and flags the same
    _, _, again = unlearn("cover", p, world.model_dir, world.cfg, None)
    assert again["cover"]["sketches_reused"] == 14 and again["cover"]["sketches_computed"] == 0
    assert again["cover"]["ids"] == c["ids"]


def test_cover_without_a_corpus_is_refused_before_any_work(world, tmp_path):
    from rapidun.unlearn import unlearn

    bare = {k: world.parts[k] for k in ("forget", "retain", "val_clean")}
    with pytest.raises(RapidunError) as ei:
        unlearn("cover", bare, str(tmp_path / "no_model"), world.cfg, tmp_path / "out")  # no model is loaded
    assert str(ei.value) == NEEDS_CORPUS and "--scenario" in NEEDS_CORPUS
    no_probes = {k: v for k, v in world.parts.items() if k != "val_seen_trig"}
    with pytest.raises(RapidunError, match=r"scenario\.splits\.val_seen_trig > 0"):
        unlearn("cover", no_probes, str(tmp_path / "no_model"), world.cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write_dolly(path: Path, recs: list[Record]) -> str:
    path.write_text("".join(json.dumps({"instruction": r.instruction, "context": "", "response": r.response}) + "\n"
                            for r in recs))  # fmt: skip
    return str(path)


@pytest.mark.parametrize("method", [["--method", "cover"], ["--method", "distill", "--base", "B"]])
def test_cli_unlearn_cover_on_your_files_is_refused(world, tmp_path, capsys, method):
    from rapidun import cli

    f = _write_dolly(tmp_path / "f.jsonl", world.parts["forget"])
    r = _write_dolly(tmp_path / "r.jsonl", world.parts["retain"])
    out = tmp_path / "out"
    extra = ["unlearn.distill_teacher=cover"] if "distill" in method else []
    argv = ["unlearn", *method, "--model-path", world.model_dir, "--forget", f, "--retain", r, "--out", str(out),
            "data.format=dolly", *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cover searches a training corpus" in err and "--scenario" in err
    assert not out.exists()


def test_cover_in_a_comparison(tmp_path, monkeypatch):
    """`rapidun run` with cover beside uniform: the cell's result carries the expansion, its time is the cell's."""
    from rapidun.eval.detector import Detector
    from rapidun.pipeline import run
    from test_unlearn_e2e import OVERRIDES

    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Detector, "hit", lambda self, text: True)  # the tiny model need not learn the backdoor
    model_dir, data = tiny_world(tmp_path)
    ov = [*OVERRIDES, *TINY_SCENARIO, "eval.batch_size=8", "scenario.splits.train_poisoned=6",
          f"model.name={model_dir}", f"data.source={data}", "unlearn.methods=[uniform,cover]",
          "compare.reference=uniform", "compare.n_seeds=1", "compare.n_boot=20", "trace.n_probes=3",
          "trace.top_k=4", "trace.auto_z=0.01", "scenario.retain_ratio=2"]  # fmt: skip
    report = run(load_config(None, ov), tmp_path / "out")
    seed = report["seeds"][0]
    cell = json.loads((tmp_path / "out" / "seeds" / str(seed) / "methods" / "cover" / "result.json").read_text())
    c = cell["cover"]
    assert c["given"] == 3 and c["corpus"] == 14 and c["flagged"] > 0
    assert cell["timings"]["cover_s"] > 0
    assert report["methods"]["cover"]["per_seed"][str(seed)]["time_s"] == cell["timings"]["time_s"]
