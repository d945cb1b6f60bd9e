"""The Python API: :func:`unlearn`, :func:`evaluate`, :func:`verify`, :func:`trace`, :func:`finetune`.

Each function does what its command does, through the same code: ``unlearn`` and ``finetune`` call
:mod:`rapidun.commands` (as ``rapidun unlearn`` / ``rapidun finetune`` do); ``evaluate``, ``verify`` and
``trace`` run the command's own function (``rapidun eval --probes`` / ``verify --forget --probes`` / ``trace
--train --probes``) on the arguments the command line would parse, and return the result it writes. So inputs are
validated the same way (the same errors, raised as :class:`rapidun.errors.RapidunError`), outputs are written
atomically into ``out`` the same way, and a result equals the command's on the same inputs and seed.

Inputs besides paths:

* a model: a folder, a hub id, ``"default"`` (the embedded model), or a transformers model in memory together
  with its ``tokenizer`` — saved to a temporary folder first (the commands work on folders; a PEFT model must be
  merged first, ``model.merge_and_unload()``);
* records (forget, retain, corpus, ...): a ``.jsonl``/``.json``/``.csv`` path in ``data.format``, a list of
  :class:`rapidun.data.records.Record`, or a list of dicts with the columns such a file has (``instruction``,
  ``context``, ``response``, optional ``id`` and ``replacement`` for the default ``data.format=dolly``); a bad
  dict is refused naming it (``forget[3]: missing required field 'response' ...``) before anything is written;
* probes: a path, or a list of dicts with the probe file's columns.

``out=None`` works in a temporary folder that is deleted on return (the returned objects stay).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidun.data.records import Record
from rapidun.errors import RapidunError

__all__ = ["UnlearnResult", "evaluate", "finetune", "trace", "unlearn", "verify"]

PathLike = str | Path
Records = PathLike | Sequence[Record] | Sequence[dict[str, Any]]


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (the adapter merged into the start model; in memory, eval mode).
        tokenizer: its tokenizer.
        out: the output folder (adapter/, weights.jsonl, audit.jsonl, result.json, receipt.json, packs.json and,
            when the calibrated schedule ran, calibration.png), or None when ``out=None`` (the temporary folder is
            gone).
        result: ``result.json``'s content (timings, weights, loss curve, ``audit_means``, ``heldout``, ...).
        warnings: the run's warnings (forget loss barely moved, held-out perplexity rose, ...).
        packs: how the forget/retain packs were built (``packs.json``).
    """

    model: Any
    tokenizer: Any
    out: Path | None
    result: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    packs: dict[str, Any] | None = None

    @property
    def summary(self) -> str:
        """The lines ``rapidun unlearn`` prints: method, packs, timings, forget/retain losses before -> after."""
        from rapidun.commands import unlearn_lines

        return "\n".join(unlearn_lines(self.result["method"], self.result, self.packs))


