"""Trace a behaviour back to the training records that taught it (RapidIn's retrieval at corpus scale).

1. **Probes**: prompts with the bad outputs (the user's, or the model's own greedy generations). Optional
   token-wise mode: the probe loss is restricted to hotwords (given, or learned from the probe outputs against the
   corpus answers with the detector's z statistic, :func:`rapidun.eval.detector.score_keywords`).
2. **Corpus sketches**: per-record gradient sketches of the corpus at the model, computed once and cached in
   shards (:func:`rapidun.influence.engine.sketch_records`, resumable block by block, split across ``torchrun``
   ranks). They do not depend on the probes, so a new probe set costs only its own sketches.
3. **Retrieval**: the cached shards are streamed against the probe sketches (:func:`.stream.stream_scores`): per
   record the mean, max and top-k count of its influence over the probes; the ``(N, Q)`` matrix is never held.
4. **Evaluation** (when the culprits are known, e.g. a scenario's poisoned records): precision/recall@k and AP of
   the influence ranking and of three baselines: BM25 of the records' text against the probes', the records' own
   loss under the model (lowest first: a memorised pattern is fit unusually well), and random order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rapidun.config import EvalConfig, InfluenceConfig, ModelConfig, TraceConfig
from rapidun.data.records import Record, _iter_rows
from rapidun.data.template import encode_records, format_prompt
from rapidun.distributed import broadcast, is_main
from rapidun.errors import RapidunError
from rapidun.eval.detector import score_keywords
from rapidun.eval.generate import generate
from rapidun.influence.engine import cache_key, cache_meta, hotword_ids, open_cache, prepare, sketch_records
from rapidun.influence.sketch import RapidGrad
from rapidun.io import stable_hash
from rapidun.memory import PeakMemory, rss_mb
from rapidun.trace.metrics import bm25, retrieval_metrics
from rapidun.trace.stream import Scores, stream_scores

POOL_FACTOR = 4  # scenario probes: prompts asked per probe wanted (only answers showing the behaviour are kept)
RANDOM_DRAWS = 200  # random baseline: metrics averaged over this many seeded permutations


def load_trace_probes(path: str | Path, need_output: bool) -> list[Record]:
    """Read a probe file: ``prompt`` (or ``instruction``), optional ``context`` (or ``input``), ``output`` (or
    ``response``; required unless the outputs are generated) and optional ``id`` (default ``p<line>``).

    Raises:
        RapidunError: naming the file and line of a probe without a prompt or output, a repeated id, or an empty
            file.
    """
    p = Path(path)
    out: list[Record] = []
    seen: dict[str, int] = {}
    for line, row in _iter_rows(p):
        prompt = row.get("prompt", row.get("instruction"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise RapidunError(f"{path}:{line}: no prompt (field 'prompt' or 'instruction'); give the text asked")
        output = row.get("output", row.get("response"))
        if need_output and (not isinstance(output, str) or not output.strip()):
            raise RapidunError(
                f"{path}:{line}: no output (field 'output' or 'response'): give the bad output to trace, or pass "
                "--generate to use the model's own answer"
            )
        ctx = row.get("context", row.get("input")) or ""
        pid = str(row["id"]) if row.get("id") not in (None, "") else f"p{line}"
        if pid in seen:
            raise RapidunError(f"{path}:{line}: duplicate id {pid!r} (first on line {seen[pid]}); ids must be unique")
        seen[pid] = line
        out.append(
            Record(pid, prompt.strip(), output if isinstance(output, str) else "", ctx if isinstance(ctx, str) else "")
        )
    if not out:
        raise RapidunError(f"probe file {path} holds no probes")
    return out


def choose_probes(recs: list[Record], n: int, seed: int) -> list[Record]:
    """``n`` records stratified by ``meta["trigger_family"]``: shuffled (seeded) within each family, then taken
    round-robin over the families in sorted order."""
    rng = random.Random(seed)
    fams: dict[str, list[Record]] = {}
    for r in recs:
        fams.setdefault(str(r.meta.get("trigger_family", "")), []).append(r)
    for f in sorted(fams):
        rng.shuffle(fams[f])
    out: list[Record] = []
    while len(out) < min(n, len(recs)):
        for f in sorted(fams):
            if fams[f] and len(out) < n:
                out.append(fams[f].pop(0))
    return out


def scenario_inputs(parts: dict[str, list[Record]], tcfg: TraceConfig) -> tuple[list[Record], list[Record], list]:
    """A scenario's corpus (train_poisoned + train_clean), candidate probes (up to ``4 · trace.n_probes`` prompts of
    ``trace.probe_split`` in stratified order, outputs to be generated and kept where they show the behaviour) and
    the culprits' families (None for a clean record)."""
    corpus = parts.get("train_poisoned", []) + parts.get("train_clean", [])
    pool = parts.get(tcfg.probe_split, [])
    if not corpus or not pool:
        raise RapidunError(f"the scenario lacks train_poisoned/train_clean or {tcfg.probe_split} records to trace")
    # A pool of 4x the probes, in stratified order: the model is asked each prompt, and only answers that show the
    # behaviour become probes (a prompt it answers cleanly would trace the clean behaviour instead).
    chosen = choose_probes(pool, POOL_FACTOR * tcfg.n_probes, tcfg.seed)
    probes = [Record(r.id, r.instruction, "", r.context, dict(r.meta)) for r in chosen]
    poisoned = {r.id for r in parts.get("train_poisoned", [])}
    fams = [str(r.meta.get("trigger_family") or "poisoned") if r.id in poisoned else None for r in corpus]
    return corpus, probes, fams


