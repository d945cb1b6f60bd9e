"""``rapidun unlearn``: one method on a forget set — the user's ``--forget``/``--retain`` files or a scenario's
packs — from ``--model-path`` [+ ``--adapter``]; writes the adapter, weights, audit, result and receipt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rapidun.cli_inputs import identity, load_args_config
from rapidun.errors import RapidunError


def start_model(args: argparse.Namespace) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(model path to load, the receipt's ``start_model``, earlier receipts) for ``--model-path`` [+ ``--adapter``]."""
    from rapidun.models import fingerprint, resolve_model_path, with_adapter
    from rapidun.receipt import earlier_receipts

    base = resolve_model_path(args.model_path)
    adapter = getattr(args, "adapter", None)
    path = with_adapter(base, adapter)
    start: dict[str, Any] = {"model": args.model_path, "fingerprint": fingerprint(base)}
    if adapter:
        start |= {"adapter": adapter, "adapter_fingerprint": fingerprint(adapter), "merged": path}
    previous = earlier_receipts(adapter, base if Path(base).is_dir() else None)
    return path, start, previous


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
    from rapidun.distributed import barrier, init_from_env, is_main
    from rapidun.io import atomic_path, write_json
    from rapidun.methods import get_method, views_kind
    from rapidun.pipeline import prepare_out
    from rapidun.unlearn import unlearn
    from rapidun.views import method_views

    init_from_env()  # data-parallel training (and sharded sketches) under torchrun / accelerate launch
    ov = [*args.overrides, f"unlearn.methods=[{args.method}]"]
    if args.merge:
        ov.append("unlearn.merge=true")
    if args.method == "distill":
        base = args.base or (args.model_path if getattr(args, "adapter", None) else None)
        if not base and not any(o.startswith("unlearn.distill_base=") for o in ov):
            raise RapidunError(
                "distill resets the fine-tuning delta toward the base model: pass --base BASE (the model "
                "--model-path was fine-tuned from), or give the fine-tune as --adapter on its base --model-path"
            )
        if base:
            ov.append(f"unlearn.distill_base={base}")
    args.overrides = ov
    cfg = load_args_config(args)
    method = get_method(args.method)
    if method.kind == "retrain":
        raise RapidunError("'retrain' is the SFT reference: build it with `rapidun poison` or `rapidun run`")
    parts, packs = _unlearn_inputs(args, cfg)
    from rapidun.cover import check_corpus, needs_corpus

    if needs_corpus(args.method, cfg.unlearn.distill_teacher):
        check_corpus(parts)  # the user's files hold no corpus to search: refused before anything is written
    if method.kind == "fisher" and not parts.get("val_clean"):
        raise RapidunError(
            "fisher calibrates its noise on held-out clean records: pass a --retain file larger than the retain "
            "buffer (the records not drawn serve as validation), or use --scenario"
        )
    model_path, start, previous = start_model(args)
    inputs = identity(args, "method", "model_path", "adapter", "base", "scenario", "forget", "retain", "merge")
    out = prepare_out(args.out, cfg, args.overwrite, "unlearn", inputs) if is_main() else Path(args.out)
    barrier()
    if packs is not None and is_main():
        write_json(out / "packs.json", packs)
    views = None
    kind = views_kind(args.method, cfg.unlearn.distill_teacher)
    if kind:
        views = method_views(kind, model_path, parts["forget"], parts["retain"], cfg, out / "influence")
    prov = {"start": start, "packs": packs, "previous": previous}
    merged, tok, res = unlearn(args.method, parts, model_path, cfg, out, views, provenance=prov)
    if not is_main():
        return
    if cfg.unlearn.merge:
        with atomic_path(out / "merged") as tmp:
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if (out / "receipt.json").is_file():
                (tmp / "receipt.json").write_bytes((out / "receipt.json").read_bytes())
    t = res["timings"]
    a = res["audit_means"]
    print(f"{args.method}: {res['summary']}")
    if packs is not None:
        how = (
            f"drawn from {packs['n_retain_given']} (seed {packs['seed']}"
            + (
                f", {len(packs['retain_overlap_left_out'])} forget records left out"
                if packs["retain_overlap_left_out"]
                else ""
            )
            + ")"
            if packs["retain_drawn"]
            else "as given"
        )
        print(
            f"packs: {packs['n_forget']} forget ({packs['forget_with_replacement']} with a replacement answer), "
            f"{packs['n_retain']} retain {how}"
        )
    print(
        "timings (s): "
        + ", ".join(f"{k.removesuffix('_s')} {t[k]:.1f}" for k in ("influence_s", "mapping_s", "training_s", "time_s"))
        + (" (influence reused from the run folder; its measured time)" if res.get("influence_cached") else "")
    )
    print("forget CE poisoned " + _arrow(a["forget_ce_poisoned_before"], a["forget_ce_poisoned_after"])
          + "; clean " + _arrow(a["forget_ce_clean_before"], a["forget_ce_clean_after"])
          + "; retain CE " + _arrow(a["retain_ce_before"], a["retain_ce_after"]))  # fmt: skip
    h = res.get("heldout")
    if h:
        print(f"held-out clean records ({h['n']}, never trained on): CE {_arrow(h['ce_before'], h['ce_after'])}, "
              f"perplexity x{h['ppl_ratio']:.2f}")  # fmt: skip
    elif packs is not None:
        print("held-out clean records: none (a --retain file larger than the buffer leaves some out to check utility)")
    for w in res.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if not res.get("complete", True):
        raise RapidunError(f"{res['stopped']} (outputs written to {out})")
    files = ["adapter/" if (out / "adapter").is_dir() else None, "weights.jsonl", "audit.jsonl", "result.json"]
    files += ["receipt.json"] + (["packs.json"] if packs is not None else [])
    files += ["merged/"] if cfg.unlearn.merge else []
    print(f"written to {out}: " + ", ".join(f for f in files if f))


def _arrow(b: float | None, a: float | None) -> str:
    """``b -> a`` with 3 decimals; ``n/a`` where a pack has no such answers (e.g. no replacement answers)."""
    return "n/a" if b is None or a is None else f"{b:.3f} -> {a:.3f}"


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
        "(README 'Does the weighting help?')",
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
    p.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    p.set_defaults(fn=cmd_unlearn)
