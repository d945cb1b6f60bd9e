"""Influence-engine throughput on the embedded default model (or --model): prints JSON.

Measures per-sample gradients as a batch-size-1 loop vs the batched hook+einsum path (samples/s), the RapidGrad
sketch time per sample, the sketch-cache write rate, and peak memory. Inputs are real Dolly-sample records.
Usage: python benchmarks/influence.py [--model default] [--n 16] [--batch 8] [--max-length 64] [--K 65536]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from rapidun.config import InfluenceConfig, ModelConfig
from rapidun.data.records import load_records
from rapidun.data.template import collate, encode_records
from rapidun.influence.cache import SketchCache
from rapidun.influence.engine import prepare
from rapidun.influence.grads import per_sample_grads, per_sample_grads_loop
from rapidun.influence.sketch import RapidGrad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--K", type=int, default=2**16)
    args = ap.parse_args()
    mcfg = ModelConfig(name=args.model, max_length=args.max_length, max_prompt_tokens=args.max_length // 2)
    icfg = InfluenceConfig(K=args.K, batch_size=args.batch)
    model, tok, pset, info = prepare(args.model, mcfg, icfg)
    recs = load_records("dolly-sample", limit=args.n)
    enc, _ = encode_records(tok, recs, mcfg)
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [collate(enc[s : s + args.batch], tok.pad_token_id).to(dev) for s in range(0, len(enc), args.batch)]
    per_sample_grads(model, batches[0], pset)  # warm-up
    res: dict = {
        "device": info["device"],
        "dtype": info["dtype"],
        "threads": torch.get_num_threads(),
        "D": pset.dim,
        "K": args.K,
        "n": len(enc),
        "batch": args.batch,
        "tokens_per_sample": sum(map(len, (e.input_ids for e in enc))) / len(enc),
    }
    for name, fn in (("loop", per_sample_grads_loop), ("batched", per_sample_grads)):
        sync()
        t0 = time.perf_counter()
        outs = [fn(model, b, pset) for b in batches]
        sync()
        res[f"{name}_samples_per_s"] = len(enc) / (time.perf_counter() - t0)
    G = torch.cat(outs)  # (n, D)
    ref = torch.cat([per_sample_grads_loop(model, batches[0], pset)])
    res["max_abs_diff_batched_vs_loop"] = float((G[: ref.shape[0]] - ref).abs().max())
    res["speedup_batched_vs_loop"] = res["batched_samples_per_s"] / res["loop_samples_per_s"]
    t0 = time.perf_counter()
    proj = RapidGrad(pset.dim, args.K, icfg.seed, icfg.rounds, device=dev)
    res["sketch_map_build_s"] = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    S = torch.cat([proj.project(G[s : s + args.batch]) for s in range(0, len(G), args.batch)])  # (n, K)
    sync()
    res["sketch_ms_per_sample"] = 1000 * (time.perf_counter() - t0) / len(G)
    res["sketch_share_of_gradient_time"] = (res["sketch_ms_per_sample"] / 1000) * res["batched_samples_per_s"]
    with tempfile.TemporaryDirectory() as d:
        cache = SketchCache(d, {"K": args.K, "bench": True})
        t0 = time.perf_counter()
        for s in range(0, len(S), args.batch):
            cache.add([r.id for r in recs[s : s + args.batch]], S[s : s + args.batch])
        res["cache_write_samples_per_s"] = len(S) / (time.perf_counter() - t0)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
