"""The calibrated schedule (rapidun.calibrate): range probe, budget, back-off, best state, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_model, make_unlearn_items
from rapidun.calibrate import AIM, Calibrator, forget_signal, make_calibrator, rate_ladder, signal_sample
from rapidun.config import UnlearnConfig
from rapidun.data.template import encode, format_prompt
from rapidun.eval.metrics import perplexity
from rapidun.models import attach_lora
from rapidun.steps import eval_ce
from rapidun.train import unlearn_loop

CPU = torch.device("cpu")
HELD = [
    ("five six", "seven eight nine"),
    ("the bird sat", "on the red mat"),
    ("gamma delta", "epsilon zeta eta"),
    ("tell me about the fox", "the fox ran to the park"),
    ("one two three", "four five six"),
    ("the blue dog", "sat on the mat"),
]


def world(tok, seed: int = 0):
    model = attach_lora(make_model(len(tok), seed=seed, init_range=0.2), 4, 8, 0.0, ["q_proj", "v_proj"], seed=0)
    forget, retain = make_unlearn_items(tok)
    held = [encode(tok, format_prompt(tok, p), a, 64, 32) for p, a in HELD]
    return model, forget, retain, held


def cfg(**kw) -> UnlearnConfig:
    base = {"epochs": 1, "draws_per_epoch": 48, "batch_size": 2, "autocast": "off", "seed": 1}
    base |= {"calibrate_probe_draws": 4, "calibrate_every": 4, "calibrate_lr_min": 1e-3, "calibrate_lr_max": 1e-1}
    return UnlearnConfig(**{**base, **kw})


def held_ratio(model, held, pad, ppl0) -> float:
    """Held-out perplexity ratio, the slow obvious way (:func:`rapidun.eval.metrics.perplexity`)."""
    return perplexity(model, held, pad) / ppl0


def run(tok, u: UnlearnConfig, calibrated: bool, seed: int = 0, loss: str = "ascent"):
    """Pure gradient ascent on the forget records (no retain draws): it raises every loss, the held-out one too."""
    model, forget, retain, held = world(tok, seed)
    pad = tok.pad_token_id
    h0 = float(eval_ce(model, held, pad, CPU).mean())
    ppl0 = perplexity(model, held, pad)
    ctl = make_calibrator(model, forget, held, h0, u, pad, CPU) if calibrated else None
    w_f, w_r = torch.ones(len(forget)), torch.ones(len(retain))
    stats = unlearn_loop(model, forget, retain, u, loss, loss != "ascent", w_f, w_r, pad, CPU, controller=ctl)
    return model, stats, held_ratio(model, held, pad, ppl0)


def test_rate_ladder():
    assert rate_ladder(1e-4, 1e-2) == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2])
    assert rate_ladder(1e-3, 1e-3) == [1e-3]
    assert rate_ladder(1e-3, 2e-3) == pytest.approx([1e-3, 2e-3])
    with pytest.raises(ValueError):
        rate_ladder(1e-2, 1e-3)


def test_forget_signal_matches_slow_version():
    gen = torch.Generator().manual_seed(0)
    resp = torch.rand(7, generator=gen) * 3
    repl = torch.rand(7, generator=gen) * 3
    repl[[1, 4]] = math.nan
    h0 = 1.7
    slow = sum(float(resp[i]) - (h0 if math.isnan(float(repl[i])) else float(repl[i])) for i in range(7)) / 7
    assert forget_signal(resp, repl, h0) == pytest.approx(slow)
    assert forget_signal(torch.tensor([2.0, 1.0]), torch.tensor([1.0, math.nan]), 0.5) == pytest.approx(0.75)


def test_fixed_rate_overshoots_where_calibrated_stays_within_budget(tiny_tok):
    budget = 1.05
    _, _, fixed_ratio = run(tiny_tok, cfg(lr=1e-1, schedule="fixed", utility_budget=budget), calibrated=False)
    assert fixed_ratio > budget  # the setting a user might guess breaks the model
    _, stats, ratio = run(tiny_tok, cfg(lr=1e-1, utility_budget=budget), calibrated=True)
    cal = stats["calibration"]
    assert ratio <= budget + 1e-6
    assert ratio == pytest.approx(cal["best_utility_ratio"], rel=1e-5)  # the model ends in the recorded state
    assert cal["best_signal"] > cal["start_signal"]  # and it did unlearn something
    assert cal["chosen_lr"] < 1e-1 and cal["ended_in"] == "main"
    assert stats["steps"] <= 24
    assert cal["curve"][0]["step"] == 0 and all(c["utility_ratio"] > 0 for c in cal["curve"])
    probe = [c for c in cal["curve"] if c["phase"] == "probe"]
    assert probe and all(c["signal"] is None for c in probe)  # probe checks measure utility only
    # every main-run segment's peak is in the curve; the record's peak_lr is the highest of them, and the rate the
    # loop used never exceeded it after the probe
    peaks = [c["next_lr"] for c in cal["curve"] if "next_lr" in c and c["step"] < stats["steps"]]
    assert peaks and cal["peak_lr"] == max(peaks)
    assert all(c["lr"] <= cal["peak_lr"] + 1e-15 for c in cal["curve"] if c["phase"] == "main")


def test_calibrated_is_deterministic_for_a_seed(tiny_tok):
    u = cfg(utility_budget=1.05)
    m1, s1, _ = run(tiny_tok, u, calibrated=True)
    m2, s2, _ = run(tiny_tok, u, calibrated=True)
    assert s1["calibration"]["curve"] == s2["calibration"]["curve"]
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_target_reached_stops_early(tiny_tok):
    model, forget, retain, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    h0 = float(eval_ce(model, held, pad, CPU).mean())
    u = cfg()
    start = Calibrator(model, forget, held, h0, 1.10, 1.0, 1e-3, 1e-1, 4, 4, 3, 2, 24, pad, CPU).start_signal
    # one rung: the probe ends after its 2 steps, and the signal measured there already meets the target
    ctl = Calibrator(model, forget, held, h0, 1.10, start - 1.0, 1e-3, 1e-3, 4, 4, 3, 2, 24, pad, CPU)
    stats = unlearn_loop(model, forget, retain, u, "relabel_ascent", True, torch.ones(len(forget)),
                         torch.ones(len(retain)), pad, CPU, controller=ctl)  # fmt: skip
    cal = stats["calibration"]
    assert cal["reached_target"] and cal["stop_reason"] == "target"
    assert stats["steps"] == 2  # the first check (one probe rung of 2 steps) already meets the target


def test_budget_crossing_restores_best_state_and_backs_off(tiny_tok):
    _, stats, ratio = run(tiny_tok, cfg(utility_budget=1.001, calibrate_max_backoffs=2), calibrated=True)
    cal = stats["calibration"]
    crossings = [c for c in cal["curve"][1:] if c["utility_ratio"] is not None and c["utility_ratio"] > 1.001]
    assert crossings  # such a tight budget is crossed
    assert cal["restored_steps"] > 0
    assert ratio <= 1.001 + 1e-6
    if cal["stop_reason"] == "backoffs":
        assert cal["backoffs"] == 2


def test_non_finite_loss_backs_off_instead_of_raising(tiny_tok):
    model, forget, retain, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    h0 = float(eval_ce(model, held, pad, CPU).mean())
    init = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    u = cfg(calibrate_max_backoffs=1)
    ctl = make_calibrator(model, forget, held, h0, u, pad, CPU)
    w_f = torch.full((len(forget),), float("nan"))
    stats = unlearn_loop(model, forget, retain, u, "ascent", False, w_f, torch.ones(len(retain)), pad, CPU,
                         controller=ctl)  # fmt: skip
    cal = stats["calibration"]
    assert cal["stop_reason"] == "backoffs" and cal["best_step"] == 0
    for p, q in zip([p for p in model.parameters() if p.requires_grad], init, strict=True):
        assert torch.equal(p, q)  # the start state: nothing non-finite was kept


def test_lr_min_above_max_is_refused(tiny_tok):
    from rapidun.errors import RapidunError

    model, forget, _, held = world(tiny_tok)
    with pytest.raises(RapidunError, match="calibrate_lr_min"):
        make_calibrator(model, forget, held, 1.0, cfg(calibrate_lr_min=1e-1, calibrate_lr_max=1e-3),
                        tiny_tok.pad_token_id, CPU)  # fmt: skip


# ---------------------------------------------------------------- through unlearn(): the default schedule


@pytest.fixture
def saved(tmp_path):
    from helpers import FORGET_DATA, RETAIN_DATA, make_tokenizer
    from rapidun.data.records import Record

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
        tok = make_tokenizer()
        model_dir = tmp_path / "start"
        make_model(len(tok), init_range=0.2).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        forget = [Record(id=f"f{k}", instruction=p, response=bad, meta={"response_clean": good} if good else {})
                  for k, (p, bad, good) in enumerate(FORGET_DATA)]  # fmt: skip
        retain = [Record(id=f"r{k}", instruction=p, response=a) for k, (p, a) in enumerate(RETAIN_DATA)]
        val = [Record(id=f"v{k}", instruction=p, response=a) for k, (p, a) in enumerate(HELD)]
        yield tmp_path, str(model_dir), {"forget": forget, "retain": retain, "val_clean": val}


def _unlearn(saved, name: str, parts: dict, extra: list[str]) -> dict:
    from rapidun.config import load_config
    from rapidun.unlearn import unlearn
    from test_unlearn_e2e import OVERRIDES

    root, model_dir, _ = saved
    over = [o for o in OVERRIDES if not o.startswith("unlearn.schedule=")]
    cfg = load_config(None, [*over, f"model.name={model_dir}", "unlearn.draws_per_epoch=24", *extra])
    return unlearn("uniform", parts, model_dir, cfg, root / name)[2]


def test_unlearn_defaults_to_the_calibrated_schedule_and_records_it(saved):
    import json

    root, _, parts = saved
    res = _unlearn(saved, "cal", parts, ["unlearn.utility_budget=1.02"])
    cal = res["calibration"]
    assert cal["schedule"] == "calibrated" and cal["budget"] == 1.02
    assert cal["best_utility_ratio"] <= 1.02
    assert 0 < res["timings"]["calibration_check_s"] <= res["timings"]["training_s"]
    receipt = json.loads((root / "cal" / "receipt.json").read_text())
    assert receipt["config"]["unlearn"]["schedule"] == "calibrated"
    assert json.loads((root / "cal" / "result.json").read_text())["calibration"]["curve"] == cal["curve"]
    # the held-out check after the run measures what the schedule kept: the same token-weighted CE before (the
    # same numbers through the same function) and, after, the same utility ratio (merged vs unmerged: rounding)
    assert res["heldout"]["ce_before"] == cal["h0_token_weighted"]
    assert math.log(res["heldout"]["ppl_ratio"]) == pytest.approx(math.log(cal["best_utility_ratio"]), abs=1e-6)
    fixed = _unlearn(saved, "fixed", parts, ["unlearn.schedule=fixed"])
    assert "calibration" not in fixed


def test_calibrated_without_heldout_records_runs_fixed_and_says_so(saved):
    _, _, parts = saved
    res = _unlearn(saved, "noheld", {**parts, "val_clean": []}, [])
    assert res["calibration"]["schedule"] == "fixed"
    assert any("needs held-out clean records" in w for w in res["warnings"])


def test_start_signal_from_the_audit_equals_the_measured_one(tiny_tok):
    model, forget, _, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    h0 = float(eval_ce(model, held, pad, CPU).mean())
    measured = Calibrator(model, forget, held, h0, 1.1, 1.0, 1e-3, 1e-2, 4, 4, 3, 2, 24, pad, CPU).start_signal
    resp = eval_ce(model, [it.poisoned for it in forget], pad, CPU)  # the slow way, record by record
    slow = sum(
        float(resp[k]) - (float(eval_ce(model, [it.clean], pad, CPU)[0]) if it.clean is not None else h0)
        for k, it in enumerate(forget)
    ) / len(forget)
    assert measured == pytest.approx(slow, rel=1e-5)


def test_signal_sample_is_a_fixed_subset_for_the_seed():
    assert signal_sample(40, 16, 7) == signal_sample(40, 16, 7)
    picked = signal_sample(40, 16, 7)
    assert len(set(picked)) == 16 and picked == sorted(picked) and all(0 <= i < 40 for i in picked)
    assert signal_sample(40, 16, 8) != picked  # another seed, other records
    assert signal_sample(15, 16, 7) == list(range(15)) == signal_sample(15, 0, 7)  # all when k covers them or is 0


def test_signal_on_a_sample_is_the_slow_mean_over_those_records(tiny_tok):
    model, forget, _, held = world(tiny_tok)
    assert len(forget) >= 3
    pad = tiny_tok.pad_token_id
    h0 = float(eval_ce(model, held, pad, CPU).mean())
    idx = [0, len(forget) - 1]
    ctl = Calibrator(model, forget, held, h0, 1.1, 1.0, 1e-3, 1e-2, 4, 4, 3, 2, 24, pad, CPU, signal_idx=idx)
    slow = sum(
        float(eval_ce(model, [forget[k].poisoned], pad, CPU)[0])
        - (float(eval_ce(model, [forget[k].clean], pad, CPU)[0]) if forget[k].clean is not None else h0)
        for k in idx
    ) / len(idx)
    assert ctl.start_signal == pytest.approx(slow, rel=1e-5)
    assert ctl.record()["signal_records"] == idx and ctl.record()["forget_records"] == len(forget)
    # make_calibrator draws the sample for u.seed and takes the start signal from the caller's audit, same records
    resp = eval_ce(model, [it.poisoned for it in forget], pad, CPU)
    repl = torch.tensor([math.nan if it.clean is None else float(eval_ce(model, [it.clean], pad, CPU)[0])
                         for it in forget])  # fmt: skip
    k = len(forget) - 1
    made = make_calibrator(model, forget, held, h0, cfg(calibrate_signal_records=k), pad, CPU, (resp, repl))
    picked = signal_sample(len(forget), k, 1)
    assert made.record()["signal_records"] == picked
    assert made.start_signal == pytest.approx(forget_signal(resp[picked], repl[picked], h0), rel=1e-6)
    assert made.start_signal == pytest.approx(made._signal(), rel=1e-4)  # the audit's value is the measured one


def test_pace_travels_the_distance_left_to_the_aim(tiny_tok):
    model, forget, _, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    ctl = Calibrator(model, forget, held, 1.0, 1.10, 1.0, 1e-4, 1e-2, 4, 4, 3, 2, 100, pad, CPU)
    ctl.cap = 1e-2
    ctl.main_lr = None  # the first segment: no growth limit yet
    ctl.disp, c = 0.01, 400.0  # 20 steps travelled D = 0.01; log u = c·D² = 0.04
    ctl._pace(20, c, math.exp(c * 0.01**2))
    # slow obvious version: the distance D* where c·D*² is the aim, and the cosine's sum over the 80 steps left
    d_star = math.sqrt(AIM * math.log(1.10) / c)
    assert ctl.main_lr == pytest.approx(2 * (d_star - 0.01) / 80) and ctl.main_start == 20
    travelled = sum(ctl.rate(t) for t in range(20, 100))
    assert c * (0.01 + travelled) ** 2 == pytest.approx(AIM * math.log(1.10), rel=0.02)
    # a state measured above the model's prediction has less left: the measured log u anchors the plan
    ctl.main_lr = None
    ctl._pace(20, c, math.exp(0.06))
    assert ctl.main_lr == pytest.approx(2 * (math.sqrt(0.01**2 + (AIM * math.log(1.10) - 0.06) / c) - 0.01) / 80)
    ctl.main_lr = None
    ctl._pace(20, c, 1.095)  # already past the aim: the slowest rate, not a negative one
    assert 0 < ctl.main_lr <= ctl.ladder[0] * 1e-3
    ctl.main_lr = 1e-4
    ctl._pace(20, 1e-6, 1.0001)  # almost free: at most double the last peak
    assert ctl.main_lr == pytest.approx(2e-4)
    ctl.main_lr = None
    ctl._pace(20, 1e-6, 1.0001)  # ... and never above the cap
    assert ctl.main_lr == 1e-2
    ctl.main_lr, ctl.cap = 1e-3, 1e-2
    ctl._pace(20, None, 0.99)  # utility improved (no curvature): double the current rate
    assert ctl.main_lr == 2e-3
    ctl._pace(20, -1.0, 1.05)
    assert ctl.main_lr == 4e-3


def test_curvature_is_log_u_over_the_squared_distance_on_the_kept_path(tiny_tok):
    _, stats, _ = run(tiny_tok, cfg(utility_budget=1.05), calibrated=True)
    cal = stats["calibration"]
    for c in cal["curve"][1:]:
        if "curvature" not in c:
            continue
        u, d = c["utility_ratio"], c["disp"]
        if c["curvature"] is None:
            assert not (math.isfinite(u) and u > 1.0 and d > 0)
        else:
            assert c["curvature"] == pytest.approx(math.log(u) / d**2)
    # D is Σ rate over the steps since the start, restarting from the kept state's D after a restore
    first = next(c for c in cal["curve"] if c["phase"] == "probe")
    assert first["disp"] == pytest.approx(first["lr"] * cal["probe_steps_per_rung"])


def scripted(tok, utilities: list[float]) -> tuple[Calibrator, torch.optim.Optimizer]:
    """A calibrator over the tiny model whose utility checks return ``utilities`` in turn (signal fixed)."""
    model, forget, _, held = world(tok)
    ctl = Calibrator(model, forget, held, 1.0, 1.10, 1.0, 1e-4, 1e-2, 4, 4, 3, 2, 24, tok.pad_token_id, CPU,
                     start_signal=-2.0)  # fmt: skip
    it = iter(utilities)
    ctl._utility = lambda: next(it)
    ctl._signal = lambda: -1.5
    return ctl, torch.optim.SGD(ctl.params, lr=0.0)


@pytest.mark.parametrize("crossing, mild", [(17.6, False), (1.15, True)])
def test_probe_end_paces_from_a_mild_crossing_but_not_from_a_blow_up(tiny_tok, crossing, mild):
    ctl, opt = scripted(tiny_tok, [1.02, crossing])
    for done in range(1, 5):  # two probe rungs of 2 steps: 1e-4, then 3.16e-4, which crosses the budget
        ctl.after_step(done, opt)
    assert ctl.phase == "main" and ctl.main_start == 4
    d0, d1 = 2 * 1e-4, 2 * 1e-4 + 2 * 1e-4 * math.sqrt(10)  # D at each rung's check (Σ rate)
    c0, c1 = math.log(1.02) / d0**2, math.log(crossing) / d1**2
    assert ctl.rung_curv == pytest.approx([c0, c1])
    c = c1 if mild else c0
    assert ctl.curv == pytest.approx(c)
    assert ctl.disp == pytest.approx(d0)  # back at the first rung's state
    d_star = math.sqrt(d0**2 + (AIM * math.log(1.10) - math.log(1.02)) / c)
    assert ctl.main_lr == pytest.approx(2 * (d_star - d0) / 20)  # 20 steps left, below the cap 1e-4
    assert ctl.main_lr < ctl.cap == 1e-4


def test_a_restore_puts_the_distance_back_to_the_kept_state(tiny_tok):
    ctl, opt = scripted(tiny_tok, [])
    ctl.best["disp"], ctl.disp = 0.005, 0.02
    ctl._restore(opt, 10)
    assert ctl.disp == 0.005


def test_start_ce_from_the_caller_gives_the_measured_reference(tiny_tok, monkeypatch):
    """``start_ce`` (the collateral snapshot's per-row CE) spares the start pass and gives the same ``h₀``: the
    token-weighted held-out CE, ``log`` of :func:`rapidun.eval.metrics.perplexity` (the slow obvious version)."""
    model, forget, _, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    rows = eval_ce(model, held, pad, CPU)
    h0 = float(rows.mean())
    import rapidun.calibrate as calibrate

    passes: list[int] = []  # the rows of each evaluation pass the calibrator makes

    def counting(m, r, *a, **k):
        passes.append(len(r))
        return eval_ce(m, r, *a, **k)

    monkeypatch.setattr(calibrate, "eval_ce", counting)
    measured = Calibrator(model, forget, held, h0, 1.1, 1.0, 1e-3, 1e-2, 4, 4, 3, 2, 24, pad, CPU)
    n_measured, passes[:] = list(passes), []
    given = Calibrator(model, forget, held, h0, 1.1, 1.0, 1e-3, 1e-2, 4, 4, 3, 2, 24, pad, CPU, start_ce=rows)
    assert given.h0_tok == pytest.approx(measured.h0_tok, rel=1e-6)
    assert math.exp(given.h0_tok) == pytest.approx(perplexity(model, held, pad), rel=1e-5)
    # measured: one held-out pass, then one pass over responses + replacements; given: the latter only
    n_sig = len(forget) + sum(it.clean is not None for it in forget)
    assert n_measured == [len(held), n_sig] and passes == [n_sig]
    # what the caller passes: the collateral snapshot's per-row CE, the same numbers as eval_ce's
    from rapidun.eval.collateral import held_distribution

    assert torch.equal(held_distribution(model, held, pad)[1], rows)
    with pytest.raises(ValueError, match="start_ce has 2 rows"):
        Calibrator(model, forget, held, h0, 1.1, 1.0, 1e-3, 1e-2, 4, 4, 3, 2, 24, pad, CPU, start_ce=rows[:2])


def test_an_over_budget_check_restores_without_measuring_the_signal(tiny_tok, monkeypatch):
    """A main-run check over the budget is restored whatever its forget signal: the signal is not measured
    (``signal`` None in the curve), the best state stays, a back-off is counted; a check within the budget measures
    the signal once."""
    model, forget, _, held = world(tiny_tok)
    pad = tiny_tok.pad_token_id
    ctl = Calibrator(model, forget, held, 1.0, 1.10, 100.0, 1e-4, 1e-2, 4, 4, 3, 2, 100, pad, CPU)
    ctl._start_main(0, 1e-3)
    best = ctl.best
    calls: list[int] = []
    monkeypatch.setattr(ctl, "_signal", lambda: calls.append(1) or ctl.start_signal + 1.0)
    monkeypatch.setattr(ctl, "_utility", lambda: 1.5 * 1.10)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert ctl.after_step(ctl.next_check, opt) is False
    assert ctl.curve[-1]["signal"] is None and calls == [] and ctl.best is best and ctl.backoffs == 1
    monkeypatch.setattr(ctl, "_utility", lambda: 1.05)
    assert ctl.after_step(ctl.next_check, opt) is False
    s = ctl.start_signal + 1.0
    assert ctl.curve[-1]["signal"] == s and calls == [1] and ctl.best["signal"] == s and ctl.best["step"] > 0


def test_ratio_of_is_the_perplexity_ratio_and_never_raises():
    from rapidun.steps import ratio_of

    assert ratio_of(1.0, 1.5) == pytest.approx(math.exp(0.5))
    assert ratio_of(1.0, 1e6) == math.inf and ratio_of(1.0, math.nan) == math.inf  # exp would overflow / NaN
