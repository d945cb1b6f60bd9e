"""Command line: parse → config → pipeline function. The Python API calls the same functions.

Every command takes ``--config FILE`` and trailing ``key=value`` overrides (e.g. ``sft.lr=5e-4``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rapidun.cli_influence import cmd_influence, cmd_influence_check
from rapidun.cli_inputs import INPUT_ARGS, check_inputs, heldout_arg, identity, records_arg
from rapidun.cli_inputs import load_args_config as _load
from rapidun.cli_table import demo_note, print_table
from rapidun.errors import RapidunError

__all__ = ["INPUT_ARGS", "build_parser", "check_inputs", "demo_note", "identity", "main", "print_table"]


def _demo_config() -> Path:
    from rapidun.config import shipped_configs

    return shipped_configs()["demo"]


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument(
        "--config",
        help="YAML config file, or the name of one shipped with rapidun ('demo': the CPU-validated settings); "
        "defaults apply to missing fields",
    )
    p.add_argument("--out", required=out_required, help="output folder")
    p.add_argument("--model", help="shortcut for model.name=...: hub id, local folder, or 'default'")
    p.add_argument("--overwrite", action="store_true", help="replace results in an --out holding a different run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. sft.epochs=2")


def _hit_rule_args(p: Any) -> None:
    """``--regex`` / ``--keywords``: what makes a probe answer a hit (:func:`rapidun.eval.probes.hit_rule`)."""
    p.add_argument("--regex", help="--probes: an answer is a hit when this regex matches (case-insensitive)")
    p.add_argument("--keywords", nargs="+", metavar="W", help="--probes: a hit when any of these words occurs")


def cmd_run(args: argparse.Namespace, default_path: Path | None = None, note: bool = False) -> None:
    from rapidun.distributed import init_from_env, is_main
    from rapidun.pipeline import run

    if any(getattr(args, k, None) for k in ("model_path", "forget", "retain", "probes")):
        return cmd_compare_user(args)
    cfg = _load(args, default_path)
    if cfg.scenario.kind == "tofu":
        return cmd_tofu(cfg, args)
    init_from_env()
    report = run(cfg, args.out, overwrite=args.overwrite, note=demo_note(cfg) if note else None)
    if is_main():
        print_table(report)
        print(f"report: {Path(args.out) / 'report.json'}")
        for k in ("md", "html"):
            if k in report.get("files", {}):
                print(f"report.{k}: {report['files'][k]}")


def cmd_tofu(cfg: Any, args: argparse.Namespace) -> None:
    """``compare`` on the TOFU scenario (``scenario.kind: tofu``, :mod:`rapidun.tofu`): single process."""
    from rapidun.distributed import rank_world
    from rapidun.tofu import run_tofu

    if rank_world()[1] > 1:
        raise RapidunError("the TOFU comparison runs in one process; start it without torchrun")
    report = run_tofu(cfg, args.out, overwrite=args.overwrite)
    md = Path(report["files"]["md"]).read_text(encoding="utf-8")
    print(md.split("![", 1)[0].rstrip())
    for k, v in report["files"].items():
        print(f"report.{k}: {v}")


def cmd_compare_user(args: argparse.Namespace) -> None:
    """``rapidun compare`` on the user's model, files and probes (:mod:`rapidun.user_compare`)."""
    from rapidun.commands import start_model
    from rapidun.data.packs import load_packs
    from rapidun.eval.probes import hit_rule, load_probes
    from rapidun.io import write_json
    from rapidun.run_folder import prepare_out
    from rapidun.user_compare import check_user_methods, compare_user

    missing = [f"--{k.replace('_', '-')}" for k in ("model_path", "forget", "retain", "probes") if not getattr(args, k)]
    if missing:
        raise RapidunError(
            "compare on your own case needs --model-path, --forget, --retain and --probes; missing "
            + ", ".join(missing)
        )
    cfg = _load(args)
    check_user_methods(cfg)  # before any training or writing
    d = cfg.data
    parts, packs = load_packs(args.forget, args.retain, d.format, d.fields, cfg.scenario.retain_ratio, cfg.unlearn.seed)
    parts = heldout_arg(args, cfg, parts, packs)
    probes = load_probes(args.probes)
    hit, rule = hit_rule(args.regex, args.keywords, parts["forget"], parts["retain"], cfg.eval)
    model_path, start, _ = start_model(args.model_path, args.adapter)
    if args.retrain_data and args.retrain_model:
        raise RapidunError("give --retrain-model (a reference you have) or --retrain-data (train one), not both")
    base = args.retrain_base or (args.model_path if args.adapter else None)
    if args.retrain_data and not base:
        raise RapidunError(
            "--retrain-data needs the base model the reference is trained from: --retrain-base MODEL (with "
            "--adapter the base is --model-path)"
        )
    recs = None
    if args.retrain_data:  # read (and validated) before the output folder is claimed
        from rapidun.data.records import load_records

        recs = load_records(args.retrain_data, d.format, d.fields)
    inputs = identity(
        args, "model_path", "adapter", "forget", "retain", "heldout_clean", "probes", "retrain_model", "retrain_data",
        "retrain_base", "regex", "keywords",
    )  # fmt: skip
    out = prepare_out(args.out, cfg, args.overwrite, "compare-user", inputs)
    write_json(out / "packs.json", packs)
    retrain, note = args.retrain_model, None
    if recs is not None:
        from rapidun.user_compare import train_retrain

        retrain, note, meta = train_retrain(cfg, base, recs, parts["forget"])
        write_json(out / "retrain_training.json", meta)
    compare_user(cfg, out, model_path, start, parts, packs, probes, hit, rule, retrain, note)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")


