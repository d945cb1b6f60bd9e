"""The blocks of ``trace.md`` / ``trace.html`` (from ``trace.json`` and the ranked rows of ``rapidun trace``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rapidun.reporting.doc import Block, Facts, Figure, Heading, Note, Paragraph, Table
from rapidun.reporting.load import as_dict
from rapidun.reporting.plots import weight_histogram
from rapidun.reporting.tables import DASH, fmt_num

RANKERS = {
    "influence_mean": "influence, mean over probes",
    "influence_max": "influence, max over probes",
    "influence_count": "influence, top-k count",
    "bm25": "BM25 (text of record vs probe)",
    "loss": "own loss (lowest first)",
    "random": "random order",
}


def _rate(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, int | float) else DASH


def speed_facts(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Sketching and retrieval speed and memory, as measured."""
    st = as_dict(doc.get("stats"))
    c, r = as_dict(st.get("corpus")), as_dict(st.get("retrieval"))
    busy = (c.get("grad_s") or 0.0) + (c.get("sketch_s") or 0.0)
    rate = c["computed"] / busy if c.get("computed") and busy > 0 else None
    sketched = f"{c.get('computed', 0)} computed, {c.get('cached', 0)} reused from the cache"
    items = [
        ("Corpus sketches", f"{sketched}; {_rate(rate)} records/s (gradients + projection, {c.get('ranks', 1)} rank)"),
        ("Retrieval", f"{_rate(r.get('records_per_s'))} records/s over {r.get('shards', DASH)} cached shards"),
    ]
    if r.get("peak_mb") is not None:
        start = f", {r['start_mb']:.0f} MiB at its start" if r.get("start_mb") is not None else ""
        items.append(("Retrieval memory", f"{r['peak_mb']:.0f} MiB peak ({r.get('peak_kind')}{start})"))
    items.append(("Total", f"{fmt_num(st.get('total_s'), 1)} s (model load {fmt_num(st.get('load_s'), 1)} s)"))
    return items


def metrics_table(ev: dict[str, Any]) -> Table:
    """One row per ranker: precision/recall@k and AP overall, then recall@k and AP per culprit family."""
    rankers = as_dict(ev.get("rankers"))
    first = next((as_dict(v) for v in rankers.values() if isinstance(v, dict) and "families" in v), {})
    fams = list(as_dict(first.get("families")))
    head = ["Ranking", "P@k", "R@k", "AP"] + [f"{f} R@k" for f in fams] + [f"{f} AP" for f in fams]
    rows = []
    for name, m in rankers.items():
        if not isinstance(m, dict) or "auprc" not in m:
            continue
        fm = as_dict(m.get("families"))
        row = [RANKERS.get(name, name), fmt_num(m.get("precision_at_k")), fmt_num(m.get("recall_at_k"))]
        row += [fmt_num(m.get("auprc"))]
        row += [fmt_num(as_dict(fm.get(f)).get("recall_at_k")) for f in fams]
        row += [fmt_num(as_dict(fm.get(f)).get("auprc")) for f in fams]
        rows.append(row)
    return Table(
        head,
        rows,
        caption=f"From trace.json: evaluation.rankers. k = {ev.get('k')} = the number of culprits in the corpus; "
        "a family's R@k counts its culprits in the overall top k, its AP ranks them against the innocent records only "
        "(AP: area under the precision-recall curve, ties entering together; random: mean of 200 seeded orders).",
        align=["l"] + ["r"] * (len(head) - 1),
    )


