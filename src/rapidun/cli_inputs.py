"""What every command checks before it works: input paths (exist, right kind, readable, not ``--out``), and what
identifies an output besides its config (input paths with content fingerprints)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rapidun.errors import RapidunError

# Path arguments checked when a command starts (before a config is used, a model loads or --out is claimed).
INPUT_ARGS = {
    "config": "config",
    "study": "file",
    "scenario": "scenario",
    "forget": "file",
    "retain": "file",
    "heldout_clean": "file",
    "probes": "file",
    "train": "file",
    "test": "file",
    "adapter": "adapter",
    "model_path": "model",
    "retrain_model": "model",
    "retrain_base": "model",
    "retrain_data": "file",
    "model": "model",
    "poisoned": "model",
    "reference": "model",
    "heldout": "file",
    "records": "file",
}


def check_inputs(args: argparse.Namespace) -> None:
    """Every input path exists, is of the right kind and readable; ``--out`` is none of them and inside none.

    Raises:
        RapidunError: naming the flag, the path and what to do.
    """
    import re

    from rapidun.models import DEFAULT_MODEL, GEMMA_MODEL, resolve_model_path

    for flag in ("keywords", "hotwords"):
        swallowed = [w for w in getattr(args, flag, None) or [] if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", w)]
        if swallowed:
            raise RapidunError(
                f"--{flag} took {swallowed}, which look like config overrides; put the overrides before --{flag} "
                "(or end the word list with --)"
            )
    paths: list[tuple[str, Path]] = []
    for k, kind in INPUT_ARGS.items():
        v = getattr(args, k, None)
        if not v:
            continue
        flag = k if k == "study" else "--" + k.replace("_", "-")
        p = Path(v).expanduser()
        if kind == "config":  # a file, or the name of a shipped config (`--config demo`)
            from rapidun.config import resolve_config_path

            paths.append((flag, resolve_config_path(v)))
            continue
        if kind == "model":
            if v not in (DEFAULT_MODEL, GEMMA_MODEL):
                resolve_model_path(v)
                if p.exists():
                    paths.append((flag, p))
            continue
        if not p.exists():
            raise RapidunError(f"{flag} {v} does not exist; check the path")
        if kind == "file":
            if not p.is_file():
                raise RapidunError(f"{flag} {v} is a folder; give a file")
            if not os.access(p, os.R_OK):
                raise RapidunError(f"{flag} {v}: not readable (permissions); fix them or copy the file")
        elif kind == "scenario" and not (p / "manifest.json").is_file():
            raise RapidunError(
                f"{flag} {v} is not a scenario folder (no manifest.json); give OUT/scenario of `rapidun scenario`"
            )
        elif kind == "adapter" and not (p / "adapter_config.json").is_file():
            raise RapidunError(
                f"{flag} {v}: no adapter_config.json there; point it at a PEFT adapter folder (e.g. OUT/adapter of "
                "`rapidun unlearn`)"
            )
        paths.append((flag, p))
    out = getattr(args, "out", None)
    if not out:
        return
    o = Path(out).expanduser().resolve()
    for flag, p in paths:
        r = p.resolve()
        if o == r or (r.is_dir() and o.is_relative_to(r)):
            raise RapidunError(
                f"--out {out} is the input {flag} {p} or inside it; choose another folder (inputs are never modified)"
            )
        if r.is_relative_to(o) and flag != "--config":
            raise RapidunError(
                f"the input {flag} {p} lies inside --out {out}; choose another --out (a replaced output is deleted, "
                "and inputs are never modified)"
            )


def identity(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    """What identifies an output besides the config: the given arguments, each input path with a fingerprint of
    its content (files: SHA-256; model and scenario folders: :func:`rapidun.models.fingerprint`)."""
    from rapidun.io import file_hash
    from rapidun.models import fingerprint

    ident: dict[str, Any] = {}
    for k in keys:
        v = getattr(args, k, None)
        if v is None or v is False:
            continue
        p = Path(v).expanduser() if isinstance(v, str) and INPUT_ARGS.get(k) else None
        if p is not None and p.exists():
            ident[k] = {"path": str(p.resolve()), "content": file_hash(p) if p.is_file() else fingerprint(str(p))}
        else:
            ident[k] = v
    return ident


def load_args_config(args: argparse.Namespace, default_path: Path | None = None) -> Any:
    """The command's config: ``--config`` (a file or a shipped config's name; else ``default_path``, else the
    defaults) with its ``key=value`` overrides, and ``--model`` as ``model.name``."""
    from rapidun.config import load_config

    ov = list(args.overrides)
    if getattr(args, "model", None):
        ov.append(f"model.name={args.model}")
    return load_config(args.config or default_path, ov)


def records_arg(path: str, cfg: Any) -> list:
    """The records of a command's file argument, read with the config's ``data.format`` and ``data.fields``."""
    from rapidun.data.records import load_records

    return load_records(path, cfg.data.format, cfg.data.fields)


def heldout_arg(
    args: argparse.Namespace, cfg: Any, parts: dict[str, list], packs: dict[str, Any] | None
) -> dict[str, list]:
    """``--heldout-clean FILE`` (``unlearn``, ``compare``): the packs with the clean records the utility budget, the
    held-out perplexity and the collateral checks measure (:func:`rapidun.data.packs.with_heldout`); ``parts``
    unchanged without the flag."""
    path = getattr(args, "heldout_clean", None)
    if not path:
        return parts
    from rapidun.data.packs import with_heldout

    return with_heldout(parts, records_arg(path, cfg), path, packs)
