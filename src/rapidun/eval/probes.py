"""Evidence on a user's own prompts: ``rapidun eval --probes PROBES`` (no scenario needed).

PROBES (.jsonl/.jsonl.gz/.json/.csv) has one prompt per row: ``prompt`` (or ``instruction``), an optional
``context`` (or ``input``), a ``group`` (any name, e.g. ``triggered`` and ``clean``) and an optional ``id``
(default ``p<line>``). Each prompt is answered greedily and the answer is a **hit** by one rule:

* ``--regex RX``: ``re.search(RX, answer, re.IGNORECASE)`` finds a match;
* ``--keywords W ...``: at least one of the words or phrases occurs in the answer (case-insensitive substring);
* neither: the keyword detector of SPEC §4 learned from the forget records' answers against the retain records'
  answers (``--forget`` and ``--retain`` required; ``eval.*`` settings).

Reported per group: prompts, hits, hit rate, and (``--forget`` with replacement answers) the replacement rate:
the share of answers that give a forget record's replacement answer (:mod:`rapidun.eval.collateral`; on the clean
groups a rise against the start model is collateral damage). With ``--forget``: perplexity of the forget records'
answers (should rise after unlearning) and of their replacement answers where given (should fall); with
``--retain``: perplexity of up to ``eval.ppl_samples`` retain records (should hold; pass records the unlearning did
not train on for a held-out figure).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapidun.config import EvalConfig, ModelConfig
from rapidun.data.records import Record, _iter_rows
from rapidun.data.template import encode_records, format_prompt
from rapidun.errors import RapidunError
from rapidun.eval.collateral import REPLACEMENT_RECALL, replacement_scores
from rapidun.eval.detector import build_detector
from rapidun.eval.evaluate import forget_perplexities, rate
from rapidun.eval.generate import generate
from rapidun.eval.metrics import perplexity


@dataclass
class Probe:
    """One prompt of a probe file."""

    id: str
    prompt: str
    group: str
    context: str = ""


def load_probes(path: str | Path) -> list[Probe]:
    """Read and validate a probe file (see module docstring); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise RapidunError(f"probe file {path} does not exist")
    out: list[Probe] = []
    seen: dict[str, int] = {}
    for line, row in _iter_rows(p):
        prompt = row.get("prompt", row.get("instruction"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise RapidunError(f"{path}:{line}: no prompt (field 'prompt' or 'instruction'); give the text to ask")
        group = row.get("group")
        if not isinstance(group, str) or not group.strip():
            raise RapidunError(
                f"{path}:{line}: no group; every probe needs a 'group' (e.g. triggered, clean) to be reported under"
            )
        ctx = row.get("context", row.get("input")) or ""
        pid = str(row["id"]) if row.get("id") not in (None, "") else f"p{line}"
        if pid in seen:
            raise RapidunError(f"{path}:{line}: duplicate id {pid!r} (first on line {seen[pid]}); ids must be unique")
        seen[pid] = line
        out.append(Probe(pid, prompt.strip(), group.strip(), ctx.strip() if isinstance(ctx, str) else ""))
    if not out:
        raise RapidunError(f"probe file {path} holds no probes")
    return out


def hit_rule(
    regex: str | None,
    keywords: list[str] | None,
    forget: list[Record],
    retain: list[Record],
    ecfg: EvalConfig,
) -> tuple[Callable[[str], bool], dict[str, Any]]:
    """The hit rule and its description (see module docstring)."""
    if regex and keywords:
        raise RapidunError("give --regex or --keywords, not both")
    if regex:
        try:
            rx = re.compile(regex, re.IGNORECASE)
        except re.error as e:
            raise RapidunError(f"--regex {regex!r} is not a valid regular expression: {e}") from None
        return (lambda t: rx.search(t) is not None), {"rule": "regex", "regex": regex}
    if keywords:
        kws = [k.lower() for k in keywords if k.strip()]
        if not kws:
            raise RapidunError("--keywords holds no non-empty word")
        return (lambda t: any(k in t.lower() for k in kws)), {"rule": "keywords", "keywords": kws}
    if not forget or not retain:
        raise RapidunError(
            "say what counts as a hit: --regex RX, --keywords W ..., or --forget F --retain R to learn a detector "
            "from the forget answers against the retain answers"
        )
    det = build_detector(
        [r.response for r in forget],
        [r.response for r in retain],
        [],
        ecfg.n_keywords,
        ecfg.min_z,
        ecfg.threshold,
        ecfg.max_clean_freq,
    )
    return det.hit, {"rule": "detector", **det.to_json()}


def evaluate_probes(
    model: Any,
    tok: Any,
    probes: list[Probe],
    hit: Callable[[str], bool],
    ecfg: EvalConfig,
    mcfg: ModelConfig,
    forget: list[Record] | None = None,
    retain: list[Record] | None = None,
    replacements: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate on every probe, score with ``hit``; perplexities of forget/replacement/retain answers.

    Args:
        replacements: the forget records' replacement answers (None or empty: no replacement rates).

    Returns:
        ``(metrics, rows)``: ``metrics["groups"][g] = {"n", "hits", "hit_rate"}`` (+ ``replacement_rate`` with
        ``replacements``; rows then carry ``replacement``, :func:`rapidun.eval.collateral.replacement_scores`),
        ``forget_ppl_poisoned``,
        ``forget_ppl_clean`` (replacement answers), ``retain_ppl`` (None where not measured), ``eval_s``; ``rows``
        one per probe (id, group, generation, hit).
    """
    t0 = time.perf_counter()
    model.eval()
    prompts = [format_prompt(tok, p.prompt, p.context, mcfg.system_prompt) for p in probes]
    decided = hit if ecfg.early_stop else None
    texts = generate(model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size, decided, desc="eval:probes")
    hits = [hit(t) for t in texts]
    groups: dict[str, list[bool]] = {}
    for p, h in zip(probes, hits, strict=True):
        groups.setdefault(p.group, []).append(h)
    metrics: dict[str, Any] = {
        "groups": {g: {"n": len(v), "hits": sum(v), "hit_rate": rate(v)} for g, v in sorted(groups.items())}
    }
    reps = [r for r in (replacements or []) if r.strip()]
    scores = replacement_scores(texts, reps) if reps else None
    if scores is not None:
        for g, v in metrics["groups"].items():
            mine = [x for p, x in zip(probes, scores, strict=True) if p.group == g]
            v["replacement_rate"] = rate([x >= REPLACEMENT_RECALL for x in mine])
    fp = forget_perplexities(model, tok, forget or [], mcfg)
    metrics |= {"forget_ppl_poisoned": fp["forget_ppl_poisoned"], "forget_ppl_clean": fp["forget_ppl_clean"]}
    metrics["n_forget"], metrics["n_replacement"] = fp["n_forget_poisoned"], fp["n_forget_clean"]
    keep = (retain or [])[: ecfg.ppl_samples or None]
    metrics["retain_ppl"] = perplexity(model, encode_records(tok, keep, mcfg)[0], tok.pad_token_id) if keep else None
    metrics["n_retain"] = len(keep)
    metrics["eval_s"] = time.perf_counter() - t0
    rows = [
        {"id": p.id, "group": p.group, "prompt": p.prompt, "generation": t, "hit": h}
        for p, t, h in zip(probes, texts, hits, strict=True)
    ]
    if scores is not None:
        for row, x in zip(rows, scores, strict=True):
            row["replacement"] = x
    return metrics, rows


def replacements_of(forget: list[Record]) -> list[str]:
    """The forget records' replacement answers (``meta["response_clean"]``), in order, empty ones left out."""
    return [r.meta["response_clean"] for r in forget if r.meta.get("response_clean")]


def clean_probes(probes: list[Probe], group: str) -> list[Probe]:
    """The probes outside ``group`` (the group whose hits are the forget content): the clean prompts.

    Raises:
        RapidunError: ``group`` is not a group of ``probes`` (every probe would count as clean).
    """
    groups = sorted({p.group for p in probes})
    if group not in groups:
        raise RapidunError(
            f"verify.probe_group={group!r} is not a group of the probes ({groups}); set it to the group whose hits "
            "are the forget content (the other groups are the clean prompts)"
        )
    return [p for p in probes if p.group != group]