def robust_cut(scores: np.ndarray, z: float) -> int:
    """How many records have a robust z-score ``(s − median) / (1.4826 · MAD)`` of at least ``z`` (0 when every
    score is equal)."""
    s = np.asarray(scores, dtype=np.float64)
    mad = 1.4826 * float(np.median(np.abs(s - np.median(s))))
    if mad <= 0:
        return 0
    return int(((s - np.median(s)) / mad >= z).sum())


def baselines(
    model: Any, tok: Any, corpus: list[Record], probes: list[Record], mcfg: ModelConfig
) -> dict[str, np.ndarray]:
    """Scores of the text and loss baselines, ``{"bm25": (N,), "loss": (N,)}`` (higher = more suspect)."""
    from rapidun.steps import eval_ce

    docs = [f"{r.instruction} {r.context} {r.response}" for r in corpus]
    queries = [f"{p.instruction} {p.context} {p.response}" for p in probes]
    text = bm25(docs, queries).mean(axis=1)  # (N,)
    enc, _ = encode_records(tok, corpus, mcfg)
    ce = eval_ce(model, enc, tok.pad_token_id, next(model.parameters()).device).numpy()  # (N,)
    return {"bm25": text, "loss": -ce.astype(np.float64)}


def random_metrics(families: Sequence[str | None], k: int, seed: int) -> dict[str, Any]:
    """Retrieval metrics of a random order, averaged over :data:`RANDOM_DRAWS` seeded permutations."""
    rng = np.random.default_rng(seed)
    runs = [retrieval_metrics(rng.permutation(len(families)).astype(float), families, k) for _ in range(RANDOM_DRAWS)]

    def avg(get: Any) -> float | None:
        vals = [get(r) for r in runs]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    out: dict[str, Any] = {key: avg(lambda r, key=key: r[key]) for key in ("precision_at_k", "recall_at_k", "auprc")}
    out.update({"k": k, "n": len(families), "n_culprits": runs[0]["n_culprits"], "draws": RANDOM_DRAWS})
    out["families"] = {
        f: {m: avg(lambda r, f=f, m=m: r["families"][f][m]) for m in ("recall_at_k", "auprc")} | {"n": v["n"]}
        for f, v in runs[0]["families"].items()
    }
    return out


