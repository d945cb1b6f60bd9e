"""The calibrated schedule: unlearning that picks its own rate and stops within a utility budget.

A fixed learning rate does nothing on one model and breaks another (SPEC's lr 6e-5 barely moves the 135M demo
model; the demo's 5e-4 costs Gemma-3-270m 1.68x perplexity). :class:`Calibrator` drives
:func:`rapidun.train.unlearn_loop` instead, from two measurements taken every few steps on the model itself:

* the **utility ratio** ``u = exp(h − h₀)``: ``h`` the token-weighted answer CE (``Σ NLL / Σ tokens``, so ``exp(h)``
  is :func:`rapidun.eval.metrics.perplexity`) of held-out clean records the run never trains on, ``h₀`` the start
  model's; the budget is ``u ≤ unlearn.utility_budget`` (1.10: perplexity at most 10% above the start model's,
  the matched-utility rule of the studies);
* the **forget signal** ``s = mean_i [CE(response_i) − CE(replacement_i)]`` over the forget records (nats per
  token; a record without a replacement answer uses ``h₀`` in its place: how much less likely than text the model
  never saw). The target is ``s ≥ unlearn.calibrate_target``.

Phases (deterministic for a seed: the draws are those of the fixed schedule, in order):

1. **Range probe.** The rate climbs a geometric ladder from ``calibrate_lr_min`` to ``calibrate_lr_max`` (×√10 a
   rung), ``ceil(calibrate_probe_draws / batch)`` steps a rung, measuring the utility ratio after each rung. The
   steps are real training steps (nothing is thrown away unless the budget is crossed). The first rung whose
   state crosses the budget (or whose loss is not finite) ends the probe: the model goes back to the last state
   within the budget, whose forget signal is measured then, and the previous rung's rate becomes the cap on the
   main run's rate.
2. **Main run, paced.** Cosine segments over the remaining steps, measured every ``ceil(calibrate_every / batch)``
   steps. The utility cost is modelled as quadratic in the distance travelled from the start model (a minimum of
   its clean loss): ``log u ≈ c·D²`` with ``D = Σ rate`` over the steps taken since the start, less those a
   restore threw away (Adam's step is about
   the rate in size). Each check measures the curvature ``c = log u / D²`` and starts a new segment whose peak
   travels the distance left to the aim ``log u = AIM·log budget``: from the state's measured ``log u``,
   ``ΔD = √(D² + (AIM·log budget − log u)/c) − D`` and ``r = 2·ΔD/R`` (a cosine over ``R`` steps sums to
   ``r·R/2``), at most the probe's last good rate (past the aim, ``calibrate_lr_min·1e-3``: the run holds). The
   first curvature is the probe's crossing rung's when that crossing is mild (``u ≤ budget²``), else the last good
   rung's (a blow-up is not quadratic); a main-run check at ``u ≤ 1`` (no curvature) keeps the last one.
   (A cost linear in the rate fits worse: in one demo run ``Δ log u / Σ rate`` rose from 1.2 to 10 while ``c``
   stayed within 170–270; ``c`` still varies 2–4× within a run, which the re-estimate at every check and the
   back-offs absorb.) The best state
   within the budget (highest ``s``) is kept; a check over the budget restores it and halves the cap
   (**back-off**, at most ``calibrate_max_backoffs`` times); the run stops early when ``s`` reaches the target.
3. The model ends in the best state within the budget (at worst the start state: an adapter of zeros).

Every choice (rate, steps, back-offs, the measured curve, the time spent measuring) is returned by
:meth:`Calibrator.record` and lands in result.json and the receipt.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from rapidun.data.template import Encoded
from rapidun.errors import RapidunError
from rapidun.steps import UItem, answer_tokens, eval_ce, ratio_of, token_weighted

__all__ = ["AIM", "GROWTH", "Calibrator", "forget_signal", "make_calibrator", "rate_ladder", "signal_sample"]

GROWTH = 2.0  # a paced segment's peak is at most this × the previous segment's
AIM = 0.9  # the pacing aims at log u = AIM·log budget (u ≈ 1.09 for 1.10): a margin for the model's misfit


def rate_ladder(lr_min: float, lr_max: float) -> list[float]:
    """Geometric rates ``lr_min·10^(k/2)`` up to ``lr_max`` (included as the last rung).

    >>> [f"{r:.2g}" for r in rate_ladder(1e-4, 1e-2)]
    ['0.0001', '0.00032', '0.001', '0.0032', '0.01']
    """
    if not (0 < lr_min <= lr_max):
        raise ValueError(f"need 0 < lr_min <= lr_max, got {lr_min}, {lr_max}")
    out = [lr_min]
    while out[-1] * math.sqrt(10) < lr_max * (1 - 1e-9):
        out.append(out[-1] * math.sqrt(10))
    if out[-1] < lr_max:
        out.append(lr_max)
    return out


def forget_signal(ce_response: torch.Tensor, ce_replacement: torch.Tensor, h0: float) -> float:
    """``s = mean_i [CE(response_i) − r_i]``, ``r_i = CE(replacement_i)`` or ``h0`` where it is NaN (no replacement).

    Args:
        ce_response: (N_f,) mean answer CE of each forget record's response (the behaviour).
        ce_replacement: (N_f,) the same for its replacement answer, NaN where it has none.
        h0: the start model's mean held-out clean CE.
    """
    ref = torch.where(torch.isnan(ce_replacement), torch.full_like(ce_replacement, h0), ce_replacement)
    return float((ce_response - ref).mean())


def signal_sample(n: int, k: int, seed: int) -> list[int]:
    """The forget records whose signal the schedule measures: all ``n`` when ``k <= 0`` or ``k >= n``, else ``k`` of
    them drawn once without replacement for the run's seed (sorted; the same records at every check, so the checks
    of one run compare like with like).

    >>> signal_sample(5, 0, 42), signal_sample(5, 9, 42)
    ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    >>> len(signal_sample(40, 16, 42)), signal_sample(40, 16, 42) == signal_sample(40, 16, 42)
    (16, True)
    """
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


class Calibrator:
    """The controller :func:`rapidun.train.unlearn_loop` consults at every step (see the module docstring).

    Args:
        model: the PEFT model being trained (its trainable parameters are snapshotted and restored).
        forget: the forget samples (their response and replacement rows are scored).
        held: held-out clean rows (never trained on).
        h0: the start model's mean CE on ``held``.
        budget: the utility budget (``u ≤ budget``).
        target: the forget-signal target.
        lr_min, lr_max: the probe's ladder ends.
        probe_draws, every_draws: draws per probe rung / between main-run checks.
        max_backoffs: back-offs before the run stops.
        batch_size: draws per step. total_steps: the run's step budget.
        pad_id, device: for the measurements.
        start_signal: the start state's forget signal when the caller has measured it (the audit before the run);
            None: measured here.
        start_ce: (R,) each held-out row's mean answer CE under the start model when the caller has measured it
            (the collateral snapshot's pass); None: measured here. ``h₀`` of the utility ratio is its token-weighted
            mean.
        signal_idx: the indices of the forget records whose signal is measured (:func:`signal_sample`); None: all.
            ``start_signal``, when given, must be over the same records.
    """

    def __init__(
        self,
        model: Any,
        forget: list[UItem],
        held: list[Encoded],
        h0: float,
        budget: float,
        target: float,
        lr_min: float,
        lr_max: float,
        probe_draws: int,
        every_draws: int,
        max_backoffs: int,
        batch_size: int,
        total_steps: int,
        pad_id: int,
        device: torch.device,
        start_signal: float | None = None,
        start_ce: torch.Tensor | None = None,
        signal_idx: list[int] | None = None,
    ) -> None:
        if not held:
            raise ValueError("the calibrated schedule needs held-out clean records")
        self.model, self.held, self.h0, self.budget, self.target = model, held, h0, budget, target
        self.held_n = answer_tokens(held)
        self.signal_idx = list(range(len(forget))) if signal_idx is None else list(signal_idx)
        self.forget_total = len(forget)
        forget = [forget[i] for i in self.signal_idx]
        # The forget signal's rows: every response, then the replacements there are (one pass over both).
        self.sig_rows = [it.poisoned for it in forget] + [it.clean for it in forget if it.clean is not None]
        self.repl_idx = [k for k, it in enumerate(forget) if it.clean is not None]
        self.n_forget = len(forget)
        self.pad, self.device, self.total = pad_id, device, total_steps
        self.ladder = rate_ladder(lr_min, lr_max)
        self.probe_steps = max(1, math.ceil(probe_draws / batch_size))
        self.every = max(1, math.ceil(every_draws / batch_size))
        self.max_backoffs = max_backoffs
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.phase, self.rung, self.backoffs = "probe", 0, 0
        self.main_lr: float | None = None  # the current main-run segment's peak rate
        self.peak_lr = 0.0  # the highest segment peak of the main run
        self.cap: float = self.ladder[-1]  # the fastest rate the main run may use
        self.rung_curv: list[float | None] = []  # the curvature c = log u / D², measured on each probe rung
        self.disp = 0.0  # D: Σ rate over the steps on the path from the start state to the model now
        self.curv: float | None = None  # the curvature the pacing uses (the latest accepted measurement)
        self.main_start = 0
        self.next_check = self.probe_steps
        self.check_s = 0.0
        if start_ce is not None and len(start_ce) != len(held):
            raise ValueError(f"start_ce has {len(start_ce)} rows for {len(held)} held-out rows")
        # the start model's token-weighted held-out CE (the utility's reference), from the caller's pass when given
        self.h0_tok = token_weighted(start_ce, self.held_n) if start_ce is not None else self._held_ce()
        self.restored_steps = 0  # steps whose effect a restore threw away
        self._last_restore = 0
        self.reached = False
        self.stop_reason = "steps"
        self.curve: list[dict[str, Any]] = []
        # The start state: u = 1 by definition (the adapter is zero); s from the caller's audit when given.
        s = self._signal() if start_signal is None else start_signal
        self.curve.append({"step": 0, "lr": 0.0, "phase": "start", "utility_ratio": 1.0, "signal": s})
        self.best = {"step": 0, "utility_ratio": 1.0, "signal": s, "disp": 0.0, "state": self._snapshot()}
        self.start_signal = s

    # -- what the loop asks ---------------------------------------------------------------------------------
    def rate(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        if self.phase == "probe":
            return self.ladder[self.rung]
        span = max(1, self.total - self.main_start)
        frac = min(1.0, (step - self.main_start) / span)
        return float(self.main_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def after_step(self, done: int, opt: torch.optim.Optimizer) -> bool:
        """Called after ``done`` steps have been taken; measures when due. Returns True to stop the run.

        Probe checks measure the utility ratio only (the forget signal of the probe's last good state is measured
        once, when the probe ends); main-run checks measure the utility ratio, then the forget signal of a state
        within the budget (an over-budget state is restored, whatever its signal: ``signal`` None in the curve),
        and re-pace the rate (:meth:`_pace`).
        """
        self.disp += self.rate(done - 1)
        if done < self.next_check and done < self.total:
            return False
        lr = self.rate(done - 1)
        if self.phase == "probe":
            ratio = self._utility()
            within = math.isfinite(ratio) and ratio <= self.budget
            c = self._curvature(ratio)
            self.rung_curv.append(c)
            self.curve.append({"step": done, "lr": lr, "phase": "probe", "utility_ratio": ratio, "signal": None,
                               "curvature": c, "disp": self.disp})  # fmt: skip
            if within:  # training on: the latest state within the budget is the probe's best
                self.best = {"step": done, "utility_ratio": ratio, "signal": None, "disp": self.disp,
                             "state": self._snapshot()}  # fmt: skip
            if not within:
                self._restore(opt, done)
                self.cap = self.ladder[self.rung - 1] if self.rung > 0 else self.ladder[0] / 2
                # A mild crossing (u ≤ budget²) travelled farthest within the quadratic region: its curvature is the
                # best measured. A blow-up (on the demo: u 17.6 at 3e-3, c 8× the last good rung's) is not
                # quadratic: pace from the last good rung's curvature, and let a back-off correct it.
                last_good = self.rung_curv[-2] if self.rung > 0 else None
                return self._end_probe(done, c if self._mild(ratio, c) else last_good)
            if self.rung + 1 < len(self.ladder) and done < self.total:
                self.rung += 1
                self.next_check = done + self.probe_steps
                return False
            self.cap = self.ladder[self.rung]
            return self._end_probe(done, c)
        ratio = self._utility()
        within = math.isfinite(ratio) and ratio <= self.budget
        s = self._signal() if within else None  # an over-budget state is never kept: its signal decides nothing
        c = self._curvature(ratio)
        if c is not None:  # main-run checks are near the budget: their curvature is used as measured
            self.curv = c
        self.curve.append({"step": done, "lr": lr, "phase": "main", "utility_ratio": ratio, "signal": s,
                           "curvature": c, "disp": self.disp})  # fmt: skip
        if s is not None and s > self.best["signal"]:
            self.best = {"step": done, "utility_ratio": ratio, "signal": s, "disp": self.disp,
                         "state": self._snapshot()}  # fmt: skip
        if s is not None and s >= self.target:
            self.reached, self.stop_reason = True, "target"
            return True
        if not within:
            if self.backoffs >= self.max_backoffs:
                self.stop_reason = "backoffs"
                return True
            self.backoffs += 1
            self.cap = min(self.cap, float(self.main_lr) / 2)  # never again as fast as the rate that crossed
            self._restore(opt, done)
            ratio = self.best["utility_ratio"]
        self._pace(done, self.curv, ratio)  # a check with u ≤ 1 (no curvature) re-paces from the last usable one
        self.curve[-1]["next_lr"] = self.main_lr
        return False

    def _curvature(self, ratio: float) -> float | None:
        """The curvature ``c = log u / D²`` of the state now (``D`` = :attr:`disp`); None where it says nothing (no
        distance travelled, ``u ≤ 1``, or ``u`` not finite)."""
        if not (math.isfinite(ratio) and ratio > 1.0 and self.disp > 0):
            return None
        return math.log(ratio) / self.disp**2

    def _mild(self, ratio: float, c: float | None) -> bool:
        """Whether a measured curvature is usable: measured (not None) at ``u ≤ budget²``. Past that the utility has
        blown up (on the demo: u 17.6 at 3e-3, c 8× the rung before) and the quadratic model does not hold."""
        return c is not None and ratio <= self.budget**2

    def _pace(self, done: int, c: float | None, ratio: float) -> None:
        """Start a cosine segment at ``done`` that travels the distance left to the aim ``log u = AIM·log budget``.

        Under the model ``log u = c·D²``, from the state now (distance :attr:`disp` ``= D``, measured ``log u``) the
        aim is reached after ``ΔD = √(D² + (AIM·log budget − log u)/c) − D`` more; a cosine from peak ``r`` over
        the ``R`` remaining steps travels ``r·R/2``, so ``r = 2·ΔD/R`` — at most :attr:`cap` (the fastest rate
        the probe found within the budget, halved at each back-off) and at most :data:`GROWTH` × the last
        segment's peak; past the aim, the slowest rate ``calibrate_lr_min·1e-3`` (the run holds its state). Without a
        curvature (``c`` None or ≤ 0: none usable measured yet) the rate grows by :data:`GROWTH`. ``ratio``: the
        utility ratio ``u`` of the state the run goes on from.
        """
        steps = max(1, self.total - done)
        log_u = math.log(ratio) if math.isfinite(ratio) and ratio > 0 else math.inf
        if c is not None and c > 0:
            d2 = self.disp**2 + (AIM * math.log(self.budget) - log_u) / c
            r = 2.0 * max(0.0, math.sqrt(max(0.0, d2)) - self.disp) / steps
        else:
            r = math.inf
        if self.main_lr:  # the cost per unit of rate grows with the rate: at most double the last segment's peak
            r = min(r, GROWTH * float(self.main_lr))
        self._start_main(done, max(min(float(self.cap), r), self.ladder[0] * 1e-3))

    def _end_probe(self, done: int, c: float | None) -> bool:
        """The probe is over: the model is in its best state; measure that state's forget signal and pace the main
        run from the probe's curvature ``c`` (True: the target is already reached, or no steps are left)."""
        if c is not None:
            self.curv = c
        if self.best["signal"] is None:
            self.best["signal"] = self._signal()
            self.curve.append({"step": self.best["step"], "lr": 0.0, "phase": "probe_end",
                               "utility_ratio": self.best["utility_ratio"], "signal": self.best["signal"]})  # fmt: skip
        self._pace(done, c, self.best["utility_ratio"])
        self.curve[-1]["next_lr"] = self.main_lr  # the first segment's peak
        if self.best["signal"] >= self.target:
            self.reached, self.stop_reason = True, "target"
            return True
        return done >= self.total

    def diverged(self, done: int, opt: torch.optim.Optimizer) -> bool:
        """A non-finite loss or gradient before step ``done``: treated as a budget crossing. True: stop."""
        self.curve.append({"step": done, "lr": self.rate(done), "phase": self.phase, "utility_ratio": None,
                           "signal": None, "non_finite": True})  # fmt: skip
        if self.phase == "probe":
            self._restore(opt, done)
            self.cap = self.ladder[self.rung - 1] if self.rung > 0 else self.ladder[0] / 2
            return self._end_probe(done, self.rung_curv[-1] if self.rung_curv else None)
        if self.backoffs >= self.max_backoffs:
            self.stop_reason = "backoffs"
            return True
        self.backoffs += 1
        self.cap = min(self.cap, float(self.main_lr) / 2)
        self._restore(opt, done)
        self._pace(done, self.curv, self.best["utility_ratio"])
        return False

    def finish(self) -> dict[str, Any]:
        """Put the model in the best state within the budget; the record of every choice."""
        with torch.no_grad():
            for p, v in zip(self.params, self.best["state"], strict=True):
                p.copy_(v)
        return self.record()

    def record(self) -> dict[str, Any]:
        """What the schedule chose and measured (JSON-ready)."""
        return {
            "schedule": "calibrated",
            "budget": self.budget,
            "target": self.target,
            "h0": self.h0,  # record-mean held-out CE (the forget signal's reference without a replacement)
            "h0_token_weighted": self.h0_tok,  # the utility ratio's reference
            "ladder": self.ladder,
            "aim": AIM,
            "curvature": self.curv,  # the latest measured c of log u = c·D²
            "probe_steps_per_rung": self.probe_steps,
            "check_every_steps": self.every,
            "chosen_lr": self.main_lr if self.main_lr is not None else self.ladder[self.rung],  # the last segment's
            "peak_lr": self.peak_lr,  # the highest peak of the main run's segments that took a step (0: none)
            "rate_cap": self.cap,
            "ended_in": self.phase,  # "probe": the run ended (target or steps) before the probe finished
            "backoffs": self.backoffs,
            "best_step": self.best["step"],
            "best_utility_ratio": self.best["utility_ratio"],
            "best_signal": self.best["signal"],
            "start_signal": self.start_signal,
            "signal_records": self.signal_idx,  # the forget records the signal is measured on (indices)
            "forget_records": self.forget_total,
            "reached_target": self.reached,
            "stop_reason": self.stop_reason,
            "restored_steps": self.restored_steps,
            "check_s": self.check_s,
            "curve": self.curve,
        }

    # -- internals ------------------------------------------------------------------------------------------
    def _start_main(self, done: int, lr: float) -> None:
        self.phase, self.main_lr, self.main_start = "main", lr, done
        if done < self.total:  # a segment paced at the last check has no steps: it is never used
            self.peak_lr = max(self.peak_lr, lr)
        self.next_check = done + self.every

    def _held_ce(self) -> float:
        """Token-weighted held-out answer CE ``Σ_i n_i·ce_i / Σ_i n_i`` of the model now (train mode restored)."""
        t = time.perf_counter()
        was_training = self.model.training
        ce = eval_ce(self.model, self.held, self.pad, self.device).double()
        if was_training:
            self.model.train()
        self.check_s += time.perf_counter() - t
        return token_weighted(ce, self.held_n)

    def _utility(self) -> float:
        """The utility ratio ``u = exp(h − h₀)`` of the model now."""
        return ratio_of(self.h0_tok, self._held_ce())

    def _signal(self) -> float:
        """The forget signal ``s`` of the model now (train mode restored afterwards)."""
        t = time.perf_counter()
        was_training = self.model.training
        ce = eval_ce(self.model, self.sig_rows, self.pad, self.device)  # responses, then replacements: one pass
        ce_resp = ce[: self.n_forget]
        ce_repl = torch.full_like(ce_resp, math.nan)
        if self.repl_idx:
            ce_repl[self.repl_idx] = ce[self.n_forget :]
        if was_training:
            self.model.train()
        self.check_s += time.perf_counter() - t
        s = forget_signal(ce_resp, ce_repl, self.h0)
        return s if math.isfinite(s) else -math.inf

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def _restore(self, opt: torch.optim.Optimizer, done: int) -> None:
        """Back to the best state; the optimiser's moments are cleared (they belong to the abandoned path)."""
        with torch.no_grad():
            for p, v in zip(self.params, self.best["state"], strict=True):
                p.copy_(v)
        opt.state.clear()
        self.disp = self.best["disp"]
        self.restored_steps += done - max(self.best["step"], self._last_restore)
        self._last_restore = done


def make_calibrator(
    model: Any,
    forget: list[UItem],
    held: list[Any],
    h0: float,
    u: Any,
    pad: int,
    device: torch.device,
    start_audit: tuple[torch.Tensor, torch.Tensor] | None = None,
    start_ce: torch.Tensor | None = None,
) -> Calibrator:
    """The calibrated schedule's controller for one run (:mod:`rapidun.calibrate`), from the ``unlearn`` settings.

    The step budget is the fixed schedule's (``epochs × draws_per_epoch / batch_size`` steps). The forget signal is
    measured on at most ``u.calibrate_signal_records`` forget records (:func:`signal_sample` for ``u.seed``).

    Args:
        start_audit: ``(ce_response, ce_replacement)``, (N_f,) each (NaN: no replacement), the start model's
            per-record forget CE when the caller has measured it (the audit before the run): the start signal is
            taken from it over the sampled records. None: measured here.
        start_ce: see :class:`Calibrator`.
    """
    if u.calibrate_lr_min > u.calibrate_lr_max:
        raise RapidunError(
            f"unlearn.calibrate_lr_min ({u.calibrate_lr_min:g}) must be <= unlearn.calibrate_lr_max "
            f"({u.calibrate_lr_max:g})"
        )
    total = math.ceil(u.epochs * u.draws_per_epoch / u.batch_size)
    idx = signal_sample(len(forget), u.calibrate_signal_records, u.seed)
    s0 = None if start_audit is None else forget_signal(start_audit[0][idx], start_audit[1][idx], h0)
    return Calibrator(
        model, forget, held, h0, u.utility_budget, u.calibrate_target, u.calibrate_lr_min, u.calibrate_lr_max,
        u.calibrate_probe_draws, u.calibrate_every, u.calibrate_max_backoffs, u.batch_size, total, pad, device,
        s0, start_ce, idx,
    )  # fmt: skip
