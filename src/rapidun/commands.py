"""What ``rapidun unlearn`` and ``rapidun finetune`` do once their inputs are loaded.

One implementation, called by the command line (:mod:`rapidun.cli_unlearn`, :mod:`rapidun.cli`: parse the flags,
then print) and by the Python API (:mod:`rapidun.api`: return objects). Nothing here reads ``argparse`` flags or
prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rapidun.config import RunConfig
from rapidun.data.records import Record
from rapidun.errors import RapidunError


def start_model(model_path: str, adapter: str | None) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(model path to load, the receipt's ``start_model``, earlier receipts) for a model [+ a PEFT adapter]."""
    from rapidun.models import fingerprint, resolve_model_path, with_adapter
    from rapidun.receipt import earlier_receipts

    base = resolve_model_path(model_path)
    path = with_adapter(base, adapter)
    start: dict[str, Any] = {"model": model_path, "fingerprint": fingerprint(base)}
    if adapter:
        start |= {"adapter": adapter, "adapter_fingerprint": fingerprint(adapter), "merged": path}
    previous = earlier_receipts(adapter, base if Path(base).is_dir() else None)
    return path, start, previous


def unlearn_overrides(
    method: str, overrides: list[str], model_path: str, adapter: str | None, base: str | None, merge: bool = False
) -> list[str]:
    """The config overrides of an unlearning run: ``unlearn.methods=[method]``, ``unlearn.merge``, and distill's
    ``unlearn.distill_base`` (``base``, or with an adapter the model it sits on).

    Raises:
        RapidunError: distill without a base model.
    """
    ov = [*overrides, f"unlearn.methods=[{method}]"]
    if merge:
        ov.append("unlearn.merge=true")
    if method == "distill":
        b = base or (model_path if adapter else None)
        if not b and not any(o.startswith("unlearn.distill_base=") for o in ov):
            raise RapidunError(
                "distill resets the fine-tuning delta toward the base model: pass --base BASE (the model "
                "--model-path was fine-tuned from), or give the fine-tune as --adapter on its base --model-path"
            )
        if b:
            ov.append(f"unlearn.distill_base={b}")
    return ov


def check_unlearn(method_name: str, cfg: RunConfig, parts: dict[str, list[Record]]) -> None:
    """Refuse, before anything is written, a method that cannot run on these packs.

    Raises:
        RapidunError: ``retrain`` (not an unlearning method), a method that needs a scenario's corpus, or
            ``fisher`` without held-out clean records.
    """
    from rapidun.cover import check_corpus, needs_corpus
    from rapidun.methods import get_method

    method = get_method(method_name)
    if method.kind == "retrain":
        raise RapidunError("'retrain' is the SFT reference: build it with `rapidun poison` or `rapidun run`")
    if needs_corpus(method_name, cfg.unlearn.distill_teacher):
        check_corpus(parts)  # the user's files hold no corpus to search
    if method.kind == "fisher" and not parts.get("val_clean"):
        raise RapidunError(
            "fisher calibrates its noise on held-out clean records: pass a --retain file larger than the retain "
            "buffer (the records not drawn serve as validation), or use --scenario"
        )


