"""Corpus-scale tracing throughput: prints JSON.

1. Sketching: corpus records per second through :func:`rapidun.influence.engine.sketch_records` (batched
   per-sample gradients + RapidGrad + cache writes) on the real default model, Dolly-sample records at the demo's
   length (``--max-length 72``, prompt ≤ 44 tokens), into a fresh cache.
2. Retrieval: corpus records per second streamed from a cache of ``K``-long fp16 sketches against ``--probes``
   probe sketches (:func:`rapidun.trace.stream.stream_scores`, running top-k), at each ``--sizes`` corpus size,
   each in its own child process so its peak resident memory is its own (sampled every 10 ms). The sketches are
   random (retrieval cost does not depend on their values).
3. Projection to Alpaca's 52k and to 1M records from the measured rates: sketching and retrieval hours, cache size
   on disk, and retrieval memory (the measured peak at the largest size + 25 bytes per extra record: the
   per-record state of the streaming retrieval).

Usage: python benchmarks/trace.py [--n 32] [--sizes 2000 8000] [--probes 10] [--K 65536] [--skip-sketch]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

AGG_BYTES = 25  # stream_scores state per record: sum float64, max float32, seen bool, count int64, mean float32


def sketch_rate(n: int, max_length: int, K: int, batch: int) -> dict:
    from rapidun.config import InfluenceConfig, ModelConfig
    from rapidun.data.records import load_records
    from rapidun.influence.engine import cache_meta, open_cache, prepare, sketch_records
    from rapidun.influence.sketch import RapidGrad

    mcfg = ModelConfig(max_length=max_length, max_prompt_tokens=44, system_prompt="")
    icfg = InfluenceConfig(K=K, batch_size=batch)
    model, tok, pset, info = prepare("default", mcfg, icfg)
    recs = load_records("dolly-sample", limit=n)
    proj = RapidGrad(pset.dim, K, icfg.seed, icfg.rounds)
    with tempfile.TemporaryDirectory() as d:
        meta = cache_meta("default", mcfg, icfg, pset, [])
        sketch_records(model, tok, pset, proj, open_cache(meta, Path(d) / "w"), recs[:batch], mcfg, icfg)  # warm-up
        cache = open_cache(meta, Path(d) / "c")
        t0 = time.perf_counter()
        st = sketch_records(model, tok, pset, proj, cache, recs, mcfg, icfg)
        wall = time.perf_counter() - t0
    return {
        "records": n,
        "max_length": max_length,
        "D": pset.dim,
        "K": K,
        "batch": batch,
        "device": info["device"],
        "wall_s": wall,
        "records_per_s": n / wall,
        "grad_s": st["grad_s"],
        "sketch_s": st["sketch_s"],
        "write_s": st["write_s"],
    }


def _retrieval_child(n: int, K: int, q: int, k: int, folder: str, res: mp.Queue) -> None:
    from rapidun.influence.cache import SketchCache
    from rapidun.memory import PeakMemory, rss_mb
    from rapidun.trace.stream import stream_scores

    torch.manual_seed(0)
    cache = SketchCache(Path(folder), {"K": K, "bench": n})
    ids = [f"r{i}" for i in range(n)]
    for s in range(0, n, 256):  # written shard by shard, never the whole corpus in memory
        cache.add(ids[s : s + 256], torch.randn(min(256, n - s), K) / K**0.5)
    cache = SketchCache(Path(folder), {"K": K, "bench": n})  # reopened: nothing of the writes stays resident
    probes = torch.randn(q, K) / K**0.5
    start = rss_mb()
    t0 = time.perf_counter()
    with PeakMemory(interval=0.01, device="cpu") as mem:  # retrieval runs on the CPU
        stream_scores(cache.iter_rows(ids), probes, n, k)
    dt = time.perf_counter() - t0
    res.put({"records": n, "s": dt, "records_per_s": n / dt, "start_mb": start, "peak_mb": mem.peak_mb})


def retrieval(n: int, K: int, q: int, k: int) -> dict:
    ctx = mp.get_context("spawn")
    res = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        p = ctx.Process(target=_retrieval_child, args=(n, K, q, k, d, res))
        p.start()
        out = res.get()
        p.join()
    out["peak_minus_start_mb"] = out["peak_mb"] - out["start_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="records sketched")
    ap.add_argument("--max-length", type=int, default=72)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--K", type=int, default=2**16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="corpus sizes for retrieval")
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--skip-sketch", action="store_true")
    args = ap.parse_args()
    out: dict = {"threads": torch.get_num_threads()}
    if not args.skip_sketch:
        out["sketch"] = sketch_rate(args.n, args.max_length, args.K, args.batch)
    out["retrieval"] = [retrieval(n, args.K, args.probes, args.top_k) for n in args.sizes]
    big = out["retrieval"][-1]
    rate_r = min(r["records_per_s"] for r in out["retrieval"])
    proj = {}
    for name, n in (("alpaca_52k", 52_002), ("1M", 1_000_000)):
        p = {
            "retrieval_h": n / rate_r / 3600,
            "cache_gib": n * args.K * 2 / 2**30,
            "retrieval_peak_mb": big["peak_mb"] + (n - big["records"]) * AGG_BYTES / 2**20,
        }
        if "sketch" in out:
            p["sketch_h"] = n / out["sketch"]["records_per_s"] / 3600
        proj[name] = p
    out["projection"] = proj
    out["note"] = (
        f"retrieval_peak_mb: measured peak at the largest size + {AGG_BYTES} bytes per extra record (the per-record "
        "state of stream_scores: sum float64, max float32, seen bool, count int64, mean float32)"
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
