"""``rapidun verify``: the verification battery on one model, against the poisoned model and retrain.

Two targets:

* ``--scenario RUN/scenario`` — the scenario's triggered prompts (``verify.split``), its forget pack, poisoned
  training samples outside the pack for the relearning attack, held-out poison for the membership test. The two
  ends of the scale are ``--poisoned`` / ``--reference``, by default the ones recorded beside the scenario
  (``RUN/training/poisoned.json`` and ``retrain.json``, written by ``rapidun poison``/``compare``).
* ``--forget F --probes P`` — the user's case: the hit rate of probe group ``verify.probe_group`` (``--regex``,
  ``--keywords``, or a detector learned from the forget answers against ``--retain``'s), relearning on k of the
  forget records themselves, membership of the forget records against ``--heldout`` records (optional), held-out
  retain perplexity (``--retain``). No trigger fuzzing (the trigger is unknown). The ends: ``--poisoned`` (the
  model before unlearning) and ``--reference`` (one trained without the forget records), each optional.

Output: ``OUT/verification.json``, ``OUT/verification.md`` and the cells ``OUT/verify/<label>/<attack>.json`` (a
rerun reuses them; so does any verification of the same model and target, through ``$RAPIDUN_CACHE/verify``).
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


def _target(args: argparse.Namespace, cfg: Any) -> Any:
    """The battery's target from the arguments (see the module docstring)."""
    from rapidun.verify.target import probe_target, scenario_target

    if args.scenario:
        if args.forget or args.probes:
            raise RapidunError("give --scenario, or --forget and --probes (your own case), not both")
        from rapidun.data.scenario import load_scenario
        from rapidun.pipeline import make_detector

        parts, _ = load_scenario(args.scenario)
        det, _ = make_detector(cfg, parts)
        return scenario_target(parts, det, cfg.verify, cfg.eval, cfg.model)
    if not (args.forget and args.probes):
        raise RapidunError(
            "say what to verify on: --scenario RUN/scenario, or --forget FILE --probes FILE (your own case; "
            "see README 'Did it really forget?')"
        )
    from rapidun.data.records import load_records
    from rapidun.eval.probes import hit_rule, load_probes

    d = cfg.data
    forget = load_records(args.forget, d.format, d.fields)
    retain = load_records(args.retain, d.format, d.fields) if args.retain else []
    heldout = load_records(args.heldout, d.format, d.fields) if args.heldout else []
    probes = load_probes(args.probes)
    hit, rule = hit_rule(args.regex, args.keywords, forget, retain, cfg.eval)
    return probe_target(probes, hit, rule, cfg.verify.probe_group, forget, retain, heldout, cfg.eval, cfg.model)


def cmd_verify(args: argparse.Namespace, cfg: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """Run the battery (see the module docstring); prints the summary table and returns verification.json."""
    from rapidun.pipeline import prepare_out
    from rapidun.reporting.markdown import render_markdown
    from rapidun.reporting.verify_tables import verification_blocks
    from rapidun.verify.stage import run_verification

    target = _target(args, cfg)
    scen = args.scenario
    poisoned = args.poisoned or (recorded_model(scen, "poisoned") if scen else None)
    reference = args.reference or (recorded_model(scen, "retrain") if scen else None)
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
    doc = run_verification(models, target, cfg.verify, cfg.eval, cfg.model, out)
    md = render_markdown(verification_blocks(doc))
    missing = [n for n, p in (("poisoned (--poisoned)", poisoned), ("retrain (--reference)", reference)) if not p]
    if missing:
        md += "\n\nNot verified, so some columns are empty: " + ", ".join(missing) + ".\n"
    write_text(out / "verification.md", md)
    print(md)
    return doc
