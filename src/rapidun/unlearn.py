"""The unlearning stage: influence views → weights → weighted LoRA unlearning → adapter, weights, audit.

One function per step, each timed (never a constant):

1. :func:`rapidun.views.method_views` — the four directional views FF, FR, RF, RR (``[train, test]``) of
   forget+retain on forget+retain at the poisoned model (RapidIn sketches, or exact inner products), cached in the
   run folder.
2. :func:`method_weights` — per-sample weights for a method: RapidUn (:func:`rapidun.weighting.rapidun_weights`),
   uniform, ``random`` (RapidUn's permuted within each group), ``coverage``
   (:func:`rapidun.weighting.coverage_weights`) or LoReUn (:func:`loreun_weights`). A ``sampling="weighted"``
   method turns them into draw probabilities instead (importance sampling, loss weights 1).
3. :func:`unlearn` — a fresh LoRA adapter on the poisoned model trained by :func:`rapidun.train.unlearn_loop`
   (or Fisher noise), then per-sample losses before/after for the audit table, the adapter saved in PEFT
   format, ``weights.jsonl`` keyed by sample id, and the signal diagnostics (:mod:`rapidun.diagnostics`); on up
   to :data:`HELDOUT_CHECK` held-out clean records, the perplexity ratio (``heldout``: token-weighted CE,
   ``Σ NLL / Σ tokens``, before and after) and the collateral damage against the start model (``collateral``:
   replacement rate, answer agreement, KL; :mod:`rapidun.eval.collateral`), each with its warning.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from rapidun.calibrate import make_calibrator
from rapidun.config import RunConfig, to_dict
from rapidun.constants import HELDOUT_CHECK
from rapidun.data.records import Record
from rapidun.data.template import encode_records, format_prompt
from rapidun.diagnostics import cell_diagnostics
from rapidun.distributed import is_main
from rapidun.errors import RapidunError
from rapidun.eval.collateral import collateral_warning, compare_with_start, start_snapshot
from rapidun.io import atomic_path, write_json, write_jsonl
from rapidun.methods import Method, get_method
from rapidun.methods.fisher import fisher_forget
from rapidun.models import attach_lora, fingerprint, load_model, resolve_model_path
from rapidun.receipt import NAME as RECEIPT
from rapidun.receipt import make_receipt
from rapidun.steps import UItem, answer_tokens, eval_ce, ratio_of, row_stats, token_weighted
from rapidun.train import NonFiniteLoss, unlearn_loop, use_autocast
from rapidun.unlearn_variants import distill_run, dynamic_refresh
from rapidun.unlearn_warnings import collateral_fix, forget_change_warning, heldout_warning
from rapidun.views import VIEWS, influence_views, make_items, split_views
from rapidun.weighting import coverage_weights, rapidun_weights

__all__ = ["VIEWS", "influence_views", "loreun_weights", "make_items", "method_weights", "split_views", "unlearn"]


def loreun_weights(
    ce_forget: torch.Tensor, tau: float, w_min: float, w_max: float, reverse: bool = False
) -> torch.Tensor:
    """LoReUn weights from the forget losses: ``w ∝ exp(−ℓ/τ)`` (``reverse``: ``exp(+ℓ/τ)``, the authors' variant).

    ``w ← w / mean(w)``, clipped to ``[w_min, w_max]``, divided by its mean again (mean 1). ``ℓ`` is shifted by
    its minimum (or maximum) first, which leaves the normalised weights unchanged and avoids overflow.

    Args:
        ce_forget: (N_f,) per-sample CE of the poisoned answers.

    Returns:
        (N_f,) float64 weights.
    """
    if tau <= 0:
        raise RapidunError(f"unlearn.loreun_tau must be > 0, got {tau}")
    ell = ce_forget.double()
    z = (ell - ell.max()) / tau if reverse else -(ell - ell.min()) / tau
    w = torch.exp(z)
    w = (w / w.mean()).clamp(w_min, w_max)
    return w / w.mean()


def method_weights(
    method: Method, n_forget: int, n_retain: int, rapidun: dict[str, Any] | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_forget (N_f,), w_retain (N_r,)) for weight sources fixed before training (LoReUn is computed in
    :func:`unlearn`, from the model)."""
    if method.weights in ("uniform", "loreun", "loreun_dynamic", "loreun_hard_high"):
        return torch.ones(n_forget, dtype=torch.float64), torch.ones(n_retain, dtype=torch.float64)
    if rapidun is None:
        raise RapidunError(f"method {method.name!r} needs the RapidUn weights (influence views)")
    wf, wr = rapidun["w_forget"].double(), rapidun["w_retain"].double()
    if method.weights == "coverage":  # ``rapidun`` holds the coverage forget weights; retain weights stay 1
        wr = torch.ones(n_retain, dtype=torch.float64)
    if method.weights == "random":
        gen = torch.Generator().manual_seed(seed)
        wf = wf[torch.randperm(len(wf), generator=gen)]
        wr = wr[torch.randperm(len(wr), generator=gen)]
    return wf, wr


def audit_losses(
    model: Any, forget: list[UItem], retain: list[UItem], pad_id: int, device: torch.device
) -> dict[str, list[float | None]]:
    """Per-sample mean answer CE under the poisoned and the clean answers (None where a sample has no such answer)."""
    items = forget + retain
    p_rows = [(k, it.poisoned) for k, it in enumerate(items) if it.poisoned is not None]
    c_rows = [(k, it.clean) for k, it in enumerate(items) if it.clean is not None]
    out: dict[str, list[float | None]] = {"ce_poisoned": [None] * len(items), "ce_clean": [None] * len(items)}
    for name, rows in (("ce_poisoned", p_rows), ("ce_clean", c_rows)):
        ce = eval_ce(model, [e for _, e in rows], pad_id, device)
        for (k, _), v in zip(rows, ce.tolist(), strict=True):
            out[name][k] = v
    return out


@torch.no_grad()
def reference_logp(
    model: Any, forget: list[UItem], pad_id: int, device: torch.device, autocast: bool = False
) -> torch.Tensor:
    """(N_f,) summed log-probability of each poisoned answer with the adapter disabled (NPO's reference).

    ``autocast``: compute under the same bf16 autocast as the training loop, so that log π_θ − log π_ref is 0 at
    the start instead of a rounding difference summed over the answer.
    """
    model.eval()
    with model.disable_adapter(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = [
            row_stats(model, [it.poisoned for it in forget[s : s + 16]], pad_id, device)[1].float().cpu()
            for s in range(0, len(forget), 16)
        ]
    return torch.cat(out)


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def unlearn_shared(
    method_name: str,
    parts: dict[str, list[Record]],
    model_path: str,
    cfg: RunConfig,
    out: Path | None,
    views: dict[str, Any] | None,
    shared: dict[str, Any],
    provenance: dict[str, Any] | None = None,
    audit: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`unlearn` for one cell of a comparison: ``shared`` (one dict for all its cells) keeps the start
    model's per-sample losses (``shared["losses"]``, :func:`unlearn`'s ``before``) and held-out snapshot
    (``shared["start"]``, its ``start_cache``), taken by the first cell that runs and reused by the next.
    ``cover``'s losses are those of its own, grown packs, so it reads but never stores them; a run that skipped
    them (``audit=False``) has none to store."""
    model, tok, res = unlearn(method_name, parts, model_path, cfg, out, views, shared.get("losses"),
                              provenance=provenance, start_cache=shared.setdefault("start", {}),
                              audit=audit)  # fmt: skip
    if not get_method(method_name).expand and res["audit_before"] is not None:
        shared["losses"] = res["audit_before"]
    return model, tok, res


def unlearn(
    method_name: str,
    parts: dict[str, list[Record]],
    model_path: str,
    cfg: RunConfig,
    out: Path | None,
    views: dict[str, Any] | None = None,
    before: dict[str, list[float | None]] | None = None,
    provenance: dict[str, Any] | None = None,
    start_cache: dict[str, Any] | None = None,
    audit: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """Run one method on the scenario's forget/retain packs starting from ``model_path`` (the poisoned model).

    Args:
        method_name: a registered method (not ``retrain``, which is the SFT reference).
        parts: scenario splits; uses ``forget``, ``retain``, (Fisher) ``val_clean`` and (``cover``) ``train_poisoned``,
            ``train_clean``, ``val_seen_trig`` (:mod:`rapidun.cover`).
        model_path: the poisoned model.
        cfg: the run config (``unlearn``, ``weighting``, ``influence``, ``model``).
        out: folder for ``adapter/``, ``weights.jsonl``, ``audit.jsonl``, ``result.json`` (None: write nothing).
        views: :func:`rapidun.views.method_views` output of the method's ``views`` kind (influence methods).
        before: the start model's per-sample losses (``result["audit_before"]`` of an earlier call on the same
            model and packs), to skip recomputing them.
        provenance: for ``receipt.json``: ``start`` (what the start model is: base, adapter, fingerprints),
            ``packs`` (how the packs were built) and ``previous`` (earlier receipts); defaults describe
            ``model_path`` alone.
        start_cache: a dict shared by the runs of one comparison: the start model's held-out CE and collateral
            snapshot (greedy answers, top-K distribution) are taken once, kept in it under a key of the model
            path, the held-out ids and the settings they depend on, and reused by the next run (25 s a cell on
            the demo).
        audit: measure every forget and retain record's loss before and after (``audit.jsonl``, ``audit_means``,
            the forget-change warning). False skips both passes — for a caller that scores the model itself
            (TOFU: 100–200 s a cell on two CPU cores) — except ``before`` where the method reads it (LoReUn's
            weights, the calibrated schedule); skipped losses are None and ``result["audit_before"]`` is None.

    Returns:
        ``(model, tokenizer, result)``: the unlearned model (adapter merged, in memory, eval mode) and the
        result dict (timings, weights summary, loss curve, audit means).
    """
    method = get_method(method_name)
    if method.kind == "retrain":
        raise RapidunError("'retrain' is the SFT reference model, built by `rapidun run`, not an unlearning run")
    u = cfg.unlearn
    timings: dict[str, float] = {}
    cover = None
    if method.expand:  # cover: the packs grow by what tracing the corpus flags, so earlier losses do not apply
        from rapidun.cover import cover_parts

        parts, cover = cover_parts(parts, model_path, cfg)
        timings["cover_s"], before = cover["time_s"], None
    t = time.perf_counter()
    model, tok, info = load_model(model_path, cfg.model.device, cfg.model.dtype)
    device = torch.device(info["device"])
    forget, retain = make_items(tok, parts["forget"], parts["retain"], cfg)
    pad = tok.pad_token_id
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n_items = len(forget) + len(retain)
    reused = {"losses": before is not None and len(before["ce_clean"]) == n_items}
    needs_before = audit or method.weights.startswith("loreun") or u.schedule == "calibrated"
    if not reused["losses"] and needs_before:
        before = audit_losses(model, forget, retain, pad, device)
    measured_before = before if (reused["losses"] or needs_before) else None
    if measured_before is None:
        before = {"ce_poisoned": [None] * n_items, "ce_clean": [None] * n_items}
    timings["audit_before_s"] = time.perf_counter() - t
    held_recs = parts.get("val_clean", [])[:HELDOUT_CHECK]  # never trained on: the run's utility check
    held_pairs = [(r.id, e) for r, e in zip(held_recs, encode_records(tok, held_recs, cfg.model)[0], strict=True)
                  if any(x != -100 for x in e.labels)]  # fmt: skip
    held = [e for _, e in held_pairs]
    kept = {i for i, _ in held_pairs}
    held_prompts = [format_prompt(tok, r.instruction, r.context, cfg.model.system_prompt)
                    for r in held_recs if r.id in kept]  # fmt: skip
    t = time.perf_counter()
    ckey = [model_path, sorted(kept), cfg.eval.batch_size, cfg.model.max_length, cfg.model.max_prompt_tokens,
            cfg.model.system_prompt, cfg.model.dtype]  # fmt: skip
    reused["snapshot"] = start_cache is not None and start_cache.get("key") == ckey
    if reused["snapshot"]:
        held_before, start_snap = start_cache["held_before"], start_cache["snapshot"]
    else:
        start_snap = start_snapshot(model, tok, held_prompts, held, cfg.eval.batch_size) if held else None
        held_before = float(start_snap["ce"].mean()) if start_snap is not None else None  # eval_ce's, same pass
        if start_cache is not None:
            start_cache.update(key=ckey, held_before=held_before, snapshot=start_snap)
    timings["collateral_s"] = time.perf_counter() - t  # greedy answers + top-K distribution of the start model

    weight_info: dict[str, Any] = {}
    t = time.perf_counter()
    rw = None
    if method.needs_influence:
        if views is None:
            raise RapidunError(f"method {method_name!r} needs the influence views; compute them with influence_views")
        if views["forget_ids"] != [it.id for it in forget] or views["retain_ids"] != [it.id for it in retain]:
            raise RapidunError(
                "the influence views were computed for other forget/retain packs (ids or order differ); "
                "recompute them with influence_views on this scenario"
            )
        rw = rapidun_weights(views["FF"], views["FR"], views["RF"], views["RR"], cfg.weighting)
        if method.weights == "coverage":
            rw |= coverage_weights(views["FF"], cfg.weighting)
        weight_info = {k: float(rw[k]) for k in rw if k.startswith(("sat_", "center_", "scale_"))}
    w_f, w_r = method_weights(method, len(forget), len(retain), rw, u.seed)
    if method.weights.startswith("loreun"):
        ce_p = torch.tensor(before["ce_poisoned"][: len(forget)], dtype=torch.float64)
        w_f = loreun_weights(ce_p, u.loreun_tau, u.loreun_w_min, u.loreun_w_max, method.weights == "loreun_hard_high")
    p_f = p_r = None
    if method.sampling == "weighted":  # importance sampling: draws ∝ w, every loss weight 1 (uniform's dose)
        p_f, p_r = w_f / w_f.sum(), w_r / w_r.sum()
    scored_f, scored_r = w_f, w_r  # the influence-derived weights, for the diagnostics
    if p_f is not None:
        w_f, w_r = torch.ones_like(w_f), torch.ones_like(w_r)
    timings["mapping_s"] = time.perf_counter() - t

    result: dict[str, Any] = {"method": method.name, "summary": method.summary, "device": info["device"]}
    if cover is not None:
        result["cover"] = cover
    if method.kind == "distill":

        def teach() -> tuple[Any, Any, dict[str, Any]]:
            return unlearn(u.distill_teacher, parts, model_path, cfg, None, views, measured_before, audit=audit)

        model, dres = distill_run(model, teach, retain, cfg, pad, device)
        timings["teacher_s"] = dres["teacher_s"]
        timings["training_s"] = dres["time_s"]
        result |= {"distill": dres, "train": dres["train"], "complete": dres["complete"]}
        if out is not None and is_main():
            with atomic_path(out / "adapter") as tmp:
                model.save_pretrained(tmp)
        merged = model.merge_and_unload()
    elif method.kind == "fisher":
        val, _ = encode_records(tok, parts.get("val_clean", []), cfg.model)
        fstats = fisher_forget(model, [it.clean for it in retain], val, pad, u)
        timings["training_s"] = fstats["time_s"]
        result["fisher"] = fstats
        merged = model
    else:
        model = attach_lora(model, u.lora_r, u.lora_alpha, u.lora_dropout, u.lora_targets, u.seed)
        ac = use_autocast(u.autocast, device)
        ref = reference_logp(model, forget, pad, device, ac) if method.forget_loss == "npo" else None
        refresh, every = None, 0
        if method.weights == "loreun_dynamic":
            poisoned_rows = [it.poisoned for it in forget]

            def refresh(m: Any) -> torch.Tensor:
                ce = eval_ce(m, poisoned_rows, pad, device)
                return loreun_weights(ce, u.loreun_tau, u.loreun_w_min, u.loreun_w_max)

            every = u.loreun_every
        elif method.dynamic:
            refresh, every = dynamic_refresh(forget, retain, pad, cfg), u.dynamic_every
        ctl = None
        if u.schedule == "calibrated" and held_before is not None:
            nf = len(forget)  # the start state's per-record forget CE, from the audit already measured
            start_losses = (torch.tensor(before["ce_poisoned"][:nf], dtype=torch.float32),
                            torch.tensor([math.nan if v is None else v for v in before["ce_clean"][:nf]],
                                         dtype=torch.float32))  # fmt: skip
            ctl = make_calibrator(model, forget, held, held_before, u, pad, device, start_losses, start_snap["ce"])
        elif u.schedule == "calibrated":
            result["calibration"] = {"schedule": "fixed", "reason": "no held-out clean records to calibrate on"}
            result["schedule_note"] = (
                "unlearn.schedule=calibrated needs held-out clean records (a --retain file larger than the buffer, or "
                f"the scenario's val_clean); none here, so the fixed schedule ran at unlearn.lr={u.lr:g}"
            )
        try:
            stats = unlearn_loop(
                model, forget, retain, u, method.forget_loss, method.retain, w_f, w_r, pad, device,
                ref_logp=ref, refresh=refresh, refresh_every=every, desc=f"unlearn:{method.name}",
                p_forget=p_f, p_retain=p_r, robust=method.robust, controller=ctl,
            )  # fmt: skip
            result["complete"] = True
        except NonFiniteLoss as e:
            stats = e.stats
            result["complete"] = False
            result["stopped"] = str(e)
        timings["training_s"] = stats["time_s"]
        result["train"] = stats
        if "calibration" in stats:
            result["calibration"] = stats["calibration"]
            timings["calibration_check_s"] = stats["calibration"]["check_s"]  # inside training_s
        if out is not None and is_main():
            with atomic_path(out / "adapter") as tmp:
                model.save_pretrained(tmp)
        merged = model.merge_and_unload()
    merged.eval()
    t = time.perf_counter()
    if audit:
        after = audit_losses(merged, forget, retain, pad, device)
    else:
        after = {"ce_poisoned": [None] * n_items, "ce_clean": [None] * n_items}
    timings["audit_after_s"] = time.perf_counter() - t

    infl_s = float(views["stats"]["total_s"]) if (views is not None and method.needs_influence) else 0.0
    timings["influence_s"] = infl_s
    if views is not None and method.needs_influence and "train" in views["stats"]:  # sketches, retrieval
        st = views["stats"]
        parts_ = [g for g in ("train", "test", "test_retain") if g in st]
        timings["influence_caching_s"] = sum(st[g][k] for g in parts_ for k in ("grad_s", "sketch_s", "write_s"))
        # Sketches found in the cache from an earlier (e.g. interrupted) run; the test pass over the same samples
        # reuses the train pass's sketches of this run, which is not a reuse from before.
        timings["influence_sketches_reused"] = st["train"]["cached"] + (
            st["test"]["cached"] if "test_retain" in st else 0
        )
        timings["influence_retrieval_s"] = float(st["retrieval_s"])
    timings["time_s"] = infl_s + timings["mapping_s"] + timings["training_s"] + timings.get("teacher_s", 0.0)
    timings["time_s"] += timings.get("cover_s", 0.0)  # cover: the tracing that chose its pack
    result["timings"] = timings
    result["influence_cached"] = bool(views.get("cached")) if (views is not None and method.needs_influence) else None
    result["weights"] = {
        "forget": _summary(w_f),
        "retain": _summary(w_r),
        **weight_info,
    }
    if p_f is not None:
        result["weights"]["sampling"] = {"forget": _summary(p_f * len(p_f)), "retain": _summary(p_r * len(p_r))}
    result["weight_vectors"] = {"forget": scored_f.tolist(), "retain": scored_r.tolist()}
    result["diagnostics"] = cell_diagnostics(
        parts["forget"], forget, scored_f, scored_r, result.get("train"), u.grad_clip,
        views.get("grad_norm") if (views is not None and method.needs_influence) else None,
        views.get("diag") if (views is not None and method.needs_influence) else None,
    )  # fmt: skip
    nf = len(forget)
    result["audit_before"] = measured_before
    result["audited"] = audit
    result["start_reused"] = reused  # the start model's losses / held-out snapshot came from an earlier run
    result["audit_means"] = {
        "forget_ce_poisoned_before": _mean(before["ce_poisoned"][:nf]),
        "forget_ce_poisoned_after": _mean(after["ce_poisoned"][:nf]),
        "forget_ce_clean_before": _mean(before["ce_clean"][:nf]),
        "forget_ce_clean_after": _mean(after["ce_clean"][:nf]),
        "retain_ce_before": _mean(before["ce_clean"][nf:]),
        "retain_ce_after": _mean(after["ce_clean"][nf:]),
    }
    if start_snap is not None and held_before is not None:  # both or neither (held-out records given)
        # collateral damage (the held-out prompts' answers against the start model's) and, from its KL pass, the
        # held-out loss after
        t = time.perf_counter()
        reps = [r.meta["response_clean"] for r in parts["forget"] if r.meta.get("response_clean")]
        ids = [i for i, _ in held_pairs]
        result["collateral"], _, ce_after = compare_with_start(merged, tok, start_snap, held_prompts, held, reps,
                                                               ids, cfg.eval.batch_size)  # fmt: skip
        timings["collateral_s"] += time.perf_counter() - t
        # token-weighted (Σ NLL / Σ tokens), as the calibrated schedule's utility ratio and perplexity() measure it
        n_tok = answer_tokens(held)
        tw_before, tw_after = token_weighted(start_snap["ce"], n_tok), token_weighted(ce_after, n_tok)
        result["heldout"] = {
            "n": len(held),
            "ids": ids,
            "tokens": int(n_tok.sum()),
            "ce_before": tw_before,
            "ce_after": tw_after,
            "ppl_ratio": ratio_of(tw_before, tw_after),
        }
    calibrated = (result.get("calibration") or {}).get("schedule") == "calibrated"
    warns = [
        forget_change_warning(
            result["audit_means"], u.lr, result.get("complete", True), method.kind, result.get("calibration")
        ),
        heldout_warning(result.get("heldout"), u.lr, method.kind, u.utility_budget, calibrated),
        collateral_warning(result.get("collateral"), collateral_fix(u.lr, method.kind, calibrated)),
    ]
    result["warnings"] = [w for w in warns if w] + ([result["schedule_note"]] if "schedule_note" in result else [])
    if out is not None and is_main():
        prov = provenance or {}
        start = prov.get("start") or {"model": model_path, "fingerprint": fingerprint(resolve_model_path(model_path))}
        receipt = make_receipt(
            method=method.name,
            start=start,
            forget=parts["forget"], retain=parts["retain"],
            config={k: to_dict(getattr(cfg, k)) for k in ("model", "unlearn", "weighting", "influence")},
            seed=u.seed,
            measured={"audit_means": result["audit_means"], "heldout": result.get("heldout"),
                      "collateral": result.get("collateral"), "timings": timings, "warnings": result["warnings"]},
            complete=bool(result.get("complete", True)), packs=prov.get("packs"), previous=prov.get("previous"),
        )  # fmt: skip
        result["receipt"] = RECEIPT
        write_json(out / RECEIPT, receipt)
        if (out / "adapter").is_dir():
            write_json(out / "adapter" / RECEIPT, receipt)
        rows = _audit_rows(forget, retain, rw, scored_f, scored_r, before, after)  # sampled: draw weights
        write_jsonl(out / "weights.jsonl", ({"id": r["id"], "group": r["group"], "weight": r["weight"]} for r in rows))
        write_jsonl(out / "audit.jsonl", rows)
        write_json(out / "result.json", result)
    return merged, tok, result


def _summary(w: torch.Tensor) -> dict[str, float]:
    w = w.double()
    if len(w) == 0:
        return {"n": 0}
    return {
        "n": len(w),
        "min": float(w.min()),
        "median": float(w.median()),
        "max": float(w.max()),
        "mean": float(w.mean()),
        "std": float(w.std()) if len(w) > 1 else 0.0,
    }


def _f(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _audit_rows(
    forget: list[UItem],
    retain: list[UItem],
    rw: dict[str, Any] | None,
    w_f: torch.Tensor,
    w_r: torch.Tensor,
    before: dict[str, list],
    after: dict[str, list],
) -> list[dict[str, Any]]:
    """One row per sample, keyed by id: the four aggregated scores, S, z, weight, losses before/after."""
    rows = []
    nf = len(forget)
    for k, it in enumerate(forget + retain):
        is_f = k < nf
        j = k if is_f else k - nf
        g = "forget" if is_f else "retain"
        row: dict[str, Any] = {"id": it.id, "group": g}
        for v in VIEWS:
            mine = (v[0] == "F") == is_f  # FF, FR belong to forget samples; RF, RR to retain samples
            row[v] = _f(rw[v][j]) if (rw is not None and mine) else None
        row["S"] = _f(rw[f"S_{g}"][j]) if rw is not None else None
        row["z"] = _f(rw[f"z_{g}"][j]) if rw is not None else None
        row["weight"] = float((w_f if is_f else w_r)[j])
        for name in ("ce_poisoned", "ce_clean"):
            row[f"{name}_before"] = before[name][k]
            row[f"{name}_after"] = after[name][k]
        rows.append(row)
    return rows