def cmd_scenario(args: argparse.Namespace) -> None:
    from rapidun.pipeline import prepare_out, stage_scenario

    cfg = _load(args)
    out = prepare_out(args.out, cfg, args.overwrite)
    _, manifest = stage_scenario(cfg, out)
    print("scenario written to", out / "scenario", "sizes:", manifest["sizes"])


def cmd_poison(args: argparse.Namespace) -> None:
    from rapidun.io import write_json
    from rapidun.pipeline import prepare_out, stage_models, stage_scenario

    cfg = _load(args)
    out = prepare_out(args.out, cfg, args.overwrite)
    parts, _ = stage_scenario(cfg, out)
    models = stage_models(cfg, parts)
    for name, meta in models.items():
        write_json(out / "training" / f"{name}.json", meta)
        tr = meta["train"]
        print(
            f"{name}: {meta['path']} ({'cached, ' if meta['cached'] else ''}trained {tr['time_s']:.0f} s, "
            f"{tr['tokens_per_s']:.0f} tokens/s)"
        )


def cmd_finetune(args: argparse.Namespace) -> None:
    """``rapidun finetune``: :func:`rapidun.commands.run_finetune` (the Python API's ``rapidun.finetune`` too)."""
    from rapidun.commands import check_finetune_out, run_finetune

    cfg = _load(args)
    check_finetune_out(args.out, args.model_path, args.overwrite)  # before the records are read or a model loads
    recs = records_arg(args.records, cfg)
    meta = run_finetune(args.model_path, recs, cfg, args.out, args.overwrite)
    tr = meta["train"]
    curve = tr["loss_curve"]
    print(
        f"fine-tuned {args.model_path} on {len(recs)} records: {tr['steps']} steps of sft.batch_size "
        f"{cfg.sft.batch_size}, training loss {curve[0]:.3f} -> {curve[-1]:.3f}, {tr['time_s']:.1f} s"
        + (" (reused from the cache: the same model, records and sft.* settings)" if meta.get("cached") else "")
    )
    print(f"written to {args.out}: a merged model folder (use it as --model-path, e.g. a retrain reference)")


def cmd_verify(args: argparse.Namespace) -> None:
    from rapidun.verify.command import cmd_verify as run_verify

    cfg = _load(args)
    keys = ("model_path", "adapter", "scenario", "forget", "probes", "retain", "heldout", "regex", "keywords")
    if cfg.scenario.kind == "tofu":  # TOFU's attacks and scores against its retain model (rapidun.tofu)
        from rapidun.tofu import verify_tofu

        verify_tofu(cfg, args.model_path, args.adapter, args.out, args.overwrite, identity(args, *keys))
        return
    run_verify(args, cfg, identity(args, *keys, "poisoned", "reference"))


def cmd_trace(args: argparse.Namespace) -> None:
    from rapidun.config import to_dict
    from rapidun.trace.command import cmd_trace as run_trace
    from rapidun.trace.command import flag_overrides

    args.overrides = list(args.overrides) + flag_overrides(args)
    cfg = _load(args)
    keys = ("model_path", "adapter", "scenario", "train", "probes", "generate", "to_forget", "regex", "keywords")
    run_trace(args, cfg, identity(args, *keys) | {"trace": to_dict(cfg.trace)})


def cmd_config(args: argparse.Namespace) -> None:
    from rapidun.config import describe, dump_yaml

    if args.fields:
        print("\n".join(describe()))
    else:
        print(dump_yaml(_load(args)), end="")


