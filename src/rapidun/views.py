"""The influence views an influence-weighted method needs: FF, FR, RF, RR (``[train, test]``), one way or another.

* :func:`influence_views` — RapidIn: sketched inner products of the SFT-loss gradients at the poisoned model
  (SPEC §2 steps 2–6), what ``rapidun`` uses.
* :func:`exact_views` — exact inner products (no sketch) for one gradient adapter and one objective
  (:mod:`rapidun.influence.exact`): ``"sft"`` (what the sketches estimate) or ``"aligned"`` (the gradients of the
  unlearning losses themselves).
* :func:`method_views` — the views of a method's ``views`` kind: ``sketch``; ``stable`` (exact, averaged over
  ``influence.stable_adapters`` adapters); ``aligned`` (exact, the unlearning objective). Sketch views also carry
  the sketched-vs-exact diagnostic on the seed's own adapter.

Sign convention of the aligned views. RapidUn's fusion ``S_forget = α·FF − β·FR``, ``S_retain = γ·RR − δ·RF``
treats FR and RF as *harm*. With SFT gradients ``⟨∇CE_poison(i), ∇CE(j)⟩ > 0`` means ascent on forget sample i
raises retain sample j's loss: harm. With aligned gradients the same inner product means a step on i *lowers* j's
loss: help. So the aligned FR and RF are negated (``FR = −⟨g_f, g_r⟩``) to keep the fusion's meaning; with
``descent_beta = 0`` the aligned views then equal the exact SFT views (tested).

Every builder caches its matrix in the run folder keyed by content, and reports its measured time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from rapidun.config import RunConfig, to_dict
from rapidun.data.records import Record
from rapidun.data.template import encode, format_prompt
from rapidun.distributed import is_main
from rapidun.errors import RapidunError
from rapidun.influence.engine import influence, prepare
from rapidun.influence.exact import gram, objective_grads
from rapidun.io import atomic_path, read_json, stable_hash, write_json
from rapidun.models import fingerprint, resolve_model_path
from rapidun.stats import pearson, spearman
from rapidun.steps import UItem
from rapidun.weighting import rapidun_weights

VIEWS = ("FF", "FR", "RF", "RR")
VIEW_KINDS = ("sketch", "stable", "aligned")
ADAPTER_STRIDE = 1000  # adapter k of the stable views uses influence.seed + 1000·k (apart from other seeds' ones)


def make_items(tok: Any, forget: list[Record], retain: list[Record], cfg: RunConfig) -> tuple[list[UItem], list[UItem]]:
    """Encode the packs with the one prompt format: forget → poisoned answer (+ clean when known), retain → clean."""
    m = cfg.model

    def enc(r: Record, answer: str) -> Any:
        prompt = format_prompt(tok, r.instruction, r.context, m.system_prompt)
        return encode(tok, prompt, answer, m.max_length, m.max_prompt_tokens)

    f_items = [
        UItem(
            r.id,
            "forget",
            enc(r, r.response),
            enc(r, r.meta["response_clean"]) if r.meta.get("response_clean") else None,
        )
        for r in forget
    ]
    r_items = [UItem(r.id, "retain", None, enc(r, r.response)) for r in retain]
    return f_items, r_items


def split_views(M: torch.Tensor, n_forget: int) -> dict[str, torch.Tensor]:
    """Slice the (N_f+N_r, N_f+N_r) matrix of forget+retain (train) × forget+retain (test) into FF, FR, RF, RR."""
    f = slice(0, n_forget)
    r = slice(n_forget, M.shape[0])
    return {"FF": M[f, f], "FR": M[f, r], "RF": M[r, f], "RR": M[r, r]}


def influence_views(
    model_path: str, forget: list[Record], retain: list[Record], cfg: RunConfig, folder: Path | None = None
) -> dict[str, Any]:
    """The four directional views at the poisoned model, reused from ``folder`` when inputs are unchanged.

    Influence of train = forget+retain against test = forget+retain gives all four views (every sample's sketch is
    computed once). Token-wise mode (``influence.hotwords``) restricts the test loss of the *forget* samples only
    (retain answers hold no poison words: restricted, their test gradients would be zero). Sketches are cached
    in ``folder/sketches`` (this run only, so the measured time is the real cost; a resumed run reuses what it
    already computed and counts it in ``stats[..]["cached"]``). A reuse of the whole views keeps the originally
    measured timings and says so (``cached: True``).

    Returns:
        ``{"FF", "FR", "RF", "RR": float32 tensors [train, test], "forget_ids", "retain_ids", "stats",
        "cached"}``; ``stats["total_s"]`` is the measured influence stage time (load, sketches, retrieval).
    """
    if not forget or not retain:
        raise RapidunError(f"influence views need forget and retain samples (got {len(forget)} and {len(retain)})")
    path = resolve_model_path(model_path)
    key = stable_hash(
        {
            "model": fingerprint(path),
            "influence": to_dict(cfg.influence),
            "model_cfg": to_dict(cfg.model),
            "forget": [r.to_json() for r in forget],
            "retain": [r.to_json() for r in retain],
        }
    )
    if folder is not None and (folder / "views.json").is_file() and read_json(folder / "views.json")["key"] == key:
        meta = read_json(folder / "views.json")
        M = torch.load(folder / "views.pt", weights_only=True)
        return {
            **split_views(M, len(forget)),
            **{k: meta[k] for k in ("forget_ids", "retain_ids", "stats")},
            "cached": True,
        }
    recs = forget + retain
    sketches = folder / "sketches" if folder is not None else None
    if cfg.influence.hotwords:
        plain = dataclasses.replace(cfg.influence, hotwords=[])
        rf = influence(path, recs, forget, cfg.model, cfg.influence, sketches)  # forget test loss on hotwords
        rr = influence(path, recs, retain, cfg.model, plain, sketches)
        M = torch.cat([rf["matrix"], rr["matrix"]], dim=1).float().cpu()  # (N_f+N_r, N_f+N_r)
        stats = {**rf["stats"], "test_retain": rr["stats"]["test"]}
        for k in ("load_s", "retrieval_s", "total_s"):
            stats[k] = rf["stats"][k] + rr["stats"][k]
    else:
        res = influence(path, recs, recs, cfg.model, cfg.influence, sketches)
        M = res["matrix"].float().cpu()  # (N_f+N_r, N_f+N_r)
        stats = res["stats"]
    out = {"forget_ids": [r.id for r in forget], "retain_ids": [r.id for r in retain], "stats": stats}
    if folder is not None and is_main():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "views.pt") as tmp:
            torch.save(M, tmp)
        write_json(folder / "views.json", {"key": key, **out})
    return {**split_views(M, len(forget)), **out, "cached": False}


def exact_views(
    model_path: str,
    forget: list[Record],
    retain: list[Record],
    cfg: RunConfig,
    objective: str,
    adapter_seed: int,
    folder: Path | None = None,
) -> dict[str, Any]:
    """Exact influence matrix of forget+retain on forget+retain for one gradient adapter and ``objective``.

    The adapter is a fresh LoRA seeded with ``adapter_seed`` (or the model's own adapter, as
    :func:`rapidun.influence.engine.prepare`); ``objective`` is ``"sft"`` or ``"aligned"``
    (:func:`rapidun.influence.exact.objective_grads`, with ``unlearn.ascent_alpha``/``descent_beta``).
    Cached in ``folder/<objective>-<adapter_seed>.pt`` (+ ``.json``) keyed by content.

    Returns:
        ``{"M": (N, N) float64 raw Gram matrix (no sign change), "grad_norm": (N,) raw gradient norms,
        "time_s": measured seconds (the original run's when cached), "cached": bool}``; forget rows first.
    """
    path = resolve_model_path(model_path)
    icfg = dataclasses.replace(cfg.influence, seed=adapter_seed)
    u = cfg.unlearn
    key = stable_hash(
        {
            "model": fingerprint(path),
            "influence": {k: v for k, v in to_dict(icfg).items() if k not in ("K", "rounds", "top_k", "hotwords")},
            "objective": objective,
            "loss": [u.ascent_alpha, u.descent_beta] if objective == "aligned" else None,
            "model_cfg": to_dict(cfg.model),
            "forget": [r.to_json() for r in forget],
            "retain": [r.to_json() for r in retain],
        }
    )
    stem = f"{objective}-{adapter_seed}"
    if folder is not None and (folder / f"{stem}.json").is_file() and read_json(folder / f"{stem}.json")["key"] == key:
        meta = read_json(folder / f"{stem}.json")
        saved = torch.load(folder / f"{stem}.pt", weights_only=True)
        return {"M": saved["M"], "grad_norm": saved["grad_norm"], "time_s": meta["time_s"], "cached": True}
    t0 = time.perf_counter()
    model, tok, pset, _ = prepare(path, cfg.model, icfg)
    f_items, r_items = make_items(tok, forget, retain, cfg)
    G, norms = objective_grads(
        model, pset, [it.poisoned for it in f_items], [it.clean for it in f_items], [it.clean for it in r_items],
        tok.pad_token_id, objective, u.ascent_alpha, u.descent_beta, icfg.normalize, icfg.batch_size,
    )  # fmt: skip
    M = gram(G, icfg.mode)  # (N, N)
    del G, model
    took = time.perf_counter() - t0
    if folder is not None and is_main():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{stem}.pt") as tmp:
            torch.save({"M": M, "grad_norm": norms.double()}, tmp)
        write_json(folder / f"{stem}.json", {"key": key, "time_s": took, "objective": objective, "seed": adapter_seed})
    return {"M": M, "grad_norm": norms.double(), "time_s": took, "cached": False}


def sketch_vs_exact(sketched: torch.Tensor, exact: torch.Tensor, n_forget: int, cfg: RunConfig) -> dict[str, Any]:
    """How far the sketch moves the influence and the weights, on the run's own samples (same adapter).

    Returns Pearson r of the off-diagonal entries, the sketch's RMS error relative to the RMS of the exact
    off-diagonal entries, and Spearman ρ between the RapidUn scores ``S_forget``/``S_retain`` computed from each.
    """
    n = exact.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)  # (N, N)
    a, b = sketched.double()[off], exact.double()[off]  # (N·(N−1),)
    ws = rapidun_weights(**split_views(sketched.double(), n_forget), cfg=cfg.weighting)
    we = rapidun_weights(**split_views(exact.double(), n_forget), cfg=cfg.weighting)
    rms = float(b.pow(2).mean().sqrt())
    return {
        "offdiag_pearson": pearson(a.numpy(), b.numpy()),
        "offdiag_rel_rmse": float((a - b).pow(2).mean().sqrt()) / rms if rms > 0 else None,
        "S_forget_spearman": spearman(ws["S_forget"].numpy(), we["S_forget"].numpy()),
        "S_retain_spearman": spearman(ws["S_retain"].numpy(), we["S_retain"].numpy()),
    }


def method_views(
    kind: str, model_path: str, forget: list[Record], retain: list[Record], cfg: RunConfig, folder: Path | None
) -> dict[str, Any]:
    """The views of ``kind`` (``sketch``, ``stable``, ``aligned``; see the module docstring), as
    :func:`influence_views` returns them plus ``grad_norm`` (raw per-sample gradient norms, forget first) and
    ``diag`` (sketch: the sketched-vs-exact comparison, when ``influence.diagnostics``).

    ``folder`` holds the sketch views (``folder``) and the exact matrices (``folder/exact``).
    """
    if kind not in VIEW_KINDS:
        raise RapidunError(f"unknown influence view kind {kind!r}; choose one of {', '.join(VIEW_KINDS)}")
    if not forget or not retain:
        raise RapidunError(f"influence views need forget and retain samples (got {len(forget)} and {len(retain)})")
    nf = len(forget)
    exact_dir = folder / "exact" if folder is not None else None
    seed = cfg.influence.seed
    ids = {"forget_ids": [r.id for r in forget], "retain_ids": [r.id for r in retain]}
    if kind == "sketch":
        v = influence_views(model_path, forget, retain, cfg, folder)
        if not cfg.influence.diagnostics:
            return v
        ex = exact_views(model_path, forget, retain, cfg, "sft", seed, exact_dir)
        sketched = torch.cat(
            [torch.cat([v["FF"], v["FR"]], 1), torch.cat([v["RF"], v["RR"]], 1)], 0
        )  # (N, N) reassembled
        diag = sketch_vs_exact(sketched, ex["M"], nf, cfg) | {"exact_s": ex["time_s"]}
        return {**v, "grad_norm": ex["grad_norm"].tolist(), "diag": diag}
    if kind == "stable":
        runs = [
            exact_views(model_path, forget, retain, cfg, "sft", seed + ADAPTER_STRIDE * k, exact_dir)
            for k in range(max(1, cfg.influence.stable_adapters))
        ]
        M = torch.stack([r["M"] for r in runs]).mean(0)  # (N, N)
        norms = torch.stack([r["grad_norm"] for r in runs]).mean(0)  # (N,)
        total = sum(r["time_s"] for r in runs)
        cached = all(r["cached"] for r in runs)
        diag = {"adapters": len(runs)}
        if len(runs) > 1:  # how much one adapter's scores agree with another's
            w = [rapidun_weights(**split_views(r["M"], nf), cfg=cfg.weighting) for r in runs]
            diag["adapter_S_forget_spearman"] = spearman(w[0]["S_forget"].numpy(), w[1]["S_forget"].numpy())
            diag["adapter_S_retain_spearman"] = spearman(w[0]["S_retain"].numpy(), w[1]["S_retain"].numpy())
        views = split_views(M, nf)
    else:
        r = exact_views(model_path, forget, retain, cfg, "aligned", seed, exact_dir)
        views = split_views(r["M"], nf)
        views["FR"], views["RF"] = -views["FR"], -views["RF"]  # harm, as the fusion expects (module docstring)
        norms, total, cached, diag = r["grad_norm"], r["time_s"], r["cached"], {}
    stats = {"total_s": total, "exact": True, "kind": kind}
    return {**views, **ids, "stats": stats, "cached": cached, "grad_norm": norms.tolist(), "diag": diag}
