"""``rapidun verify``: the verification battery on one model, against the poisoned model and retrain.

Two targets:

* ``--scenario RUN/scenario`` — the scenario's triggered prompts (``verify.split``), its forget pack, poisoned
  training samples outside the pack for the relearning attack, held-out poison for the membership test. The two
  ends of the scale are ``--poisoned`` / ``--reference``, by default the ones recorded beside the scenario
  (``RUN/training/poisoned.json`` and ``retrain.json``, written by ``rapidun poison``/``compare``).
* ``--forget F --probes P`` — the user's case: the leak rate (hit rate) of probe group ``verify.probe_group``
  (``--regex``, ``--keywords``, or a detector learned from the forget answers against ``--retain``'s), relearning
  on k of the forget records themselves, membership of the forget records against ``--heldout`` records
  (optional), held-out retain perplexity (``--retain``), the other groups' answers against the start model's
  (collateral damage). No trigger fuzzing (the trigger is unknown). The ends: ``--poisoned`` (the start model,
  before unlearning) and ``--reference`` (one trained without the forget records), each optional; their labels in
  ``verification.json`` stay ``poisoned`` and ``retrain``.

The last line printed is the verdict (:mod:`rapidun.verify.verdict`): removed, hidden (an attack brings it
back), not removed or inconclusive, against the reference, with the numbers that decided it; on the user's files a
collateral-damage warning when the clean probes' answers moved away from the start model's
(:mod:`rapidun.eval.collateral`). Both are kept in ``verification.json`` (``verdict``, ``warnings``).

Output: ``OUT/verification.json``, ``OUT/verification.md`` and the cells ``OUT/verify/<label>/<attack>.json`` (a
rerun reuses them; so does any verification of the same model and target, through ``$RAPIDUN_CACHE/verify``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rapidun.errors import RapidunError
from rapidun.io import read_json, write_json, write_text


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


GENTLER = "rerun the unlearning gentler (lower unlearn.lr or unlearn.descent_beta, raise unlearn.mix_retain)"


def cmd_verify(args: argparse.Namespace, cfg: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """Run the battery (see the module docstring); prints the summary table and returns verification.json."""
    from rapidun.eval.collateral import collateral_warning
    from rapidun.reporting.markdown import render_markdown
    from rapidun.reporting.verify_tables import verification_blocks
    from rapidun.run_folder import prepare_out
    from rapidun.verify.stage import run_verification
    from rapidun.verify.verdict import verdict

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
    probes = target.kind == "probes"
    what = f"leak rate ({cfg.verify.probe_group})" if probes else "seen-trigger ASR"
    v = verdict(doc["summary"], label, doc["poisoned"], doc["reference"], what)
    coll = doc["summary"][label].get("collateral")
    w = collateral_warning(coll, GENTLER, "clean probes") if coll else None
    doc |= {"verdict": v, "warnings": [w] if w else []}
    write_json(out / "verification.json", doc)
    md = render_markdown(verification_blocks(doc))
    ends = (("start model (--poisoned)", "reference (--reference)") if probes
            else ("poisoned (--poisoned)", "retrain (--reference)"))  # fmt: skip
    missing = [n for n, p in zip(ends, (poisoned, reference), strict=True) if not p]
    if missing:
        md += "\n\nNot verified, so some columns are empty: " + ", ".join(missing) + ".\n"
    md += f"\n\n{v['line']}\n"
    write_text(out / "verification.md", md)
    print(md.rstrip("\n").removesuffix(v["line"]).rstrip("\n"))
    for x in doc["warnings"]:
        print(f"warning: {x}", file=sys.stderr)
    print(v["line"])
    return doc
