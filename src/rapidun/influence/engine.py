"""The influence engine: batched per-sample gradients → RapidGrad sketches (cached) → influence matrices.

Influence(train i, test j) = ⟨P(g_i), P(g_j)⟩ (TracIn-style, single checkpoint), where g is the gradient of a
sample's mean answer-token loss at the given model w.r.t. the chosen parameter set (SPEC §2 steps 2–5) and P the
RapidGrad sketch. Token-wise mode ("hotwords") restricts the *test* loss to the tokens of chosen words.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rapidun.config import InfluenceConfig, ModelConfig, to_dict
from rapidun.data.records import Record
from rapidun.data.template import FORMAT_VERSION, collate, encode_records
from rapidun.distributed import barrier, broadcast, gather_dicts, is_main, rank_world
from rapidun.errors import RapidunError
from rapidun.influence.cache import SketchCache
from rapidun.influence.grads import ParamSet, has_answer, per_sample_grads, restrict_labels, select_params
from rapidun.influence.retrieval import influence_matrix, topk
from rapidun.influence.sketch import RapidGrad
from rapidun.io import fault_point, stable_hash
from rapidun.models import attach_lora, cache_root, fingerprint, load_model, resolve_model_path


def prepare(model_name: str, mcfg: ModelConfig, icfg: InfluenceConfig) -> tuple[Any, Any, ParamSet, dict]:
    """Load the model, attach the influence adapter when needed, select the parameter set."""
    model, tok, info = load_model(model_name, mcfg.device, mcfg.dtype)
    if icfg.param_set == "lora" and not any("lora_" in n for n, _ in model.named_parameters()):
        # A fresh adapter has B = 0: only the B matrices get gradient, i.e. the full weight gradient seen
        # through the random A (a random low-rank projection of it). An existing trained adapter is used as is.
        model = attach_lora(model, icfg.lora_r, icfg.lora_r, 0.0, icfg.lora_targets, icfg.seed)
    model.eval()
    pset = select_params(model, icfg.param_set, icfg.param_regex or None)
    return model, tok, pset, info


def hotword_ids(tok: Any, words: list[str]) -> set[int]:
    """Token ids of ``words`` as they appear inside text (with and without a leading space, any case given)."""
    ids: set[int] = set()
    for w in words:
        for form in (w, " " + w, w.capitalize(), " " + w.capitalize()):
            ids.update(tok(form, add_special_tokens=False)["input_ids"])
    # A form the vocabulary lacks becomes <unk> (tokenizers without byte fallback); <unk> is never a hotword.
    ids.discard(getattr(tok, "unk_token_id", None))
    return ids


def cache_meta(model_path: str, mcfg: ModelConfig, icfg: InfluenceConfig, pset: ParamSet, hot: list[str]) -> dict:
    """What a cached sketch means; any change here gives a different cache."""
    return {
        "model": fingerprint(model_path),
        "param_set": icfg.param_set,
        "param_regex": icfg.param_regex,
        "lora_r": icfg.lora_r,
        "lora_targets": icfg.lora_targets,
        "D": pset.dim,
        "K": icfg.K,
        "seed": icfg.seed,
        "rounds": icfg.rounds,
        "normalize": icfg.normalize,
        "hotwords": sorted(hot),
        "max_length": mcfg.max_length,
        "max_prompt_tokens": mcfg.max_prompt_tokens,
        "system_prompt": mcfg.system_prompt,
        "format": FORMAT_VERSION,
    }


def open_cache(meta: dict, folder: str | Path | None = None) -> SketchCache:
    """The sketch cache for ``meta`` (default: ``$RAPIDUN_CACHE/sketches/<hash of meta>``)."""
    folder = Path(folder) if folder else cache_root() / "sketches" / stable_hash(meta)
    return SketchCache(folder, meta)


def cache_key(r: Record) -> str:
    """A record's key in a sketch cache: its id plus a hash of its content, so an edited record with the same
    id (e.g. a rebuilt scenario with new poison text) is recomputed, never served a stale sketch."""
    return f"{r.id}#{stable_hash(r.to_json(), 12)}"


BLOCK_RECORDS = 256  # records per write block: a crash loses at most one block, rank 0 holds one block of sketches


def sketch_records(
    model: Any,
    tok: Any,
    pset: ParamSet,
    proj: RapidGrad,
    cache: SketchCache | None,
    records: list[Record],
    mcfg: ModelConfig,
    icfg: InfluenceConfig,
    hot: set[int] | None = None,
    desc: str = "sketch",
) -> dict[str, Any]:
    """Compute and cache the sketches of the records not yet in ``cache``. Returns measured statistics.

    Work goes in blocks of about :data:`BLOCK_RECORDS` records (a whole number of batches per rank); each block is
    written to the cache as soon as it is done, so a killed run resumes at the last finished block and memory
    holds one block, whatever the corpus size. Under ``torchrun`` every rank computes whole batches of a block
    (rank r: batches r, r+W, ...) and rank 0, the only process that touches the cache (``cache`` is None
    elsewhere), writes them in the single-process order. Samples with no answer tokens (possible only in
    token-wise mode) get a zero sketch and are counted.
    """
    rank, world = rank_world()
    todo = set(broadcast(cache.missing([cache_key(r) for r in records]) if cache is not None else None))
    recs = [r for r in records if cache_key(r) in todo]
    device = next(model.parameters()).device
    stats = {
        "computed": len(recs),
        "cached": len(records) - len(recs),
        "no_answer_tokens": 0,
        "grad_s": 0.0,
        "sketch_s": 0.0,
        "write_s": 0.0,
        "ranks": world,
    }
    if not recs:
        return stats
    per_block = icfg.batch_size * world * max(1, -(-BLOCK_RECORDS // (icfg.batch_size * world)))
    bar = tqdm(total=len(recs), desc=desc, unit="sample", mininterval=2.0, disable=rank != 0)
    try:  # the bar is closed (its line ended) even when a write fails, so an error message starts a line
        trunc_total: dict[str, int] = {}
        for b0 in range(0, len(recs), per_block):
            block = recs[b0 : b0 + per_block]
            enc, trunc = encode_records(tok, block, mcfg)
            for k, v in trunc.items():
                trunc_total[k] = trunc_total.get(k, 0) + v
            starts = list(range(0, len(block), icfg.batch_size))
            mine: dict[int, tuple[list[str], torch.Tensor, int]] = {}
            shown = 0
            for s in starts[rank::world]:
                fault_point("influence:batch")
                batch = collate(enc[s : s + icfg.batch_size], tok.pad_token_id).to(device)
                if hot is not None:
                    batch.labels = restrict_labels(batch.labels, hot)
                empty = int((~has_answer(batch.labels)).sum())
                t0 = time.perf_counter()
                G = per_sample_grads(model, batch, pset, normalize=icfg.normalize)  # (B, D)
                t1 = time.perf_counter()
                S = proj.project(G)  # (B, K)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stats["grad_s"] += t1 - t0
                stats["sketch_s"] += time.perf_counter() - t1
                mine[s] = ([cache_key(r) for r in block[s : s + icfg.batch_size]], S.cpu(), empty)
                step = min(len(mine[s][0]) * world, len(block) - shown)  # every rank does about as much as rank 0
                bar.update(step)
                shown += step
            everything = gather_dicts(mine)
            if cache is not None:
                t0 = time.perf_counter()
                ids = [i for s in starts for i in everything[s][0]]
                cache.add(ids, torch.cat([everything[s][1] for s in starts]))  # (len(block), K)
                stats["write_s"] += time.perf_counter() - t0
            stats["no_answer_tokens"] += sum(v[2] for v in everything.values())
            bar.update(len(block) - shown)
            barrier()
    finally:
        bar.close()
    stats["truncation"] = trunc_total
    return stats


def influence(
    model_name: str,
    train: list[Record],
    test: list[Record],
    mcfg: ModelConfig,
    icfg: InfluenceConfig,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Influence of every ``train`` record on every ``test`` record.

    Sketches are cached under ``cache_dir/<hash of meta>`` (default ``$RAPIDUN_CACHE/sketches``, shared by every
    run); ``stats[..]["cached"]`` counts the sketches that were reused rather than computed.

    Returns ``{"matrix": (N, Q) tensor, "train_ids", "test_ids", "topk": rows, "stats": measured timings}``.
    """
    if not train or not test:
        raise RapidunError(f"influence needs non-empty sets (got {len(train)} train, {len(test)} test records)")
    t0 = time.perf_counter()
    path = resolve_model_path(model_name)
    model, tok, pset, info = prepare(path, mcfg, icfg)
    proj = RapidGrad(pset.dim, icfg.K, icfg.seed, icfg.rounds, device=next(model.parameters()).device)
    load_s = time.perf_counter() - t0
    stats: dict[str, Any] = {"load_s": load_s, "D": pset.dim, "params": len(pset.names), "device": info["device"]}
    hot = hotword_ids(tok, icfg.hotwords) if icfg.hotwords else None
    main = is_main()  # only rank 0 opens and writes the caches

    def cache_for(hot_words: list[str]) -> SketchCache:
        meta = cache_meta(path, mcfg, icfg, pset, hot_words)
        return open_cache(meta, Path(cache_dir) / stable_hash(meta) if cache_dir else None)

    train_cache = cache_for([]) if main else None
    stats["train"] = sketch_records(model, tok, pset, proj, train_cache, train, mcfg, icfg, None, "sketch:train")
    test_cache = train_cache
    if hot is not None:
        test_cache = cache_for(icfg.hotwords) if main else None
    stats["test"] = sketch_records(model, tok, pset, proj, test_cache, test, mcfg, icfg, hot, "sketch:test")
    t1 = time.perf_counter()
    M = None
    if main:
        A = train_cache.load([cache_key(r) for r in train])  # (N, K)
        B = test_cache.load([cache_key(r) for r in test])  # (Q, K)
        M = influence_matrix(A, B, icfg.mode)  # (N, Q)
    M = broadcast(M)
    stats["retrieval_s"] = time.perf_counter() - t1
    stats["total_s"] = time.perf_counter() - t0
    train_ids, test_ids = [r.id for r in train], [r.id for r in test]
    return {
        "matrix": M,
        "train_ids": train_ids,
        "test_ids": test_ids,
        "topk": topk(M, icfg.top_k, train_ids, test_ids),
        "stats": stats,
        "config": to_dict(icfg),
    }


def exact_grads(
    model: Any, tok: Any, pset: ParamSet, records: list[Record], mcfg: ModelConfig, icfg: InfluenceConfig
) -> torch.Tensor:
    """(n, D) float32 per-sample gradients of ``records`` (no sketch), batched."""
    enc, _ = encode_records(tok, records, mcfg)
    device = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(enc), icfg.batch_size), desc="exact grads", unit="batch", mininterval=2.0):
        batch = collate(enc[s : s + icfg.batch_size], tok.pad_token_id).to(device)
        out.append(per_sample_grads(model, batch, pset, normalize=icfg.normalize))  # (B, D)
    return torch.cat(out)  # (n, D)
