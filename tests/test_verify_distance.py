"""The weight-distance diagnostic (rapidun.verify.distance): the summed float64 version against a per-element Python
loop and a hand case, what is compared and what is ignored, each end loaded once with at most three state dicts
held, and the stage's per-pair cache in OUT/verify/<label>/distance.json (a rerun loads nothing)."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch

from rapidun.config import EvalConfig, ModelConfig, VerifyConfig
from rapidun.errors import RapidunError
from rapidun.verify import distance as dist
from rapidun.verify import stage
from rapidun.verify.distance import cpu_state, model_distances, weight_distance


def _slow(a: dict, b: dict) -> tuple[float, float]:
    """L2 distance and ‖b‖ by one Python loop over every element of every shared floating tensor."""
    dd = bb = 0.0
    for k in sorted(set(a) & set(b)):
        if not (a[k].is_floating_point() and b[k].is_floating_point()):
            continue
        for x, y in zip(a[k].reshape(-1).tolist(), b[k].reshape(-1).tolist(), strict=True):
            dd += (x - y) ** 2
            bb += y * y
    return math.sqrt(dd), math.sqrt(bb)


def _pair(seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (7, 5), "w": (3, 4, 2), "bias": (6,), "scalar": ()}
    a = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    a["half"], b["half"] = torch.randn(9, generator=g).to(torch.bfloat16), torch.randn(9, generator=g)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [dist.CHUNK, 4])
def test_weight_distance_matches_the_per_element_loop(seed, chunk, monkeypatch):
    monkeypatch.setattr(dist, "CHUNK", chunk)  # blocks smaller than the tensors: the block sums add up the same
    a, b = _pair(seed)
    d = weight_distance(a, b)
    l2, nb = _slow(a, b)
    assert d["l2"] == pytest.approx(l2, rel=1e-12)
    assert d["norm_b"] == pytest.approx(nb, rel=1e-12)
    assert d["norm_a"] == pytest.approx(_slow(a, {k: torch.zeros_like(v) for k, v in a.items()})[0], rel=1e-12)
    assert d["relative"] == pytest.approx(l2 / nb, rel=1e-12)
    assert d["tensors"] == 5 and d["params"] == 35 + 24 + 6 + 1 + 9
    assert weight_distance(a, a)["l2"] == 0.0


def test_weight_distance_hand_case():
    a = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.zeros(2, 2), "b": torch.tensor([4.0])}
    d = weight_distance(a, b)
    assert d["l2"] == 5.0  # sqrt(3² + 4²)
    assert d["norm_b"] == 4.0 and d["norm_a"] == 3.0
    assert d["relative"] == 1.25
    assert d["tensors"] == 2 and d["params"] == 5
    assert weight_distance(a, {k: torch.zeros_like(v) for k, v in b.items()})["relative"] is None  # ‖b‖ = 0


def test_names_in_one_only_and_integer_buffers_are_ignored_and_counted():
    a = {"w": torch.ones(2), "only_a": torch.ones(3), "ids": torch.arange(4)}
    b = {"w": torch.zeros(2), "only_b1": torch.ones(1), "only_b2": torch.ones(1), "ids": torch.arange(4) + 1}
    d = weight_distance(a, b)
    assert d["l2"] == pytest.approx(math.sqrt(2)) and d["tensors"] == 1 and d["params"] == 2
    assert d["only_in_a"] == 1 and d["only_in_b"] == 2 and d["not_float"] == 1
    assert d["unmatched"] == ["only_a", "only_b1", "only_b2"]


def test_a_shape_mismatch_names_the_tensor():
    with pytest.raises(RapidunError, match=r"'lm_head.weight' has shape \(5, 3\) in one model and \(6, 3\)"):
        weight_distance({"lm_head.weight": torch.ones(5, 3)}, {"lm_head.weight": torch.ones(6, 3)})


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 3)
        self.head = torch.nn.Linear(3, 6, bias=False)
        self.head.weight = self.emb.weight  # tied, as in most small LMs
        self.register_buffer("position_ids", torch.arange(4))


def test_cpu_state_keeps_tied_weights_tied_and_the_distance_counts_them_once():
    torch.manual_seed(0)
    m, n = _Tied(), _Tied()
    sa, sb = cpu_state(m), cpu_state(n)
    assert set(sa) == {"emb.weight", "head.weight"}  # the integer buffer dropped
    assert sa["emb.weight"] is sa["head.weight"]
    d = weight_distance(sa, sb)
    assert d["tensors"] == 1 and d["tied"] == 1 and d["params"] == 18
    assert d["l2"] == pytest.approx(float((m.emb.weight - n.emb.weight).detach().norm()), rel=1e-6)
    sh = cpu_state(m.to(torch.bfloat16))
    assert sh["emb.weight"].dtype == torch.float32 and sh["emb.weight"] is sh["head.weight"]


class _SD(dict):
    """A state dict that can be watched (weakref) to count how many are alive."""


def _world(n_methods: int = 3):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    models = {"poisoned": ("P", None), "retrain": ("R", None)}
    models |= {f"m{i}@1": ("P", f"A{i}") for i in range(n_methods)}
    weights = {lab: {k: v + 0.1 * j * torch.ones_like(v) for k, v in base.items()} for j, lab in enumerate(models)}
    calls: list[str] = []
    live = [0, 0]  # now, max

    def load(path: str, adapter: str | None) -> dict:
        label = next(k for k, v in models.items() if v == (path, adapter))
        calls.append(label)
        sd = _SD(weights[label])
        live[0] += 1
        live[1] = max(live[1], live[0])
        weakref.finalize(sd, lambda: live.__setitem__(0, live[0] - 1))
        return sd

    return models, weights, load, calls, live


def test_model_distances_loads_each_model_once_and_holds_at_most_three():
    models, weights, load, calls, live = _world()
    out = model_distances(models, "poisoned", "retrain", load)
    assert sorted(calls) == sorted(models)  # each end once, each model once
    assert live[1] <= 3 and live[0] == 0  # nothing left held
    assert set(out) == set(models)
    for label, row in out.items():
        assert set(row) == {"to_poisoned", "to_retrain"}
        assert row["to_poisoned"] == weight_distance(weights[label], weights["poisoned"])
        assert row["to_retrain"] == weight_distance(weights[label], weights["retrain"])
    assert out["poisoned"]["to_poisoned"]["l2"] == 0.0 and out["retrain"]["to_retrain"]["l2"] == 0.0


def test_model_distances_skips_the_missing_end_and_measures_only_the_labels_asked():
    models, _, load, calls, _ = _world()
    out = model_distances(models, "poisoned", "nope", load, labels=["m1@1"])
    assert out == {"m1@1": {"to_poisoned": out["m1@1"]["to_poisoned"]}}
    assert sorted(calls) == ["m1@1", "poisoned"]
    assert model_distances(models, None, None, load) == {}


def test_model_distances_records_a_shape_mismatch_and_measures_the_rest():
    models, weights, load, _, _ = _world(2)
    weights["m0@1"]["w"] = torch.zeros(5, 3)
    out = model_distances(models, "poisoned", "retrain", load)
    assert "'w' has shape" in out["m0@1"]["to_poisoned"]["error"]
    assert out["m1@1"]["to_retrain"]["l2"] > 0


def test_stage_distances_are_cached_per_pair_of_identities(tmp_path, monkeypatch):
    models, weights, load, calls, _ = _world(2)
    ids = {v: f"id-{k}" for k, v in models.items()}
    monkeypatch.setattr(stage, "identity", lambda path, adapter: {"model": ids[path, adapter]})
    monkeypatch.setattr(stage, "merged_state", lambda path, adapter, mcfg: load(path, adapter))
    first = stage.distances(models, "poisoned", "retrain", ModelConfig(), tmp_path)
    assert sorted(calls) == sorted(models)
    assert first["m1@1"]["to_retrain"] == weight_distance(weights["m1@1"], weights["retrain"])
    doc = json.loads((tmp_path / "verify" / "m1@1" / "distance.json").read_text())
    assert doc["schema"] == "rapidun.distance/1" and len(doc["pairs"]) == 2 and doc["key"]
    calls.clear()
    assert stage.distances(models, "poisoned", "retrain", ModelConfig(), tmp_path) == first
    assert calls == []  # every figure from the cache
    ids["P", "A0"] = "id-m0-changed"  # a new adapter for m0: only m0 is loaded again (and the ends it needs)
    weights["m0@1"] = {k: v * 2 for k, v in weights["m0@1"].items()}
    again = stage.distances(models, "poisoned", "retrain", ModelConfig(), tmp_path)
    assert sorted(calls) == ["m0@1", "poisoned", "retrain"]
    assert again["m0@1"]["to_poisoned"] == weight_distance(weights["m0@1"], weights["poisoned"])
    assert again["m1@1"] == first["m1@1"]
    assert stage.distances(models, None, None, ModelConfig(), tmp_path) == {}


def test_run_verification_puts_the_distances_into_the_summary(tmp_path, monkeypatch):
    models, weights, load, _, _ = _world(1)
    monkeypatch.setattr(stage, "identity", lambda path, adapter: {"model": f"{path}/{adapter}"})
    monkeypatch.setattr(stage, "merged_state", lambda path, adapter, mcfg: load(path, adapter))
    monkeypatch.setattr(stage, "Battery", lambda label, *a: label)
    base = {"asr_seen": 0.5, "asr_ood": 0.4, "asr_trig": 0.5, "clean_ppl": 9.0, "time_s": 1.0}
    monkeypatch.setattr(stage, "verify_battery", lambda b, attacks: {"base": dict(base)})
    target = type("T", (), {"kind": "scenario"})()
    doc = stage.run_verification(
        models, target, VerifyConfig(), EvalConfig(), ModelConfig(), tmp_path, "poisoned", None
    )
    s = doc["summary"]
    assert set(s["m0@1"]["distance"]) == {"to_poisoned"}  # retrain is not in the run: that part is skipped
    assert s["m0@1"]["distance"]["to_poisoned"] == weight_distance(weights["m0@1"], weights["poisoned"])
    assert json.loads((tmp_path / "verification.json").read_text())["summary"]["m0@1"]["distance"]
