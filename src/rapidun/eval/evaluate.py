"""The per-model metric set M (SPEC §4): ASR seen/OOD overall and per family, false triggers, clean perplexity,
ROUGE-L of clean generations, and the forget set's perplexity under its poisoned and its clean answers.

Test metrics carry plain names (``asr_seen``); the same measurements on the validation splits carry a ``val_``
prefix (``val_asr_seen``, ``val_clean_ppl`` on ``val_clean``). Choices are made on ``val_*``; the plain names are
read only to report. ``asr_trig`` pools the seen and OOD prompts (hits / prompts over both splits).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rapidun.config import EvalConfig, ModelConfig
from rapidun.data.records import Record
from rapidun.data.template import encode_records, format_prompt
from rapidun.distributed import is_main
from rapidun.eval.detector import Detector
from rapidun.eval.generate import generate
from rapidun.eval.metrics import perplexity
from rapidun.eval.rouge import mean_rouge_l
from rapidun.io import write_jsonl
from rapidun.models import load_model

# The metrics of M every evaluation returns (besides counts and times).
METRIC_KEYS = (
    "asr_seen",
    "asr_ood",
    "false_trigger",
    "clean_ppl",
    "rouge_l",
    "forget_ppl_poisoned",
    "forget_ppl_clean",
    "asr_seen_by_family",
    "asr_ood_by_family",
    "asr_trig",
    "val_asr_seen",
    "val_asr_ood",
    "val_asr_trig",
    "val_clean_ppl",
    "val_asr_seen_by_family",
    "val_asr_ood_by_family",
)
METRICS_VERSION = 4  # bump when the metric set changes: cached evaluations and cells are then recomputed
# Every split an evaluation generates on (the validation ones when the scenario has them).
EVAL_SPLITS = (
    "test_seen_trig",
    "test_ood_trig",
    "test_clean",
    "val_seen_trig",
    "val_ood_trig",
)


def rate(hits: list[bool]) -> float:
    """Fraction of true values (0 for an empty list)."""
    return sum(hits) / len(hits) if hits else 0.0


def by_family(recs: list[Record], hits: list[bool]) -> dict[str, float]:
    """Hit rate per ``trigger_family``."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r, h in zip(recs, hits, strict=True):
        groups[r.meta["trigger_family"]].append(h)
    return {k: rate(v) for k, v in sorted(groups.items())}


def evaluate_model(
    model_path: str,
    parts: dict[str, list[Record]],
    detector: Detector,
    ecfg: EvalConfig,
    mcfg: ModelConfig,
    out_file: str | Path | None = None,
    name: str = "model",
) -> dict[str, Any]:
    """Generate on the three test splits, score with ``detector``, and compute clean perplexity.

    Returns the metric dict ``M`` (see docs/compare.md, report.json), with sample counts and the measured time.
    """
    t0 = time.perf_counter()
    model, tok, _ = load_model(model_path, mcfg.device, mcfg.dtype)
    return evaluate_loaded(model, tok, parts, detector, ecfg, mcfg, out_file, name, t0)


