"""``rapidun eval``: a model on a scenario's splits (ASR, false triggers, PPL), or on the user's ``--probes``
(hit rate and replacement rate per group; perplexity of the forget, replacement and retain answers; with a start
model, collateral damage on the clean probes: :mod:`rapidun.eval.collateral`)."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import torch

from rapidun.cli_inputs import identity, load_args_config
from rapidun.errors import RapidunError
from rapidun.eval.collateral import collateral_warning


def cmd_eval(args: argparse.Namespace) -> None:
    from rapidun.io import write_json
    from rapidun.models import with_adapter

    cfg = load_args_config(args)
    if args.probes:
        return eval_probes(args, cfg)
    if not args.scenario:
        raise RapidunError(
            "say what to evaluate on: --scenario DIR (a scenario's splits) or --probes FILE (your prompts)"
        )
    from rapidun.data.scenario import load_scenario
    from rapidun.pipeline import make_detector, stage_eval
    from rapidun.run_folder import prepare_out

    parts, _ = load_scenario(args.scenario)
    det, info = make_detector(cfg, parts)
    out = prepare_out(args.out, cfg, args.overwrite, "eval", identity(args, "scenario"))
    name = args.name or Path(args.adapter or args.model_path).name
    m = stage_eval(cfg, out, name, with_adapter(args.model_path, args.adapter), parts, det)
    write_json(out / "detector.json", info)
    print({k: m[k] for k in ("asr_seen", "asr_ood", "false_trigger", "clean_ppl")})


def eval_probes(args: argparse.Namespace, cfg: Any) -> None:
    """``rapidun eval --probes``: hit rate (and replacement rate) per group on the user's prompts, forget/replacement/
    retain PPL and, with a start model, the collateral damage on the clean probes."""
    from rapidun.data.records import load_records
    from rapidun.eval.probes import clean_probes, evaluate_probes, hit_rule, load_probes, replacements_of
    from rapidun.io import write_json, write_jsonl
    from rapidun.models import load_model, with_adapter
    from rapidun.run_folder import prepare_out

    if args.scenario:
        raise RapidunError("give either --scenario or --probes, not both")
    probes = load_probes(args.probes)
    fmt, fields = cfg.data.format, cfg.data.fields
    forget = load_records(args.forget, fmt, fields) if args.forget else []
    retain = load_records(args.retain, fmt, fields) if args.retain else []
    hit, rule = hit_rule(args.regex, args.keywords, forget, retain, cfg.eval)
    reps = replacements_of(forget)
    start_path, start_how = start_model_of(args)
    if start_path is not None and not args.start_model and cfg.verify.probe_group not in {p.group for p in probes}:
        start_path = None  # found through the adapter's receipt: no collateral check rather than a refusal
    clean = clean_probes(probes, cfg.verify.probe_group) if start_path is not None else []
    path = with_adapter(args.model_path, args.adapter)
    out = prepare_out(args.out, cfg, args.overwrite, "eval", identity(args, "probes", "start_model", "start_adapter"))
    start = start_side(start_path, probes, clean, hit, cfg, reps) if start_path is not None and clean else None
    model, tok, info = load_model(path, cfg.model.device, cfg.model.dtype)
    metrics, rows = evaluate_probes(model, tok, probes, hit, cfg.eval, cfg.model, forget, retain, reps)
    name = args.name or Path(args.adapter or args.model_path).name
    result = {
        "model": args.model_path,
        "adapter": args.adapter,
        "probes": args.probes,
        "hit_rule": rule,
        "device": info["device"],
        **metrics,
    }
    warnings: list[str] = []
    if start is not None:
        result["collateral"] = after_side(model, tok, start, rows, clean, reps, cfg) | {"start_model": start_how}
        w = collateral_warning(result["collateral"], PROBE_FIX, "clean probes")
        warnings = [w] if w else []
    result["warnings"] = warnings
    write_jsonl(out / f"probes_{name}.jsonl", rows)
    write_json(out / f"probes_{name}.json", result)
    print(f"{name}: hit rule {rule['rule']}" + (f" ({len(rule['keywords'])} keywords)" if "keywords" in rule else ""))
    print("group          prompts  hits  hit rate" + ("  replaced" if reps else ""))
    for g, v in metrics["groups"].items():
        rep = f"{v['replacement_rate']:>10.3f}" if "replacement_rate" in v else ""
        print(f"{g:<14}{v['n']:>8}{v['hits']:>6}{v['hit_rate']:>10.3f}{rep}")

    def ppl(x: float | None, n: int, what: str) -> str:
        return f"{what} {x:.2f} ({n})" if x is not None else f"{what} -"

    print(
        "perplexity: "
        + ", ".join(
            (
                ppl(metrics["forget_ppl_poisoned"], metrics["n_forget"], "forget answers"),
                ppl(metrics["forget_ppl_clean"], metrics["n_replacement"], "replacement answers"),
                ppl(metrics["retain_ppl"], metrics["n_retain"], "retain records"),
            )
        )
        + f"; {metrics['eval_s']:.1f} s"
    )
    if start is not None:
        print(collateral_line(result["collateral"], start_how))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"written: {out / f'probes_{name}.json'}, {out / f'probes_{name}.jsonl'}")


PROBE_FIX = (
    "rerun the unlearning gentler (lower unlearn.lr or unlearn.descent_beta, raise unlearn.mix_retain) and compare "
    "again"
)


def start_model_of(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The model before unlearning and how it was found: ``--start-model`` [+ ``--start-adapter``], else the start
    model named by ``--adapter``'s ``receipt.json`` (its merged folder, or its model folder when it had no
    adapter), else ``(None, None)``."""
    from rapidun.io import read_json
    from rapidun.models import with_adapter

    if args.start_adapter and not args.start_model:
        raise RapidunError("--start-adapter needs --start-model (the model the start adapter goes on)")
    if args.start_model:
        return with_adapter(args.start_model, args.start_adapter), f"--start-model {args.start_model}"
    rec = Path(args.adapter) / "receipt.json" if args.adapter else None
    if rec is None or not rec.is_file():
        return None, None
    try:
        sm = read_json(rec).get("start_model") or {}
    except (OSError, ValueError):
        return None, None
    if sm.get("merged") and Path(sm["merged"]).is_dir():
        return str(sm["merged"]), f"{sm['model']} + {sm.get('adapter')}, from the adapter's receipt"
    if not sm.get("adapter") and sm.get("model") and Path(sm["model"]).is_dir():
        return str(sm["model"]), f"{sm['model']}, from the adapter's receipt"
    return None, None