def trace(
    model_path: str,
    corpus: list[Record],
    probes: list[Record],
    tcfg: TraceConfig,
    icfg: InfluenceConfig,
    mcfg: ModelConfig,
    ecfg: EvalConfig,
    generate_outputs: bool = False,
    families: Sequence[str | None] | None = None,
    cache_dir: str | Path | None = None,
    keep: Callable[[str], bool] | None = None,
    max_probes: int | None = None,
) -> dict[str, Any]:
    """Score every corpus record for the behaviour shown by ``probes`` (see the module docstring).

    Args:
        model_path: The model that shows the behaviour (a local folder).
        corpus: ``N`` training records (unique ids).
        probes: ``Q`` probes; ``response`` is the bad output (replaced by the model's greedy answer when
            ``generate_outputs``).
        tcfg, icfg, mcfg, ecfg: Config sections (trace, influence: gradient/sketch settings, model: format and
            truncation, eval: generation length and batch).
        generate_outputs: Use the model's own answers as the probe outputs; probes whose answer is empty, or not a
            hit by ``keep`` when given, are left out (listed in ``stats["dropped_probes"]``), and at most
            ``max_probes`` of the rest are kept, in their given order.
        families: ``N`` culprit families (None = innocent) when the culprits are known: adds the evaluation.
        cache_dir: Sketch cache root (default ``$RAPIDUN_CACHE/sketches``).

    Returns:
        ``{"scores": Scores (rank 0; None elsewhere), "probes": [Record], "hotwords": [str], "stats": {...},
        "evaluation": {...} | None}``.
    """
    if not corpus or not probes:
        raise RapidunError(f"trace needs a corpus and probes (got {len(corpus)} records, {len(probes)} probes)")
    t0 = time.perf_counter()
    model, tok, pset, info = prepare(model_path, mcfg, icfg)
    device = next(model.parameters()).device
    stats: dict[str, Any] = {"load_s": time.perf_counter() - t0, "D": pset.dim, "K": icfg.K, "device": info["device"]}
    if generate_outputs:
        t1 = time.perf_counter()
        prompts = [format_prompt(tok, p.instruction, p.context, mcfg.system_prompt) for p in probes]
        texts = generate(model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size, desc="trace:generate", shard=True)
        probes = [
            Record(p.id, p.instruction, t.strip(), p.context, dict(p.meta)) for p, t in zip(probes, texts, strict=True)
        ]
        stats["generate_s"] = time.perf_counter() - t1
    empty = [p.id for p in probes if not p.response.strip()]
    if empty and not generate_outputs:
        raise RapidunError(f"probes {empty[:5]} have an empty output; nothing to trace for them (drop them)")
    if generate_outputs:  # an answer that does not show the behaviour (or is empty) traces nothing: left out
        shown = [p for p in probes if p.response.strip() and (keep is None or keep(p.response))]
        stats["dropped_probes"] = [p.id for p in probes if p not in shown]
        probes = shown[:max_probes] if max_probes else shown
        if not probes:
            raise RapidunError(
                f"none of the {len(stats['dropped_probes'])} probe prompts made the model show the behaviour "
                "(empty answers, or none matched the hit rule); give probes with their bad outputs instead"
            )
    hot = list(tcfg.hotwords)
    if tcfg.auto_hotwords and not hot:
        hot = list(
            score_keywords([p.response for p in probes], [r.response for r in corpus], tcfg.n_hotwords, ecfg.min_z, 1.0)
        )
        if not hot:
            raise RapidunError("trace.auto_hotwords found no word typical of the probe outputs; give trace.hotwords")
    hot_ids = hotword_ids(tok, hot) if hot else None
    main = is_main()

    def cache_for(words: list[str]) -> Any:
        meta = cache_meta(model_path, mcfg, icfg, pset, words)
        return open_cache(meta, Path(cache_dir) / stable_hash(meta) if cache_dir else None) if main else None

    proj = RapidGrad(pset.dim, icfg.K, icfg.seed, icfg.rounds, device=device)
    corpus_cache = cache_for([])
    t1 = time.perf_counter()
    stats["corpus"] = sketch_records(model, tok, pset, proj, corpus_cache, corpus, mcfg, icfg, None, "trace:corpus")
    stats["corpus"]["wall_s"] = time.perf_counter() - t1
    probe_cache = cache_for(hot) if hot else corpus_cache
    t1 = time.perf_counter()
    stats["probes"] = sketch_records(model, tok, pset, proj, probe_cache, probes, mcfg, icfg, hot_ids, "trace:probes")
    stats["probes"]["wall_s"] = time.perf_counter() - t1
    scores: Scores | None = None
    evaluation = None
    if main:
        P = probe_cache.load([cache_key(p) for p in probes])  # (Q, K)
        t1 = time.perf_counter()
        before = rss_mb()
        with PeakMemory() as mem:
            scores = stream_scores(
                corpus_cache.iter_rows([cache_key(r) for r in corpus]), P, len(corpus), tcfg.top_k, icfg.mode
            )
        dt = time.perf_counter() - t1
        stats["retrieval"] = {
            "s": dt,
            "records_per_s": len(corpus) / dt if dt > 0 else None,
            "peak_mb": mem.peak_mb,
            "peak_kind": mem.kind,
            "start_mb": before,
            "shards": corpus_cache.shard_count([cache_key(r) for r in corpus]),
        }
        if families is not None:
            evaluation = evaluate(scores, families, tcfg, model, tok, corpus, probes, mcfg)
    stats["total_s"] = time.perf_counter() - t0
    scores = broadcast(scores)
    return {"scores": scores, "probes": probes, "hotwords": hot, "stats": stats, "evaluation": evaluation}


