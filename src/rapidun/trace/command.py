"""``rapidun trace``: rank a training corpus by its influence on a behaviour, and write a forget file from it.

Two inputs:

* ``--train CORPUS --probes PROBES`` — the user's case: the corpus in ``data.format``, probes with the bad outputs
  (or ``--generate``: the model's own greedy answers to the probe prompts, kept where ``--regex``/``--keywords``
  match when given: an answer that does not show the behaviour would trace the ordinary behaviour instead).
* ``--scenario RUN/scenario`` — a backdoor scenario, where the culprits are known: corpus = train_poisoned +
  train_clean, probes = ``trace.n_probes`` prompts of ``trace.probe_split`` (stratified by trigger family) whose
  answer by the model shows the backdoor (the scenario's detector; up to 4x as many prompts are asked); adds the
  retrieval metrics of the influence ranking against BM25, the records' own loss and random order. The model
  defaults to the poisoned one recorded beside the scenario (``RUN/training/poisoned.json``).

Outputs (``--out``): ``ranked.jsonl`` (every record, most suspect first), ``topk.jsonl`` (each probe's top-k),
``probes.jsonl`` (the probes with the outputs traced), ``trace.json`` (settings, timings, memory, metrics),
``trace.md`` / ``trace.html`` and ``plots/``; with ``--to-forget N|auto``, ``forget.jsonl`` in ``data.format``, which
``rapidun unlearn --forget`` takes as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rapidun.data.records import FORMATS, Record
from rapidun.errors import RapidunError
from rapidun.io import atomic_path, write_json, write_jsonl, write_text


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The trace flags as config overrides (so they are validated and recorded like every other setting)."""
    ov = []
    if args.top is not None:
        ov.append(f"trace.top_k={args.top}")
    if args.hotwords:
        ov.append(f"trace.hotwords={json.dumps(args.hotwords)}")
    if args.auto_hotwords:
        ov.append("trace.auto_hotwords=true")
    return ov


def parse_to_forget(value: str | None) -> int | str | None:
    """``--to-forget``: a positive count, ``auto``, or None."""
    if value is None:
        return None
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise RapidunError(f"--to-forget {value!r}: give a positive number of records or 'auto'")
    return n


def format_row(r: Record, fmt: str, fields: dict[str, str]) -> dict[str, Any]:
    """A record as a row of ``data.format`` (meta kept, so a scenario record's ``response_clean`` stays the
    replacement answer)."""
    cols = dict(FORMATS.get(fmt, {})) if fmt != "generic" else {"context": "", "id": "id", **fields}
    if fmt != "generic":
        cols.update(fields or {})
    row: dict[str, Any] = {cols.get("id") or "id": r.id}
    for key in ("instruction", "context", "response"):
        col = cols.get(key)
        if col:
            row[col] = getattr(r, key)
    for k, v in r.meta.items():
        row.setdefault(k, v)
    return row


def _inputs(args: argparse.Namespace, cfg: Any) -> tuple[str, list[Record], list[Record], list | None, bool, Any]:
    """(model path, corpus, probes, families or None, generate, hit rule or None) from the arguments."""
    from rapidun.data.records import load_records
    from rapidun.models import resolve_model_path, with_adapter
    from rapidun.trace.core import load_trace_probes, scenario_inputs
    from rapidun.verify.command import recorded_model

    if args.scenario:
        if args.train or args.probes:
            raise RapidunError("give --scenario, or --train and --probes (your own case), not both")
        from rapidun.data.scenario import load_scenario
        from rapidun.pipeline import make_detector

        parts, _ = load_scenario(args.scenario)
        corpus, probes, fams = scenario_inputs(parts, cfg.trace)
        det, _ = make_detector(cfg, parts)
        model = args.model_path or recorded_model(args.scenario, "poisoned")
        if not model:
            raise RapidunError(
                f"no poisoned model recorded beside {args.scenario} (RUN/training/poisoned.json); give --model-path"
            )
        return with_adapter(resolve_model_path(model), args.adapter), corpus, probes, fams, True, det.hit
    if not (args.train and args.probes and args.model_path):
        raise RapidunError(
            "say what to trace: --model-path M --train CORPUS --probes PROBES (your case), or --scenario RUN/scenario"
        )
    if (args.regex or args.keywords) and not args.generate:
        raise RapidunError("--regex/--keywords choose which generated answers show the behaviour; add --generate")
    d = cfg.data
    corpus = load_records(args.train, d.format, d.fields)
    probes = load_trace_probes(args.probes, need_output=not args.generate)
    hit = None
    if args.regex or args.keywords:
        from rapidun.eval.probes import hit_rule

        hit, _ = hit_rule(args.regex, args.keywords, [], [], cfg.eval)
    model = with_adapter(resolve_model_path(args.model_path), args.adapter)
    return model, corpus, probes, None, bool(args.generate), hit