def start_side(start_path: str, probes: list[Any], clean: list[Any], hit: Any, cfg: Any, reps: list[str]) -> dict:
    """The start model's part of the comparison, taken before the model under test is loaded: its per-group
    figures, its greedy answers to the ``clean`` probes (texts, first N token ids) and its top-K distribution on
    those answers teacher-forced (:func:`rapidun.eval.collateral.start_distribution`)."""
    from rapidun.data.records import Record
    from rapidun.data.template import encode_records
    from rapidun.eval.collateral import answer_ids, start_distribution
    from rapidun.eval.probes import evaluate_probes
    from rapidun.models import load_model

    model, tok, _ = load_model(start_path, cfg.model.device, cfg.model.dtype)
    m, rows = evaluate_probes(model, tok, probes, hit, cfg.eval, cfg.model, None, None, reps)
    by_id = {r["id"]: r["generation"] for r in rows}
    texts = [by_id[p.id] for p in clean]
    recs = [
        Record(id=p.id, instruction=p.prompt, response=t, context=p.context) for p, t in zip(clean, texts, strict=True)
    ]
    kl_rows, _ = encode_records(tok, recs, cfg.model)
    start = {
        "groups": m["groups"],
        "texts": texts,
        "ids": answer_ids(tok, texts, _tokens(cfg)),
        "rows": kl_rows,
        "dist": start_distribution(model, kl_rows, tok.pad_token_id),
        "vocab": len(tok),
    }
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model under test loads next
    return start


def after_side(
    model: Any, tok: Any, start: dict, rows: list[dict[str, Any]], clean: list[Any], reps: list[str], cfg: Any
) -> dict[str, Any]:
    """:func:`rapidun.eval.collateral.collateral_summary` of the model under test against :func:`start_side`."""
    from rapidun.eval.collateral import answer_ids, collateral_summary, mean_kl

    if len(tok) != start["vocab"]:
        raise RapidunError(
            f"the start model's tokenizer has {start['vocab']} tokens, the model under test's {len(tok)}: compare "
            "a model with the one it was unlearned from"
        )
    by_id = {r["id"]: r["generation"] for r in rows}
    texts = [by_id[p.id] for p in clean]
    n = _tokens(cfg)
    kl = mean_kl(model, start["rows"], start["dist"], tok.pad_token_id)
    return collateral_summary(
        start["texts"], texts, start["ids"], answer_ids(tok, texts, n), reps, [p.id for p in clean], kl, n
    )


def _tokens(cfg: Any) -> int:
    from rapidun.eval.collateral import AGREE_TOKENS

    return min(AGREE_TOKENS, cfg.eval.max_new_tokens)


def collateral_line(c: dict[str, Any], how: str | None) -> str:
    """One printed line of the collateral measures against the start model."""

    def f(x: float | None, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    return (
        f"collateral vs the start model ({how}; {c['n']} clean probes): replacement rate "
        f"{f(c['replacement_rate_before'])} -> {f(c['replacement_rate_after'])}, answers agree {f(c['agreement'])} "
        f"(first {c['tokens']} tokens), KL {f(c['kl'], 4)} per token"
    )


def add_parser(sub: Any, common: Any, hit_rule_args: Any) -> None:
    """The ``eval`` subcommand (``common``: --config/--out/overrides; ``hit_rule_args``: --regex/--keywords)."""
    p = sub.add_parser("eval", help="evaluate a model on a scenario (ASR, false triggers, PPL) or on your --probes")
    common(p)
    p.add_argument("--scenario", help="scenario folder (OUT/scenario of `rapidun scenario`)")
    p.add_argument("--model-path", required=True, help="model folder or hub id to evaluate")
    p.add_argument("--adapter", help="a PEFT adapter on --model-path (e.g. OUT/adapter of `rapidun unlearn`)")
    p.add_argument("--probes", help="your prompts instead of a scenario: rows with prompt, group[, context, id]")
    hit_rule_args(p)
    p.add_argument("--forget", help="--probes: forget records (their answers' PPL; the learned detector's positives)")
    p.add_argument("--retain", help="--probes: retain records (their PPL; the learned detector's negatives)")
    p.add_argument(
        "--start-model",
        help="--probes: the model before unlearning; compares the clean probes' answers with it (collateral damage; "
        "default: the start model named by --adapter's receipt.json)",
    )
    p.add_argument("--start-adapter", help="--probes: a PEFT adapter on --start-model (the start model = both merged)")
    p.add_argument("--name", help="name for the output files (default: folder name)")
    p.set_defaults(fn=cmd_eval)