def run_unlearn(
    method: str,
    model_path: str,
    adapter: str | None,
    parts: dict[str, list[Record]],
    packs: dict[str, Any] | None,
    cfg: RunConfig,
    out: str | Path,
    overwrite: bool,
    inputs: dict[str, Any],
) -> tuple[Any, Any, dict[str, Any], Path]:
    """Unlearn ``parts`` from ``model_path`` [+ ``adapter``] with ``method`` into the output folder ``out``.

    Claims ``out`` (:func:`rapidun.run_folder.prepare_out` with ``inputs`` as its identity), writes ``packs.json``,
    the influence views the method needs, then :func:`rapidun.unlearn.unlearn` (adapter, weights, audit, result,
    receipt), ``calibration.png`` (the calibrated schedule's curve, when it ran) and, with ``unlearn.merge``,
    ``merged/``. Call :func:`check_unlearn` first.

    Returns:
        ``(merged model, tokenizer, result dict, out)``; on ranks other than 0 the result is not written.
    """
    from rapidun.distributed import barrier, init_from_env, is_main
    from rapidun.io import atomic_path, write_json
    from rapidun.methods import views_kind
    from rapidun.run_folder import prepare_out
    from rapidun.unlearn import unlearn
    from rapidun.views import method_views

    init_from_env()  # data-parallel training (and sharded sketches) under torchrun / accelerate launch
    path, start, previous = start_model(model_path, adapter)
    out = prepare_out(out, cfg, overwrite, "unlearn", inputs) if is_main() else Path(out)
    barrier()
    if packs is not None and is_main():
        write_json(out / "packs.json", packs)
    views = None
    kind = views_kind(method, cfg.unlearn.distill_teacher)
    if kind:
        views = method_views(kind, path, parts["forget"], parts["retain"], cfg, out / "influence")
    prov = {"start": start, "packs": packs, "previous": previous}
    merged, tok, res = unlearn(method, parts, path, cfg, out, views, provenance=prov)
    cal = res.get("calibration") or {}
    if cal.get("schedule") == "calibrated" and is_main():  # the schedule's curve, drawn (docs/method.md)
        from rapidun.reporting.plots import calibration_curves

        with atomic_path(out / "calibration.png") as tmp:
            tmp.write_bytes(calibration_curves([(method, cal)]))
    if cfg.unlearn.merge and is_main():
        with atomic_path(out / "merged") as tmp:
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if (out / "receipt.json").is_file():
                (tmp / "receipt.json").write_bytes((out / "receipt.json").read_bytes())
    return merged, tok, res, out


def unlearn_lines(method: str, res: dict[str, Any], packs: dict[str, Any] | None) -> list[str]:
    """The summary of an unlearning result that ``rapidun unlearn`` prints (method, packs, timings, losses)."""
    t = res["timings"]
    a = res["audit_means"]
    lines = [f"{method}: {res['summary']}"]
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
        lines.append(
            f"packs: {packs['n_forget']} forget ({packs['forget_with_replacement']} with a replacement answer), "
            f"{packs['n_retain']} retain {how}"
        )
    lines.append(
        "timings (s): "
        + ", ".join(f"{k.removesuffix('_s')} {t[k]:.1f}" for k in ("influence_s", "mapping_s", "training_s", "time_s"))
        + (" (influence reused from the run folder; its measured time)" if res.get("influence_cached") else "")
    )
    cal = res.get("calibration")
    if cal and cal.get("schedule") == "calibrated":
        steps = res.get("train", {}).get("steps")
        if cal.get("ended_in") == "probe":
            lr = f"rate {cal['chosen_lr']:.2g} (still probing)"
        else:
            lr = f"rate up to {cal.get('peak_lr', cal['chosen_lr']):.2g}"
        nsig, nf = len(cal.get("signal_records") or []), cal.get("forget_records", 0)
        sig = f"forget signal on {nsig} of {nf} records" if 0 < nsig < nf else "forget signal"
        lines.append(
            f"schedule: calibrated within {cal['budget']:.2f}x held-out perplexity: {lr} after the probe "
            f"{cal['ladder'][0]:.0e}..{cal['ladder'][-1]:.0e}, {steps} steps, {cal['backoffs']} back-off(s), kept "
            f"step {cal['best_step']} (x{cal['best_utility_ratio']:.3f}, {sig} {cal['start_signal']:.2f} -> "
            f"{cal['best_signal']:.2f}, target {cal['target']:g}: "
            f"{'reached' if cal['reached_target'] else 'not reached'}); measuring took {cal['check_s']:.1f} s"
        )
    lines.append("forget CE poisoned " + _arrow(a["forget_ce_poisoned_before"], a["forget_ce_poisoned_after"])
                 + "; clean " + _arrow(a["forget_ce_clean_before"], a["forget_ce_clean_after"])
                 + "; retain CE " + _arrow(a["retain_ce_before"], a["retain_ce_after"]))  # fmt: skip
    h = res.get("heldout")
    if h:
        ce = _arrow(h["ce_before"], h["ce_after"])
        if packs is None:
            where = "the scenario's val_clean"
        elif packs.get("heldout_path"):
            where = f"from {packs['heldout_path']}"
        else:  # retain records the buffer left out: the model may well have trained on them
            where = "retain records not in the buffer; --heldout-clean for records the model never saw"
        lines.append(f"held-out clean records ({h['n']}, {where}): CE {ce}, perplexity x{h['ppl_ratio']:.2f}")
    elif packs is not None:
        lines.append(
            "held-out clean records: none (a --retain file larger than the buffer leaves some out to check utility; "
            "or check your own unrelated prompts: rapidun eval --probes P --start-model M)"
        )
    c = res.get("collateral")
    if c and c.get("agreement") is not None:
        rr = (
            ""
            if c.get("replacement_rate_after") is None
            else f"replacement answer {c['replacement_rate_before']:.2f} -> {c['replacement_rate_after']:.2f}, "
        )
        kl = "" if c.get("kl") is None else f", KL {c['kl']:.4f} per token"
        lines.append(
            f"collateral on the held-out clean prompts ({c['n']}): {rr}answers agree {c['agreement']:.2f} with the "
            f"start model's (first {c['tokens']} tokens){kl}"
        )
    return lines