def trace_blocks(doc: dict[str, Any], rows: list[dict[str, Any]]) -> list[Block]:
    """Summary facts, speed, the retrieval metrics (when the culprits are known), the top records and the score
    distribution."""
    agg = doc.get("aggregate", "mean")
    hot = doc.get("hotwords") or []
    kind = "model-generated" if doc.get("generated_outputs") else "given"
    facts = [
        ("Model", str(doc.get("model"))),
        ("Corpus", f"{doc.get('n_corpus')} records"),
        ("Probes", f"{doc.get('n_probes')} ({kind} outputs)"),
        ("Probe loss", "hotwords " + ", ".join(hot[:12]) if hot else "every answer token"),
        ("Ranking", f"{agg} of the influence over the probes"),
        *speed_facts(doc),
    ]
    dropped = as_dict(doc.get("stats")).get("dropped_probes")
    if dropped:
        facts.insert(3, ("Probes left out", f"{len(dropped)} whose answer was empty or did not show the behaviour"))
    out: list[Block] = [Heading("Trace: which training records taught this behaviour?", 1), Facts(facts)]
    ev = as_dict(doc.get("evaluation"))
    if ev:
        out += [Heading("Did it find the culprits?", 2), metrics_table(ev)]
    fg = as_dict(doc.get("forget"))
    if fg and not fg.get("n"):
        out.append(
            Paragraph(f"No forget.jsonl: no record stands out (rule {fg.get('rule')}, robust z ≥ {fg.get('auto_z')}).")
        )
    elif fg:
        found = f"; {fg['culprits']} of them are culprits" if fg.get("culprits") is not None else ""
        out.append(Paragraph(f"forget.jsonl: the {fg.get('n')} most suspect records (rule {fg.get('rule')}){found}."))
    top = rows[:10]
    head = ["Rank", "Id", "Score", "Count"] + (["Culprit"] if top and "culprit" in top[0] else []) + ["Response"]
    table_rows = []
    for r in top:
        row = [str(r["rank"]), r["id"], fmt_num(r["score"], 4), str(r["count"])]
        row += [str(r.get("culprit") or DASH)] if "culprit" in r else []
        table_rows.append([*row, r["response"][:80].replace("\n", " ")])
    out += [Heading("Most suspect records", 2), Table(head, table_rows, caption="From ranked.jsonl (first 10).")]
    scores = np.array([r["score"] for r in rows], dtype=float)
    if scores.size:
        if rows and "culprit" in rows[0]:
            mask = np.array([r["culprit"] is not None for r in rows])
            groups = {"culprit": scores[mask], "other": scores[~mask]}
            colors = {"culprit": "#d62728", "other": "#1f77b4"}
        else:
            groups, colors = {"records": scores}, {"records": "#1f77b4"}
        png = weight_histogram(groups, colors, xlabel=f"trace score ({agg})", log_y=True)
        out.append(Figure("trace_scores", "Score distribution", png, "From ranked.jsonl: score per record."))
    else:
        out.append(Note("No records were scored."))
    return out


def traced_blocks(t: dict[str, Any]) -> list[Block]:
    """The report's "Trace, then forget" section: the traced pack's make-up, the retrieval metrics and, per
    method, the results with the true forget pack beside those with the traced one."""
    t = as_dict(t)
    pack = as_dict(t.get("pack"))
    out: list[Block] = [
        Paragraph(
            f"The forget pack traced from the corpus by influence ({t.get('aggregate')} over {t.get('n_probes')} "
            f"{t.get('probe_split')} probes answered by the poisoned model): {pack.get('n')} records, "
            f"{pack.get('culprits')} poisoned and {pack.get('innocent')} innocent ones forgotten by mistake "
            f"({pack.get('retain_dropped')} of them taken out of the retain pack); the true pack holds "
            f"{pack.get('true_pack_culprits')} poisoned records. Each method then unlearned the traced pack "
            "(cells METHOD@traced, same seeds)."
        )
    ]
    ev = as_dict(t.get("evaluation"))
    if ev:
        out.append(metrics_table(ev))
    rows = []
    for name, m in as_dict(t.get("methods")).items():
        tr, tc = as_dict(m.get("true")), as_dict(m.get("traced"))
        for what, d in (("true pack", tr), ("traced pack", tc)):
            vals = [fmt_num(d.get("asr_seen")), fmt_num(d.get("asr_ood")), fmt_num(d.get("clean_ppl"), 2)]
            rows.append([name, what, *vals, fmt_num(d.get("rouge_l")), fmt_num(d.get("false_trigger"))])
        diff = (
            fmt_num(tc["asr_seen"] - tr["asr_seen"])
            if isinstance(tc.get("asr_seen"), float) and isinstance(tr.get("asr_seen"), float)
            else DASH
        )
        rows.append([name, "traced − true (seen)", diff, DASH, DASH, DASH, DASH])
    out.append(
        Table(
            ["Method", "Forget pack", "ASR seen", "ASR OOD", "Clean PPL", "ROUGE-L", "False trig."],
            rows,
            caption="From report.json: trace.methods (means over the seeds; test prompts).",
            align=["l", "l", "r", "r", "r", "r", "r"],
        )
    )
    return out
