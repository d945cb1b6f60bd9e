"""``rapidun verify``: the verification battery on one model, against the poisoned model and retrain.

``rapidun verify --model-path M [--adapter A] --scenario RUN/scenario --out OUT`` verifies ``M`` (+ ``A``) and, as
the two ends of the scale, the poisoned model and the retrain reference: ``--poisoned`` / ``--reference``, by
default the ones recorded beside the scenario (``RUN/training/poisoned.json`` and ``retrain.json``, written by
``rapidun poison``/``compare``). Output: ``OUT/verification.json``, ``OUT/verification.md`` and the cells
``OUT/verify/<label>/<attack>.json`` (a rerun reuses them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rapidun.errors import RapidunError
from rapidun.io import read_json, write_text


def recorded_model(scenario: str | Path, tag: str) -> str | None:
    """The model path recorded beside a run's scenario (``RUN/training/<tag>.json``), if that folder still exists."""
    f = Path(scenario).expanduser().resolve().parent / "training" / f"{tag}.json"
    if not f.is_file():
        return None
    try:
        path = read_json(f).get("path")
    except (OSError, ValueError):
        return None
    return path if path and Path(path).is_dir() else None


def cmd_verify(args: argparse.Namespace, cfg: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """Run the battery (see the module docstring); prints the summary table and returns verification.json."""
    from rapidun.data.scenario import load_scenario
    from rapidun.pipeline import make_detector, prepare_out
    from rapidun.reporting.markdown import render_markdown
    from rapidun.reporting.verify_tables import verification_blocks
    from rapidun.verify.stage import run_verification

    if not args.scenario:
        raise RapidunError(
            "rapidun verify needs --scenario DIR (a scenario's splits: triggered prompts, forget pack, held-out "
            "poison); verification on your own --forget/--probes files is not supported yet"
        )
    parts, _ = load_scenario(args.scenario)
    det, _ = make_detector(cfg, parts)
    poisoned = args.poisoned or recorded_model(args.scenario, "poisoned")
    reference = args.reference or recorded_model(args.scenario, "retrain")
    label = args.name or Path(args.adapter or args.model_path).name
    models: dict[str, tuple[str, str | None]] = {}
    if poisoned:
        models["poisoned"] = (poisoned, None)
    if reference:
        models["retrain"] = (reference, None)
    if label in models:
        raise RapidunError(f"--name {label!r} is reserved for the two ends of the scale; choose another --name")
    models[label] = (args.model_path, args.adapter)
    out = prepare_out(args.out, cfg, args.overwrite, "verify", identity)
    doc = run_verification(models, parts, det, cfg.verify, cfg.eval, cfg.model, out)
    md = render_markdown(verification_blocks(doc))
    missing = [n for n, p in (("poisoned (--poisoned)", poisoned), ("retrain (--reference)", reference)) if not p]
    if missing:
        md += "\n\nNot verified, so some columns are empty: " + ", ".join(missing) + ".\n"
    write_text(out / "verification.md", md)
    print(md)
    return doc