def cmd_study(args: argparse.Namespace) -> None:
    from rapidun.distributed import init_from_env, is_main
    from rapidun.study import run_study

    init_from_env()
    study = run_study(args.study, args.out, overwrite=args.overwrite, only=args.only)
    if not is_main():
        return
    for name, sc in study["scenarios"].items():
        print(f"== {name} (selected on validation: {sc['selected']}; {sc['selected_reason']})")
        print(f"{'label':<22}{'val ASR':>9}{'val PPL':>9}{'test ASR':>10}{'seen':>7}{'OOD':>7}{'test PPL':>10}"
              f"{'Δ vs ' + study['reference']:>14}{'Holm p':>9}")  # fmt: skip
        for label, m in sc["methods"].items():
            v, t = m["val"]["mean"], m["test"]["mean"]
            d = sc["tests"]["test"].get(label, {}).get("asr_trig")

            def f(x: Any, n: int = 3) -> str:
                return "–" if x is None else f"{x:.{n}f}"

            print(
                f"{label:<22}{f(v['asr_trig']):>9}{f(v['clean_ppl'], 2):>9}{f(t['asr_trig']):>10}{f(t['asr_seen']):>7}"
                f"{f(t['asr_ood']):>7}{f(t['clean_ppl'], 2):>10}"
                f"{('–' if d is None else format(d['diff'], '+.3f')):>14}{('–' if d is None else f(d['p_holm'])):>9}"
            )
    print(study["decision"])
    for k, v in study.get("files", {}).items():
        print(f"{k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rapidun", description="Influence-driven unlearning (RapidUn) for causal LMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "compare",
        help="scenario → poisoned model → influence → every unlearn.methods × compare.n_seeds → evaluation → "
        "OUT/report.json, report.md, report.html (resumable: finished cells are reused)",
    )
    _common(p)
    g = p.add_argument_group("your own case (instead of a scenario): see docs/own-model.md")
    g.add_argument("--model-path", help="the model to clean (folder or hub id); never modified")
    g.add_argument("--adapter", help="a PEFT adapter on --model-path: start from the two merged (cached)")
    g.add_argument("--forget", help="records to unlearn (data.format; optional replacement answer column)")
    g.add_argument("--retain", help="good training records: a retain buffer, or a whole file to draw one from")
    g.add_argument("--heldout-clean", help="clean records the model never trained on: every run's utility budget, "
                   "held-out perplexity and collateral checks measure up to 40 of them (default: retain records left "
                   "out of the buffer)")  # fmt: skip
    g.add_argument("--probes", help="prompts with a group (e.g. triggered, clean): the evidence, per group")
    _hit_rule_args(g)
    g.add_argument("--retrain-model", help="a model trained without the forget records: the reference end")
    g.add_argument("--retrain-data", help="or your clean training corpus: a retrain reference is trained on it (sft.*)")
    g.add_argument("--retrain-base", help="--retrain-data: the base model to train it from (default with --adapter: "
                   "--model-path)")  # fmt: skip
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("run", help="the same as `compare`")
    _common(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="`compare` on the shipped demo config (embedded model, Dolly sample, CPU-sized)")
    _common(p)
    p.set_defaults(fn=lambda a: cmd_run(a, _demo_config(), note=True))
    p = sub.add_parser("scenario", help="build the backdoor scenario (splits, triggers, packs) into OUT/scenario")
    _common(p)
    p.set_defaults(fn=cmd_scenario)
    p = sub.add_parser("poison", help="build the scenario, then the poisoned model and the retrain reference")
    _common(p)
    p.set_defaults(fn=cmd_poison)
    from rapidun.eval.command import add_parser as add_eval

    add_eval(sub, _common, _hit_rule_args)
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on your records (a LoRA by the sft.* settings, merged) into a new model folder: "
        "e.g. a retrain reference, trained on your clean data without the forget records",
        description="LoRA SFT as rapidun's own (sft.lr, sft.epochs, sft.batch_size, sft.lora_*), merged into the "
        "model and saved to --out (written atomically; cached by content in $RAPIDUN_CACHE/sft). --model-path is "
        "never modified; an existing --out is refused unless --overwrite and it holds an earlier fine-tune.",
    )
    _common(p)
    p.add_argument("--model-path", required=True, help="the model to fine-tune (folder, hub id or 'default')")
    p.add_argument("--records", required=True, help="training records (.jsonl/.json/.csv in data.format)")
    p.set_defaults(fn=cmd_finetune)
    p = sub.add_parser("influence", help="per-sample gradient sketches (cached) and the train x test influence matrix")
    _common(p)
    p.add_argument("--model-path", help="model to take gradients at (default: model.name), e.g. the poisoned model")
    p.add_argument("--train", required=True, help="JSONL/CSV of train samples (format from data.format)")
    p.add_argument("--test", required=True, help="JSONL/CSV of test samples")
    p.set_defaults(fn=cmd_influence)
    p = sub.add_parser("influence-check", help="sketch fidelity: sketched vs exact inner products for several K")
    _common(p)
    p.add_argument("--model-path", help="model to take gradients at (default: model.name)")
    p.add_argument("--scenario", help="scenario folder whose forget+retain packs are used (default: build from config)")
    p.add_argument("--n", type=int, default=60, help="number of forget+retain samples (default 60)")
    p.add_argument("--K", type=int, nargs="+", default=[2**12, 2**14, 2**16], help="sketch lengths")
    p.add_argument("--topk", type=int, default=10, help="k of the top-k overlap")
    p.add_argument("--loo-train", type=int, default=12, help="leave-one-out: train samples (0 = skip the check)")
    p.add_argument("--loo-test", type=int, default=4, help="leave-one-out: test samples")
    p.add_argument("--loo-removed", type=int, default=4, help="leave-one-out: samples removed, one at a time")
    p.add_argument("--loo-steps", type=int, default=3, help="leave-one-out: full-batch SGD steps per retraining")
    p.add_argument("--loo-lr", type=float, default=1e-2, help="leave-one-out: SGD learning rate")
    p.set_defaults(fn=cmd_influence_check)
    from rapidun.cli_unlearn import add_parser as add_unlearn

    add_unlearn(sub, _common)
    p = sub.add_parser(
        "study",
        help="scenarios × methods (+ overrides) × seeds from a study YAML; selection on validation, paired tests with "
        "Holm-adjusted p on test → OUT/study.json, study.md, study.html (resumable)",
    )
    p.add_argument("study", help="the study YAML (see configs/study.yaml)")
    p.add_argument("--out", required=True, help="output folder (one run folder per scenario inside)")
    p.add_argument("--overwrite", action="store_true", help="replace run folders that hold a different run")
    p.add_argument("--only", nargs="+", metavar="SCENARIO", help="run only these scenarios of the study file")
    p.set_defaults(fn=cmd_study)
    p = sub.add_parser(
        "verify",
        help="did it really forget? relearning, quantization, trigger fuzzing and membership attacks on a model, "
        "with the poisoned model and retrain as yardsticks → OUT/verification.json, verification.md (resumable)",
    )
    _common(p)
    p.add_argument("--model-path", required=True, help="the model to verify (folder or hub id), e.g. the poisoned one")
    p.add_argument("--adapter", help="a PEFT adapter on --model-path (e.g. OUT/adapter of `rapidun unlearn`)")
    p.add_argument("--scenario", help="scenario folder (RUN/scenario): triggered prompts, forget pack, held-out poison")
    p.add_argument("--forget", help="your case: the records that were unlearned (data.format)")
    p.add_argument("--probes", help="your case: prompts with a group; verify.probe_group's hit rate is the behaviour")
    _hit_rule_args(p)
    p.add_argument("--retain", help="your case: held-out good records (their perplexity; the learned detector)")
    p.add_argument("--heldout", help="your case: records like the forget ones, never trained on (membership test)")
    p.add_argument("--poisoned", help="the poisoned model (default: RUN/training/poisoned.json beside the scenario)")
    p.add_argument("--reference", help="the retrain reference (default: RUN/training/retrain.json beside the scenario)")
    p.add_argument("--name", help="label of the verified model (default: the adapter's or model's folder name)")
    p.set_defaults(fn=cmd_verify)
    from rapidun.trace.command import add_parser as add_trace

    add_trace(sub, _common)
    sub.choices["trace"].set_defaults(fn=cmd_trace)
    p = sub.add_parser("config", help="print the resolved config (or every field with its help)")
    _common(p, out_required=False)
    p.add_argument("--fields", action="store_true", help="list every field, its default and help")
    p.set_defaults(fn=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rapidun`` console script.

    Exit status: 0 done; 2 a user error (one message, what is wrong, where, what to do); 130 interrupted (rerun
    the same command to resume); 1 a bug (traceback and a request to report it).
    """
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_inputs(args)
        args.fn(args)
        if getattr(args, "out", None) and args.cmd != "study":
            from rapidun.distributed import is_main
            from rapidun.run_folder import mark_complete

            if is_main():
                mark_complete(args.out)
    except RapidunError as e:
        print(f"rapidun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrapidun: interrupted; rerun the same command to resume (finished parts are kept)", file=sys.stderr)
        return 130
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(
                f"rapidun: error: no space left on the device{where}; free some space (or point --out / "
                "RAPIDUN_CACHE elsewhere) and rerun the same command to resume",
                file=sys.stderr,
            )
            return 2
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"rapidun: error: cannot write {e.filename or ''}: {e.strerror}; check permissions", file=sys.stderr)
            return 2
        return _bug()
    except Exception:
        return _bug()
    return 0


def _bug() -> int:
    """An unexpected exception: the traceback, then one line asking for a report (exit status 1)."""
    import traceback

    from rapidun import __version__

    traceback.print_exc()
    print(
        f"rapidun {__version__}: this is a bug, not a problem with your input; please report it with the command "
        "line and the traceback above",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