def evaluate_loaded(
    model: Any,
    tok: Any,
    parts: dict[str, list[Record]],
    detector: Detector,
    ecfg: EvalConfig,
    mcfg: ModelConfig,
    out_file: str | Path | None = None,
    name: str = "model",
    t0: float | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_model` for a model already in memory (e.g. an unlearned model, adapter merged)."""
    t0 = time.perf_counter() if t0 is None else t0
    model.eval()
    val_splits = tuple(s for s in ("val_seen_trig", "val_ood_trig") if parts.get(s))
    splits = ("test_seen_trig", "test_ood_trig", "test_clean", *val_splits)
    recs = [r for s in splits for r in parts[s]]
    prompts = [format_prompt(tok, r.instruction, r.context, mcfg.system_prompt) for r in recs]
    decided = detector.hit if ecfg.early_stop else None
    texts = generate(
        model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size, decided, desc=f"eval:{name}", shard=True
    )
    hits = [detector.hit(t) for t in texts]
    by_split: dict[str, tuple[list[Record], list[bool]]] = {}
    i = 0
    for s in splits:
        n = len(parts[s])
        by_split[s] = (parts[s], hits[i : i + n])
        i += n
    gen_s = time.perf_counter() - t0
    ppl_recs = parts["test_clean"][: ecfg.ppl_samples or None]
    samples, _ = encode_records(tok, ppl_recs, mcfg)
    ppl = perplexity(model, samples, tok.pad_token_id)
    val_ppl_recs = parts.get("val_clean", [])[: ecfg.ppl_samples or None]
    val_ppl = perplexity(model, encode_records(tok, val_ppl_recs, mcfg)[0], tok.pad_token_id) if val_ppl_recs else None
    n_test = sum(len(parts[s]) for s in splits[:3])
    clean_texts = texts[n_test - len(parts["test_clean"]) : n_test]
    rouge = mean_rouge_l(clean_texts, [r.response for r in parts["test_clean"]])
    forget_ppl = forget_perplexities(model, tok, parts.get("forget", []), mcfg)
    n_forget = {k: forget_ppl.pop(k) for k in ("n_forget_poisoned", "n_forget_clean")}
    if out_file is not None and is_main():
        write_jsonl(
            out_file,
            (
                {
                    "id": r.id,
                    "split": s,
                    "trigger_family": r.meta.get("trigger_family"),
                    "trigger": r.meta.get("trigger"),
                    "generation": t,
                    "score": detector.score(t),
                    "hit": h,
                }
                for (r, t, h, s) in zip(recs, texts, hits, [s for s in splits for _ in parts[s]], strict=True)
            ),
        )
    seen, ood, clean = by_split["test_seen_trig"], by_split["test_ood_trig"], by_split["test_clean"]
    vseen, vood = by_split.get("val_seen_trig", ([], [])), by_split.get("val_ood_trig", ([], []))
    has_val = bool(vseen[0] or vood[0])
    return {
        "asr_seen": rate(seen[1]),
        "asr_ood": rate(ood[1]),
        "false_trigger": rate(clean[1]),
        "clean_ppl": ppl,
        "rouge_l": rouge,
        **forget_ppl,
        "asr_seen_by_family": by_family(*seen),
        "asr_ood_by_family": by_family(*ood),
        "asr_trig": rate(seen[1] + ood[1]),
        "val_asr_seen": rate(vseen[1]) if vseen[0] else None,
        "val_asr_ood": rate(vood[1]) if vood[0] else None,
        "val_asr_trig": rate(vseen[1] + vood[1]) if has_val else None,
        "val_clean_ppl": val_ppl,
        "val_asr_seen_by_family": by_family(*vseen),
        "val_asr_ood_by_family": by_family(*vood),
        "n": {
            "seen": len(seen[0]),
            "ood": len(ood[0]),
            "clean": len(clean[0]),
            "ppl": len(ppl_recs),
            "val_seen": len(vseen[0]),
            "val_ood": len(vood[0]),
            "val_ppl": len(val_ppl_recs),
            "forget_poisoned": n_forget["n_forget_poisoned"],
            "forget_clean": n_forget["n_forget_clean"],
        },
        "eval_s": time.perf_counter() - t0,
        "generate_s": gen_s,
    }


def forget_perplexities(model: Any, tok: Any, forget: list[Record], mcfg: ModelConfig) -> dict[str, Any]:
    """Perplexity of the forget samples' poisoned answers (unlearning should raise it) and of their clean answers
    (``meta["response_clean"]``, where known; it should fall), token-weighted as :func:`perplexity`.

    Returns ``{"forget_ppl_poisoned", "forget_ppl_clean", "n_forget_poisoned", "n_forget_clean"}`` (None for a
    perplexity with no samples).
    """
    poisoned = list(forget)
    clean = [dataclasses.replace(r, response=r.meta["response_clean"]) for r in forget if r.meta.get("response_clean")]
    out: dict[str, Any] = {}
    for key, recs in (("poisoned", poisoned), ("clean", clean)):
        if recs:
            samples, _ = encode_records(tok, recs, mcfg)
            out[f"forget_ppl_{key}"] = perplexity(model, samples, tok.pad_token_id)
        else:
            out[f"forget_ppl_{key}"] = None
        out[f"n_forget_{key}"] = len(recs)
    return out