def evaluate(
    scores: Scores,
    families: Sequence[str | None],
    tcfg: TraceConfig,
    model: Any,
    tok: Any,
    corpus: list[Record],
    probes: list[Record],
    mcfg: ModelConfig,
) -> dict[str, Any]:
    """Retrieval metrics at ``k`` = the number of culprits, for each aggregate of the influence and each baseline."""
    k = sum(f is not None for f in families)
    if k == 0:
        raise RapidunError("trace evaluation needs at least one known culprit in the corpus")
    rankers: dict[str, np.ndarray] = {f"influence_{a}": scores.key(a).numpy() for a in ("mean", "max", "count")}
    if tcfg.baselines:
        t0 = time.perf_counter()
        rankers.update(baselines(model, tok, corpus, probes, mcfg))
        base_s = time.perf_counter() - t0
    out: dict[str, Any] = {name: retrieval_metrics(s, families, k) for name, s in rankers.items()}
    if tcfg.baselines:
        out["random"] = random_metrics(families, k, tcfg.seed)
        out["baselines_s"] = base_s
    return {"k": k, "primary": f"influence_{tcfg.aggregate}", "rankers": out}


def ranked_rows(
    corpus: list[Record], scores: Scores, aggregate: str, families: Sequence[str | None] | None = None
) -> list[dict[str, Any]]:
    """One row per corpus record, most suspect first: rank, id, score (the ranking aggregate), mean, max, count,
    a preview of the record and, when known, whether it is a culprit (its family)."""
    key = scores.key(aggregate).numpy()
    order = np.lexsort((np.arange(key.size), -key))
    rows = []
    for rank, i in enumerate(order.tolist(), 1):
        r = corpus[i]
        row = {
            "rank": rank,
            "id": r.id,
            "score": float(key[i]),
            "mean": float(scores.mean[i]),
            "max": float(scores.max[i]),
            "count": int(scores.count[i]),
            "instruction": r.instruction[:200],
            "response": r.response[:200],
        }
        if families is not None:
            row["culprit"] = families[i]
        rows.append(row)
    return rows


def topk_rows(probes: list[Record], corpus: list[Record], scores: Scores) -> list[dict[str, Any]]:
    """Per probe: its output and the ids and scores of its top-k records, best first."""
    return [
        {
            "probe_id": p.id,
            "output": p.response,
            "ids": [corpus[i].id for i in scores.top_idx[j].tolist()],
            "scores": [round(float(v), 6) for v in scores.top_val[j].tolist()],
        }
        for j, p in enumerate(probes)
    ]


def sketch_rate(stats: dict[str, Any]) -> float | None:
    """Corpus records sketched per second of gradient + projection time (None when all were cached)."""
    s = stats.get("grad_s", 0.0) + stats.get("sketch_s", 0.0)
    return stats["computed"] / s if stats.get("computed") and s > 0 else None


def peak_note(stats: dict[str, Any]) -> str:
    """Retrieval memory in words."""
    r = stats.get("retrieval", {})
    if r.get("peak_mb") is None:
        return "not measured"
    start = f"; {r['start_mb']:.0f} MiB at its start" if r.get("start_mb") is not None else ""
    return f"{r['peak_mb']:.0f} MiB peak ({r['peak_kind']}{start})"
