"""``rapidun unlearn``: one method on a forget set — the user's ``--forget``/``--retain`` files or a scenario's
packs — from ``--model-path`` [+ ``--adapter``]; writes the adapter, weights, audit, result and receipt."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rapidun.cli_inputs import heldout_arg, identity, load_args_config
from rapidun.errors import RapidunError


def _unlearn_inputs(args: argparse.Namespace, cfg: Any) -> tuple[dict[str, list], dict[str, Any] | None]:
    """The packs: a scenario folder's, or built from ``--forget``/``--retain`` files (:mod:`rapidun.data.packs`)."""
    if args.scenario and (args.forget or args.retain):
        raise RapidunError("give either --scenario or --forget/--retain, not both")
    if args.scenario:
        from rapidun.data.scenario import load_scenario

        return load_scenario(args.scenario)[0], None
    if not (args.forget and args.retain):
        raise RapidunError(
            "say what to unlearn: --forget FILE --retain FILE (records in data.format), or --scenario DIR"
        )
    from rapidun.data.packs import load_packs

    d = cfg.data
    return load_packs(args.forget, args.retain, d.format, d.fields, cfg.scenario.retain_ratio, cfg.unlearn.seed)


def cmd_unlearn(args: argparse.Namespace) -> None:
    """Parse → config → :func:`rapidun.commands.run_unlearn` (the Python API's ``rapidun.unlearn`` calls it too)
    → print the summary."""
    from rapidun.commands import check_unlearn, run_unlearn, unlearn_lines, unlearn_overrides
    from rapidun.distributed import is_main

    adapter = getattr(args, "adapter", None)
    args.overrides = unlearn_overrides(args.method, args.overrides, args.model_path, adapter, args.base, args.merge)
    cfg = load_args_config(args)
    parts, packs = _unlearn_inputs(args, cfg)
    parts = heldout_arg(args, cfg, parts, packs)
    check_unlearn(args.method, cfg, parts)  # refused before anything is written
    inputs = identity(
        args, "method", "model_path", "adapter", "base", "scenario", "forget", "retain", "heldout_clean", "merge"
    )
    _, _, res, out = run_unlearn(args.method, args.model_path, adapter, parts, packs, cfg, args.out, args.overwrite,
                                 inputs)  # fmt: skip
    if not is_main():
        return
    print("\n".join(unlearn_lines(args.method, res, packs)))
    for w in res.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if not res.get("complete", True):
        raise RapidunError(f"{res['stopped']} (outputs written to {out})")
    files = ["adapter/" if (out / "adapter").is_dir() else None, "weights.jsonl", "audit.jsonl", "result.json"]
    files += ["receipt.json"] + (["packs.json"] if packs is not None else [])
    files += ["calibration.png"] if (out / "calibration.png").is_file() else []
    files += ["merged/"] if cfg.unlearn.merge else []
    print(f"written to {out}: " + ", ".join(f for f in files if f))


def add_parser(sub: Any, common: Any) -> None:
    """The ``unlearn`` subcommand (``common``: --config/--out/overrides)."""
    from rapidun.methods import REGISTRY

    p = sub.add_parser(
        "unlearn",
        help="unlearn a forget set (your --forget/--retain files, or a scenario's packs) from a model with one method",
        description="Methods: " + "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values() if m.kind != "retrain"),
    )
    common(p)
    p.add_argument(
        "--method",
        default="uniform",
        choices=[n for n, m in REGISTRY.items() if m.kind != "retrain"],
        help="default uniform: equal weights removed the most at matched utility outside the demo's scale "
        "(docs/study.md)",
    )
    p.add_argument("--model-path", required=True, help="the model to clean (folder or hub id); never modified")
    p.add_argument("--adapter", help="a PEFT adapter on --model-path: start from the two merged (cached)")
    p.add_argument(
        "--base",
        help="distill: the base model --model-path was fine-tuned from (default with --adapter: --model-path)",
    )
    p.add_argument("--scenario", help="scenario folder (OUT/scenario of `rapidun scenario`): its forget/retain packs")
    p.add_argument("--forget", help="records to unlearn (data.format; optional replacement answer column)")
    p.add_argument("--retain", help="good training records: a retain buffer, or a whole file to draw one from")
    p.add_argument(
        "--heldout-clean",
        help="clean records the model never trained on (data.format): the utility budget and the collateral checks "
        "measure up to 40 of them (default: retain records left out of the buffer, usually fine-tuning data, which "
        "under-report the damage on new prompts)",
    )
    p.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    p.set_defaults(fn=cmd_unlearn)
