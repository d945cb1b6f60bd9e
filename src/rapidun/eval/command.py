"""``rapidun eval``: a model on a scenario's splits (ASR, false triggers, PPL), or on the user's ``--probes``
(hit rate per group; perplexity of the forget, replacement and retain answers)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rapidun.cli_inputs import identity, load_args_config
from rapidun.errors import RapidunError


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
    from rapidun.pipeline import make_detector, prepare_out, stage_eval

    parts, _ = load_scenario(args.scenario)
    det, info = make_detector(cfg, parts)
    out = prepare_out(args.out, cfg, args.overwrite, "eval", identity(args, "scenario"))
    name = args.name or Path(args.adapter or args.model_path).name
    m = stage_eval(cfg, out, name, with_adapter(args.model_path, args.adapter), parts, det)
    write_json(out / "detector.json", info)
    print({k: m[k] for k in ("asr_seen", "asr_ood", "false_trigger", "clean_ppl")})


def eval_probes(args: argparse.Namespace, cfg: Any) -> None:
    """``rapidun eval --probes``: hit rate per group on the user's prompts, and forget/replacement/retain PPL."""
    from rapidun.data.records import load_records
    from rapidun.eval.probes import evaluate_probes, hit_rule, load_probes
    from rapidun.io import write_json, write_jsonl
    from rapidun.models import load_model, with_adapter
    from rapidun.pipeline import prepare_out

    if args.scenario:
        raise RapidunError("give either --scenario or --probes, not both")
    probes = load_probes(args.probes)
    fmt, fields = cfg.data.format, cfg.data.fields
    forget = load_records(args.forget, fmt, fields) if args.forget else []
    retain = load_records(args.retain, fmt, fields) if args.retain else []
    hit, rule = hit_rule(args.regex, args.keywords, forget, retain, cfg.eval)
    path = with_adapter(args.model_path, args.adapter)
    out = prepare_out(args.out, cfg, args.overwrite, "eval", identity(args, "probes"))
    model, tok, info = load_model(path, cfg.model.device, cfg.model.dtype)
    metrics, rows = evaluate_probes(model, tok, probes, hit, cfg.eval, cfg.model, forget, retain)
    name = args.name or Path(args.adapter or args.model_path).name
    result = {
        "model": args.model_path,
        "adapter": args.adapter,
        "probes": args.probes,
        "hit_rule": rule,
        "device": info["device"],
        **metrics,
    }
    write_jsonl(out / f"probes_{name}.jsonl", rows)
    write_json(out / f"probes_{name}.json", result)
    print(f"{name}: hit rule {rule['rule']}" + (f" ({len(rule['keywords'])} keywords)" if "keywords" in rule else ""))
    print("group          prompts  hits  hit rate")
    for g, v in metrics["groups"].items():
        print(f"{g:<14}{v['n']:>8}{v['hits']:>6}{v['hit_rate']:>10.3f}")

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
    print(f"written: {out / f'probes_{name}.json'}, {out / f'probes_{name}.jsonl'}")


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
    p.add_argument("--name", help="name for the output files (default: folder name)")
    p.set_defaults(fn=cmd_eval)