def _arrow(b: float | None, a: float | None) -> str:
    """``b -> a`` with 3 decimals; ``n/a`` where a pack has no such answers (e.g. no replacement answers)."""
    return "n/a" if b is None or a is None else f"{b:.3f} -> {a:.3f}"


FINETUNE_META = "rapidun_sft.json"  # written into every fine-tuned folder (finetune.finetune's meta)


def check_finetune_out(out: str | Path, model_path: str, overwrite: bool) -> Path:
    """The output folder of a fine-tune, checked before any work: not the model nor inside it; an existing
    folder only with ``overwrite`` and only when it holds an earlier fine-tune (rapidun never deletes a folder it
    did not write).

    Raises:
        RapidunError: naming the folder and what to do.
    """
    o = Path(out).expanduser()
    m = Path(model_path).expanduser()
    if m.exists():
        mo, ro = m.resolve(), o.resolve()
        if ro == mo or ro.is_relative_to(mo) or mo.is_relative_to(ro):
            raise RapidunError(
                f"--out {out} is the model {model_path}, inside it or holds it; choose another folder (the model is "
                "never modified)"
            )
    if o.exists() and not o.is_dir():
        raise RapidunError(f"--out {out} is a file; give a folder")
    if o.is_dir() and any(o.iterdir()):
        if not overwrite:
            raise RapidunError(f"--out {out} already exists; choose another folder, or pass --overwrite to replace it")
        if not (o / FINETUNE_META).is_file():
            raise RapidunError(
                f"--out {out} holds no rapidun fine-tune ({FINETUNE_META}); rapidun never deletes files it did not "
                "write (not even with --overwrite): choose another --out or empty it"
            )
    return o


def run_finetune(model_path: str, records: list[Record], cfg: RunConfig, out: str | Path, overwrite: bool) -> dict:
    """Fine-tune ``model_path`` on ``records`` (a LoRA by the ``sft.*`` settings, merged: the project's SFT,
    :func:`rapidun.finetune.finetune`, cached by content) and save the model folder to ``out`` atomically.

    Returns:
        The SFT meta (``train``: steps, ``loss_curve``, ``time_s``; ``cached``) with ``path`` = ``out``.
    """
    import dataclasses
    import shutil

    from rapidun.finetune import finetune
    from rapidun.io import atomic_path
    from rapidun.models import resolve_model_path

    o = check_finetune_out(out, model_path, overwrite)
    base = resolve_model_path(model_path)
    meta = finetune(records, dataclasses.replace(cfg.model, name=base), cfg.sft, "finetune")
    with atomic_path(o) as tmp:
        shutil.copytree(meta["path"], tmp)
    return {**meta, "model": model_path, "path": str(o)}