def cmd_trace(args: argparse.Namespace, cfg: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """Run the trace (see the module docstring); prints the summary and returns trace.json's content."""
    from rapidun.config import to_dict
    from rapidun.distributed import init_from_env, is_main
    from rapidun.reporting.doc import Figure
    from rapidun.reporting.html import render_html
    from rapidun.reporting.markdown import render_markdown
    from rapidun.reporting.trace_tables import trace_blocks
    from rapidun.run_folder import claim_out, finite_json
    from rapidun.trace.core import ranked_rows, robust_cut, topk_rows, trace

    to_forget = parse_to_forget(args.to_forget)
    model, corpus, probes, fams, gen, hit = _inputs(args, cfg)
    init_from_env()
    out = claim_out(args.out, cfg, args.overwrite, "trace", identity)
    most = cfg.trace.n_probes if args.scenario else None
    res = trace(
        model, corpus, probes, cfg.trace, cfg.influence, cfg.model, cfg.eval, gen, fams, keep=hit, max_probes=most
    )
    if not is_main():
        return {}
    scores = res["scores"]
    rows = ranked_rows(corpus, scores, cfg.trace.aggregate, fams)
    write_jsonl(out / "ranked.jsonl", rows)
    write_jsonl(out / "topk.jsonl", topk_rows(res["probes"], corpus, scores))
    write_jsonl(out / "probes.jsonl", [p.to_json() | {"output": p.response} for p in res["probes"]])
    forget_info = None
    if to_forget is not None:
        key = scores.key(cfg.trace.aggregate).numpy()
        n = robust_cut(key, cfg.trace.auto_z) if to_forget == "auto" else min(to_forget, len(corpus))
        forget_info = {"n": n, "rule": str(to_forget), "auto_z": cfg.trace.auto_z, "file": None}
        if n:
            by_id = {r.id: r for r in corpus}
            chosen = [by_id[row["id"]] for row in rows[:n]]
            write_jsonl(out / "forget.jsonl", [format_row(r, cfg.data.format, cfg.data.fields) for r in chosen])
            forget_info["file"] = "forget.jsonl"
        else:
            print(
                f"rapidun: warning: --to-forget auto: no record stands out (robust z >= trace.auto_z="
                f"{cfg.trace.auto_z:g}); no forget.jsonl written. Read ranked.jsonl and give --to-forget N",
                file=sys.stderr,
            )
        if fams is not None:
            forget_info["culprits"] = sum(1 for row in rows[:n] if row["culprit"] is not None)
    doc = finite_json(
        {
            "model": model,
            "n_corpus": len(corpus),
            "n_probes": len(res["probes"]),
            "generated_outputs": gen,
            "hotwords": res["hotwords"],
            "aggregate": cfg.trace.aggregate,
            "top": rows[:20],
            "stats": res["stats"],
            "evaluation": res["evaluation"],
            "forget": forget_info,
            "config": {"trace": to_dict(cfg.trace), "influence": to_dict(cfg.influence)},
        }
    )
    write_json(out / "trace.json", doc)
    blocks = trace_blocks(doc, rows)
    write_text(out / "trace.md", render_markdown(blocks))
    write_text(out / "trace.html", render_html(blocks, title="rapidun trace"))
    for b in blocks:
        if isinstance(b, Figure):
            (out / "plots").mkdir(exist_ok=True)
            with atomic_path(out / "plots" / f"{b.name}.png") as tmp:
                tmp.write_bytes(b.png)
    print(render_markdown([b for b in blocks if not isinstance(b, Figure)]))
    print(f"written to {out}: ranked.jsonl, topk.jsonl, probes.jsonl, trace.json, trace.md, trace.html"
          + (", forget.jsonl" if forget_info and forget_info["file"] else ""))  # fmt: skip
    return doc


def add_parser(sub: Any, common: Any) -> None:
    """The ``trace`` subcommand."""
    p = sub.add_parser(
        "trace",
        help="find the training records behind a behaviour: rank a corpus by influence on probe outputs "
        "(cached corpus sketches, streamed retrieval) → OUT/ranked.jsonl, trace.json/md/html, forget.jsonl",
    )
    common(p)
    p.add_argument(
        "--model-path", help="the model that shows the behaviour (default with --scenario: the poisoned one)"
    )
    p.add_argument("--adapter", help="a PEFT adapter on --model-path")
    p.add_argument("--train", help="your case: the training corpus (data.format)")
    p.add_argument("--probes", help="your case: prompts with the bad outputs (prompt, output[, context, id])")
    p.add_argument("--generate", action="store_true", help="use the model's greedy answers as the probe outputs")
    p.add_argument("--regex", help="--generate: keep only answers this regex matches (case-insensitive)")
    p.add_argument("--keywords", nargs="+", metavar="W", help="--generate: keep only answers with one of these words")
    p.add_argument("--scenario", help="a scenario folder (RUN/scenario): known culprits, adds retrieval metrics")
    p.add_argument("--hotwords", nargs="+", metavar="W", help="token-wise mode: probe loss on these words only")
    p.add_argument("--auto-hotwords", action="store_true", help="token-wise mode with words learned from the outputs")
    p.add_argument("--top", type=int, help="records kept per probe (trace.top_k)")
    p.add_argument(
        "--to-forget", metavar="N|auto", help="write the N most suspect records (or the outliers) to forget.jsonl"
    )
