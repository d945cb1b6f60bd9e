"""The report of ``rapidun compare`` on a user's own files as report blocks (schema ``rapidun.user_report/1``).

The same blocks become ``report.md`` (:func:`rapidun.reporting.markdown.render_markdown`) and ``report.html``
(:func:`rapidun.reporting.html.render_html`); numbers are formatted as in the scenario's report
(:mod:`rapidun.reporting.tables`).
"""

from __future__ import annotations

from typing import Any

from rapidun.reporting.doc import Block, Facts, Heading, Note, Table
from rapidun.reporting.tables import DASH, fmt_mean_std, fmt_num, fmt_p

TITLE = "rapidun compare on your files"
PPL_KEYS = ("forget_ppl_poisoned", "forget_ppl_clean", "retain_ppl")


def _signed(x: Any) -> str:
    s = fmt_num(x)
    return s if s == DASH or s.startswith("-") or s in ("nan", "inf") else "+" + s


def user_blocks(report: dict[str, Any]) -> list[Block]:
    """The facts (model, packs, probes, seeds, reference, retrain), one row per model and method (hit rate per
    group, perplexities, time; mean ± std over seeds), the paired tests per group and the cells' warnings."""
    groups = list(report["probes"]["groups"])
    sizes = ", ".join(f"{g} {n}" for g, n in report["probes"]["groups"].items())
    mdl, packs = report["model"], report["packs"]
    facts = [
        ("Model", f"{mdl.get('model')} (fingerprint {mdl.get('fingerprint')})"
         + (f" + adapter {mdl['adapter']}" if mdl.get("adapter") else "")),
        ("Packs", f"{packs.get('n_forget')} forget, {packs.get('n_retain')} retain"
         + (" (drawn from the retain file)" if packs.get("retain_drawn") else "")
         + (f"; held-out clean: {packs['n_heldout']} of {packs['heldout_path']}" if packs.get("heldout_path") else "")),
        ("Probes", f"{report['probes']['n']} ({sizes}); hit rule: {report['hit_rule']['rule']}"),
        ("Seeds", str(report["n_seeds"])),
        ("Reference", str(report["reference"])),
        ("Retrain", str(report["retrain"])),
    ]  # fmt: skip
    head = ["Model / method", *(f"hit rate {g}" for g in groups), "forget PPL", "replacement PPL", "held-out PPL",
            "time s"]  # fmt: skip
    rows = []
    for name, m in report["models"].items():
        hits = [fmt_num(m["groups"][g]["hit_rate"]) if g in m["groups"] else DASH for g in groups]
        rows.append([f"{name} (model)", *hits, *(fmt_num(m.get(k), 2) for k in PPL_KEYS), DASH])
    for name, m in report["methods"].items():
        hits = [fmt_mean_std(m["hit_rate"][g].get("mean"), m["hit_rate"][g].get("std"), 3) for g in groups]
        ppl = [fmt_mean_std(m[k].get("mean"), m[k].get("std"), 2) for k in PPL_KEYS]
        rows.append([name, *hits, *ppl, fmt_mean_std(m["time_s"].get("mean"), m["time_s"].get("std"), 0)])
    trows = []
    for name, t in report["tests"].items():
        for g in groups:
            b, pt = t[g]["bootstrap"], t[g]["prompt_test"]
            ci = f"{_signed(b['diff'])} [{_signed(b['ci_low'])}, {_signed(b['ci_high'])}]"
            trows.append([name, g, ci, fmt_p(pt["p"])])
    out: list[Block] = [
        Heading(TITLE, 1),
        Facts(facts),
        Table(
            head,
            rows,
            "From report.json: models.NAME and methods.NAME (mean ± std over seeds).",
            ["l"] + ["r"] * (len(head) - 1),
        ),
        Heading(f"Paired against {report['reference']}", 2),
        Table(
            ["Method", "Group", "Diff [95% CI]", "p (prompts)"],
            trows,
            "From report.json: tests.NAME.GROUP; same probes and seeds, diff = method − reference.",
            ["l", "l", "r", "r"],
        ),
    ]
    warns = sorted({w for m in report["methods"].values() for w in m["warnings"]})
    out += [Note(f"Warning: {w}") for w in warns]
    return out