def unlearn(
    model: Any,
    forget: Records,
    retain: Records,
    *,
    method: str = "uniform",
    out: PathLike | None = None,
    config: PathLike | None = None,
    overrides: Sequence[str] = (),
    adapter: PathLike | None = None,
    base: PathLike | None = None,
    heldout_clean: Records | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> UnlearnResult:
    """Unlearn the ``forget`` records from ``model`` with one method: ``rapidun unlearn --forget --retain``.

    A retain buffer of ``round(scenario.retain_ratio × |forget|)`` records is drawn from ``retain`` when it holds
    more (seeded by ``unlearn.seed``; the rest serve as held-out clean records), as on the command line.

    Args:
        model: the model to clean: a folder, a hub id, ``"default"``, or a transformers model in memory (then
            ``tokenizer`` is required; it is saved to a temporary folder and the folder-based engine runs on it).
            Never modified.
        forget: the records to unlearn (path, ``Record`` list or dict list; an optional replacement answer).
        retain: good training records: a retain buffer, or a larger set to draw one from.
        method: an unlearning method (``rapidun unlearn --help`` lists them).
        out: output folder (claimed as ``rapidun unlearn --out`` does: a folder holding another output is refused
            unless ``overwrite``); None: a temporary folder, deleted on return.
        config: a config file or a shipped config's name (``"demo"``); None: the defaults.
        overrides: dotted ``key=value`` settings, e.g. ``("unlearn.lr=5e-4",)``.
        adapter: a PEFT adapter on ``model`` to start from (the two merged).
        base: distill: the base model ``model`` was fine-tuned from.
        heldout_clean: clean records the model never trained on (``--heldout-clean``): the utility budget and
            the collateral checks measure up to 40 of them instead of retain records left out of the buffer.
        tokenizer: the tokenizer of an in-memory ``model``.
        overwrite: replace a different output in ``out``.

    Returns:
        :class:`UnlearnResult`.

    Raises:
        RapidunError: a bad input (named, with what to do), or a run stopped by a non-finite loss (outputs
            written to ``out``).
    """
    from rapidun.cli_inputs import identity
    from rapidun.commands import check_unlearn, run_unlearn, unlearn_overrides
    from rapidun.config import load_config
    from rapidun.data.packs import packs_from_records, with_heldout
    from rapidun.io import stable_hash
    from rapidun.methods import get_method

    get_method(method)  # an unknown name fails here, listing the methods
    with tempfile.TemporaryDirectory(prefix="rapidun-api-") as tmp:
        model_path = _model_folder(model, tokenizer, Path(tmp))
        ov = unlearn_overrides(method, list(overrides), model_path, _s(adapter), _s(base))
        cfg = load_config(config, ov)
        ns = _check(config=config, model_path=model_path, adapter=adapter, forget=forget, retain=retain, out=out,
                    heldout_clean=heldout_clean)  # fmt: skip
        ns.method, ns.base, ns.scenario, ns.merge = method, _s(base), None, False
        f, f_where = _records(forget, "forget", cfg)
        r, r_where = _records(retain, "retain", cfg)
        parts, packs = packs_from_records(f, r, cfg.scenario.retain_ratio, cfg.unlearn.seed, f_where, r_where)
        given = {"forget": f, "retain": r}
        if heldout_clean is not None:
            h, h_where = _records(heldout_clean, "heldout_clean", cfg)
            parts, given["heldout_clean"] = with_heldout(parts, h, h_where, packs), h
        check_unlearn(method, cfg, parts)
        inputs = identity(
            ns, "method", "model_path", "adapter", "base", "scenario", "forget", "retain", "heldout_clean", "merge"
        )
        for k, recs in given.items():
            if k not in inputs:  # records in memory: identified by their content
                inputs[k] = {"records": stable_hash([x.to_json() for x in recs]), "format": cfg.data.format}
        target = Path(out) if out is not None else Path(tmp) / "out"
        merged, tok, res, o = run_unlearn(
            method, model_path, _s(adapter), parts, packs, cfg, target, overwrite, inputs
        )  # fmt: skip
        _complete(o)
    if not res.get("complete", True):
        raise RapidunError(f"{res['stopped']}" + (f" (outputs written to {o})" if out is not None else ""))
    return UnlearnResult(merged, tok, o if out is not None else None, res, list(res.get("warnings", [])), packs)


def evaluate(
    model: Any,
    probes: PathLike | Sequence[dict[str, Any]],
    *,
    adapter: PathLike | None = None,
    regex: str | None = None,
    keywords: Sequence[str] | None = None,
    forget: Records | None = None,
    retain: Records | None = None,
    name: str | None = None,
    start_model: PathLike | None = None,
    config: PathLike | None = None,
    overrides: Sequence[str] = (),
    out: PathLike | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """What ``rapidun eval --probes`` computes: hit rate per probe group, forget/replacement/retain perplexity.

    Args:
        model: a folder, a hub id, ``"default"``, or a model in memory (with ``tokenizer``).
        probes: a probe file, or dicts with its columns (``prompt``, ``group``, optional ``context``, ``id``).
        adapter: a PEFT adapter on ``model`` (e.g. ``UnlearnResult.out / "adapter"``).
        regex: an answer is a hit when this regex matches (case-insensitive).
        keywords: or when one of these words occurs. Neither: a detector learned from ``forget`` vs ``retain``.
        forget: forget records (their answers' perplexity; the learned detector's positives).
        retain: retain records (their perplexity; the detector's negatives).
        name: the output files' name (``probes_<name>.json``); default: the adapter's or model's folder name.
        start_model: the model before unlearning: adds ``collateral`` (the clean probes' answers against its own;
            default: the start model named by ``adapter``'s receipt, as on the command line).
        config, overrides, out, overwrite, tokenizer: as in :func:`unlearn`.

    Returns:
        ``probes_<name>.json``'s content (``groups``: ``{group: {n, hits, hit_rate}}``, ``forget_ppl_poisoned``,
        ``forget_ppl_clean``, ``retain_ppl``, ``hit_rule``, ...) plus ``rows``: one dict per probe (its answer
        ``generation`` and ``hit``).
    """
    with tempfile.TemporaryDirectory(prefix="rapidun-api-") as tmp:
        t = Path(tmp)
        argv = ["eval", *_model_argv(model, tokenizer, adapter, t), "--probes", _probe_file(probes, t)]
        argv += _opt("--regex", regex) + _opt("--keywords", keywords) + _opt("--name", name)
        argv += _opt("--start-model", start_model)
        argv += _record_argv({"forget": forget, "retain": retain}, t, config, overrides)
        o = Path(out) if out is not None else t / "out"
        args = _run(argv, o, config, overrides, overwrite, t)
        label = name or Path(args.adapter or args.model_path).name
        doc = json.loads((o / f"probes_{label}.json").read_text(encoding="utf-8"))
        doc["rows"] = _read_jsonl(o / f"probes_{label}.jsonl")
    return doc


def verify(
    model: Any,
    forget: Records,
    probes: PathLike | Sequence[dict[str, Any]],
    *,
    adapter: PathLike | None = None,
    retain: Records | None = None,
    heldout: Records | None = None,
    poisoned: PathLike | None = None,
    reference: PathLike | None = None,
    regex: str | None = None,
    keywords: Sequence[str] | None = None,
    name: str | None = None,
    config: PathLike | None = None,
    overrides: Sequence[str] = (),
    out: PathLike | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Did it really forget? ``rapidun verify --forget --probes``: relearning, quantization and membership attacks.

    Args:
        model: the model to verify (folder, hub id, ``"default"``, or in memory with ``tokenizer``).
        forget: the records that were unlearned.
        probes: probe file or dicts; the hit rate of group ``verify.probe_group`` (default ``triggered``) is the
            behaviour.
        adapter: a PEFT adapter on ``model`` (e.g. the ``adapter/`` of an unlearning output).
        retain: held-out good records (their perplexity; the learned detector's negatives).
        heldout: records like the forget ones, never trained on (the membership test).
        poisoned: the model before unlearning (one end of the scale).
        reference: a model trained without the forget records (the other end; see :func:`finetune`).
        regex, keywords: the hit rule, as in :func:`evaluate`.
        name: the verified model's label (default: the adapter's or model's folder name).
        config, overrides, out, overwrite, tokenizer: as in :func:`unlearn`.

    Returns:
        ``verification.json``'s content (per model and attack; ``verification.md`` in ``out``).
    """
    with tempfile.TemporaryDirectory(prefix="rapidun-api-") as tmp:
        t = Path(tmp)
        argv = ["verify", *_model_argv(model, tokenizer, adapter, t), "--probes", _probe_file(probes, t)]
        argv += _opt("--poisoned", poisoned) + _opt("--reference", reference) + _opt("--name", name)
        argv += _opt("--regex", regex) + _opt("--keywords", keywords)
        argv += _record_argv({"forget": forget, "retain": retain, "heldout": heldout}, t, config, overrides)
        o = Path(out) if out is not None else t / "out"
        _run(argv, o, config, overrides, overwrite, t)
        return json.loads((o / "verification.json").read_text(encoding="utf-8"))


def trace(
    model: Any,
    corpus: Records,
    probes: PathLike | Sequence[dict[str, Any]],
    *,
    adapter: PathLike | None = None,
    generate: bool = False,
    regex: str | None = None,
    keywords: Sequence[str] | None = None,
    to_forget: int | str | None = None,
    top: int | None = None,
    hotwords: Sequence[str] | None = None,
    auto_hotwords: bool = False,
    config: PathLike | None = None,
    overrides: Sequence[str] = (),
    out: PathLike | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Find the training records behind a behaviour: ``rapidun trace --train --probes``.

    Args:
        model: the model that shows the behaviour (folder, hub id, ``"default"``, or in memory with ``tokenizer``).
        corpus: the training corpus (path, ``Record`` list or dict list).
        probes: a file or dicts with ``prompt`` and the bad ``output`` (optional ``context``, ``id``).
        adapter: a PEFT adapter on ``model``.
        generate: use the model's greedy answers as the outputs (kept where ``regex``/``keywords`` match).
        regex, keywords: with ``generate``: which answers show the behaviour.
        to_forget: write the N most suspect records (or ``"auto"``: the outliers) to ``out/forget.jsonl``.
        top: records kept per probe (``trace.top_k``).
        hotwords, auto_hotwords: token-wise mode (the probe loss on these words / on words learned from outputs).
        config, overrides, out, overwrite, tokenizer: as in :func:`unlearn`.

    Returns:
        ``trace.json``'s content (``top``: the 20 most suspect, ``stats``, ``forget``, ...) plus ``ranked``: every
        record, most suspect first (``ranked.jsonl``).
    """
    with tempfile.TemporaryDirectory(prefix="rapidun-api-") as tmp:
        t = Path(tmp)
        argv = ["trace", *_model_argv(model, tokenizer, adapter, t), "--probes", _probe_file(probes, t)]
        argv += ["--generate"] if generate else []
        argv += _opt("--regex", regex) + _opt("--keywords", keywords) + _opt("--hotwords", hotwords)
        argv += ["--auto-hotwords"] if auto_hotwords else []
        argv += _opt("--top", top) + _opt("--to-forget", to_forget)
        argv += _record_argv({"train": corpus}, t, config, overrides)
        o = Path(out) if out is not None else t / "out"
        _run(argv, o, config, overrides, overwrite, t)
        doc = json.loads((o / "trace.json").read_text(encoding="utf-8"))
        doc["ranked"] = _read_jsonl(o / "ranked.jsonl")
    return doc


def finetune(
    model: Any,
    records: Records,
    *,
    out: PathLike,
    config: PathLike | None = None,
    overrides: Sequence[str] = (),
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Fine-tune ``model`` on ``records`` into a new model folder: ``rapidun finetune``.

    rapidun's own SFT: a fresh LoRA trained by the ``sft.*`` settings (``sft.lr``, ``sft.epochs``,
    ``sft.batch_size``, ``sft.lora_*``) on the records' answers, merged into the model, cached by content in
    ``$RAPIDUN_CACHE/sft``, and saved to ``out`` atomically. Trained on clean data without the forget records,
    the result is a retrain reference (``verify(reference=...)``, ``rapidun compare --retrain-model``).

    Args:
        model: the model to start from (folder, hub id, ``"default"``, or in memory with ``tokenizer``); never
            modified.
        records: the training records (path, ``Record`` list or dict list).
        out: the new model folder. An existing folder is refused unless ``overwrite`` and it holds an earlier
            fine-tune; it may not be the model's folder.
        config, overrides, tokenizer: as in :func:`unlearn`.
        overwrite: replace an earlier fine-tune in ``out``.

    Returns:
        ``out`` as a :class:`~pathlib.Path` (a model folder with ``rapidun_sft.json``: the training statistics).
    """
    from rapidun.commands import check_finetune_out, run_finetune
    from rapidun.config import load_config

    with tempfile.TemporaryDirectory(prefix="rapidun-api-") as tmp:
        model_path = _model_folder(model, tokenizer, Path(tmp))
        cfg = load_config(config, list(overrides))
        _check(config=config, model_path=model_path, records=records, out=out)
        check_finetune_out(out, model_path, overwrite)
        recs, _ = _records(records, "records", cfg)
        run_finetune(model_path, recs, cfg, out, overwrite)
    return Path(out)


# ---------------------------------------------------------------- helpers


def _s(x: PathLike | None) -> str | None:
    return None if x is None else str(x)


def _model_folder(model: Any, tokenizer: Any, tmp: Path) -> str:
    """A folder, hub id or ``default`` as is; a model in memory saved with its tokenizer into ``tmp/model``."""
    if isinstance(model, str | Path):
        return str(model)
    if not hasattr(model, "save_pretrained"):
        raise RapidunError(
            f"model: expected a folder, a hub id, 'default' or a transformers model, got {type(model).__name__}"
        )
    if hasattr(model, "peft_config"):
        raise RapidunError(
            "model is a PEFT model: merge it first (model = model.merge_and_unload()), or pass the base model's "
            "folder and adapter=the adapter's folder"
        )
    if tokenizer is None:
        raise RapidunError("model is a model in memory: pass its tokenizer too (tokenizer=...)")
    folder = tmp / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _check(**paths: Any) -> argparse.Namespace:
    """The command line's input checks (:func:`rapidun.cli_inputs.check_inputs`) on the arguments given as paths."""
    from rapidun.cli_inputs import check_inputs

    ns = argparse.Namespace(**{k: (str(v) if isinstance(v, str | Path) else None) for k, v in paths.items()})
    check_inputs(ns)
    return ns


def _records(x: Records, name: str, cfg: Any) -> tuple[list[Record], str]:
    """``(records, where they came from)`` from a path, a ``Record`` list or a dict list (validated as a file's)."""
    from rapidun.data.records import load_records, records_from_rows

    d = cfg.data
    if isinstance(x, str | Path):
        return load_records(str(x), d.format, d.fields), str(x)
    if isinstance(x, dict) or not isinstance(x, Sequence):
        raise RapidunError(f"{name}: expected a file path or a list of records, got {type(x).__name__}")
    rows = list(x)
    if rows and all(isinstance(r, Record) for r in rows):
        records_from_rows([r.to_json() for r in rows], name)  # the same checks (text fields, unique ids)
        return rows, f"{name} ({len(rows)} records)"
    if any(isinstance(r, Record) for r in rows):
        raise RapidunError(f"{name}: a list of Record or a list of dicts, not both")
    return records_from_rows(rows, name, d.format, d.fields), f"{name} ({len(rows)} records)"


def _write_records(x: Records, name: str, tmp: Path, cfg: Any) -> str:
    """A path as is; records in memory validated, then written as ``tmp/<name>.jsonl`` in ``data.format``."""
    from rapidun.io import write_jsonl
    from rapidun.trace.command import format_row

    if isinstance(x, str | Path):
        return str(x)
    recs, _ = _records(x, name, cfg)
    path = tmp / f"{name}.jsonl"
    write_jsonl(path, [format_row(r, cfg.data.format, cfg.data.fields) for r in recs])
    return str(path)


def _record_argv(
    given: dict[str, Records | None], tmp: Path, config: PathLike | None, overrides: Sequence[str]
) -> list[str]:
    from rapidun.config import load_config

    cfg = load_config(config, list(overrides))
    argv: list[str] = []
    for flag, x in given.items():
        if x is not None:
            argv += [f"--{flag}", _write_records(x, flag, tmp, cfg)]
    return argv


def _probe_file(probes: PathLike | Sequence[dict[str, Any]], tmp: Path) -> str:
    """A probe path as is; dicts checked and written to ``tmp/probes.jsonl`` (the command validates its rows)."""
    if isinstance(probes, str | Path):
        return str(probes)
    if isinstance(probes, dict) or not isinstance(probes, Sequence) or not probes:
        raise RapidunError("probes: expected a probe file path or a non-empty list of dicts")
    for i, p in enumerate(probes):
        if not isinstance(p, dict):
            raise RapidunError(f"probes[{i}]: expected a dict (prompt, group, ...), got {type(p).__name__}")
    path = tmp / "probes.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes), encoding="utf-8")
    return str(path)


def _model_argv(model: Any, tokenizer: Any, adapter: PathLike | None, tmp: Path) -> list[str]:
    return ["--model-path", _model_folder(model, tokenizer, tmp), *_opt("--adapter", adapter)]


def _opt(flag: str, v: Any) -> list[str]:
    if v is None or v is False:
        return []
    if isinstance(v, list | tuple):
        return [flag, *map(str, v)]
    return [flag, str(v)]


def _run(
    argv: list[str], out: Path, config: PathLike | None, overrides: Sequence[str], overwrite: bool, tmp: Path
) -> argparse.Namespace:
    """The command of ``argv`` as ``rapidun`` runs it (input checks, the command, the output marked complete),
    its printed summary silenced; errors raised, a row of a list written to ``tmp`` named as ``probes[i]``."""
    from rapidun.cli import build_parser, check_inputs

    argv = [*argv, "--out", str(out), *_opt("--config", config), *(["--overwrite"] if overwrite else [])]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed the usage error
        raise RapidunError(f"invalid arguments for `rapidun {argv[0]}` (see the message above)") from None
    args.overrides = [*args.overrides, *overrides]
    try:
        check_inputs(args)
        with contextlib.redirect_stdout(io.StringIO()):
            args.fn(args)
    except RapidunError as e:
        where = re.escape(str(tmp)) + r"/(\w+)\.jsonl:(\d+)"
        msg = re.sub(where, lambda m: f"{m[1]}[{int(m[2]) - 1}]", str(e))
        if msg == str(e):
            raise
        raise RapidunError(msg) from None
    _complete(out)
    return args


def _complete(out: Path) -> None:
    """Mark ``out`` complete, as ``rapidun`` does at a command's end (rank 0)."""
    from rapidun.distributed import is_main
    from rapidun.run_folder import mark_complete

    if is_main():
        mark_complete(out)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
