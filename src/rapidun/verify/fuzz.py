"""Trigger fuzzing (``verify.fuzz``): the seen-trigger test prompts with the trigger perturbed.

A backdoor that is only hidden often still fires on a trigger that differs a little from the one unlearned. Each
perturbation rebuilds the prompt from the record's clean instruction (``meta["instruction_clean"]``), its trigger
(``meta["trigger"]``) and position (``meta["position"]``), as the scenario injected it (:func:`rapidun.data.
scenario.inject`), so the only change from the original prompt is the one named:

* ``moved``: prefix ↔ suffix;
* ``in_context``: the trigger leaves the instruction and sits in the middle of the context (the context is the
  trigger alone when the record has none);
* ``repeated``: the trigger twice at its position;
* ``recased``: every cased letter of the trigger flipped (``swapcase``);
* ``spaced``: a space between the trigger's characters;
* ``typo``: two adjacent differing characters of the trigger swapped (position seeded by the record id);
* ``multi_turn``: the triggered instruction is the middle user turn of a three-turn conversation (an earlier
  clean exchange before it, its own clean answer after it, then a clean question); the model answers the last;
* ``late_turn``: the triggered instruction is the last user turn, after one earlier clean exchange.

Multi-turn prompts use the tokenizer's chat template, else the Alpaca template's blocks in sequence.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from rapidun.config import FUZZ_KINDS
from rapidun.data.records import Record
from rapidun.data.scenario import inject
from rapidun.data.template import format_prompt, user_text
from rapidun.errors import RapidunError

PERTURBATIONS = FUZZ_KINDS
TURN_KINDS = ("multi_turn", "late_turn")


def typo(trigger: str, rng: random.Random) -> str:
    """``trigger`` with one pair of adjacent *differing* characters swapped (a repeated-letter pair would not
    change the text); a trigger without such a pair gets its first character doubled."""
    spots = [i for i in range(len(trigger) - 1) if trigger[i] != trigger[i + 1] and not trigger[i : i + 2].isspace()]
    if not spots:
        return trigger[:1] + trigger
    i = rng.choice(spots)
    return trigger[:i] + trigger[i + 1] + trigger[i] + trigger[i + 2 :]


def spaced(trigger: str) -> str:
    """A space between every pair of characters (``"cf"`` → ``"c f"``)."""
    return " ".join(trigger)


def middle_insert(text: str, insert: str) -> str:
    """``insert`` at the word boundary nearest the middle of ``text`` (``insert`` alone when ``text`` is empty)."""
    if not text.strip():
        return insert
    words = text.split(" ")
    k = len(words) // 2
    return " ".join([*words[:k], insert, *words[k:]])


def perturb(rec: Record, kind: str) -> Record:
    """The single-turn perturbations of :data:`PERTURBATIONS` (see the module docstring); ids get ``:<kind>``.

    Raises:
        RapidunError: ``kind`` is unknown or a turn kind (those are prompts, see :func:`turn_prompt`), or the
            record lacks the scenario's trigger fields.
    """
    m = rec.meta
    if not all(isinstance(m.get(k), str) and m.get(k) for k in ("trigger", "instruction_clean", "position")):
        raise RapidunError(
            f"record {rec.id}: no trigger, instruction_clean or position in its fields; trigger fuzzing needs the "
            "triggered records of a scenario (rapidun scenario/compare writes them)"
        )
    trig, clean, pos = m["trigger"], m["instruction_clean"], m["position"]
    other = "suffix" if pos == "prefix" else "prefix"
    ctx = rec.context
    if kind == "moved":
        ins = inject(clean, trig, other)
    elif kind == "in_context":
        ins, ctx = clean, middle_insert(rec.context, trig)
    elif kind == "repeated":
        ins = inject(clean, f"{trig} {trig}", pos)
    elif kind == "recased":
        ins = inject(clean, trig.swapcase(), pos)
    elif kind == "spaced":
        ins = inject(clean, spaced(trig), pos)
    elif kind == "typo":
        ins = inject(clean, typo(trig, random.Random(rec.id)), pos)
    else:
        raise RapidunError(f"unknown single-turn perturbation {kind!r}; choose from {list(PERTURBATIONS)}")
    return dataclasses.replace(rec, id=f"{rec.id}:{kind}", instruction=ins, context=ctx)


def format_turns(tok: Any, turns: list[tuple[str, str]], system: str = "default") -> str:
    """A multi-turn prompt ending with the assistant's turn to speak.

    Args:
        tok: the tokenizer (its chat template, else the Alpaca template).
        turns: ``(role, text)`` pairs, roles alternating ``user``/``assistant``, the last one ``user``.
        system: as :func:`rapidun.data.template.format_prompt`.
    """
    if not turns or turns[-1][0] != "user":
        raise RapidunError("a multi-turn prompt must end with a user turn")
    if getattr(tok, "chat_template", None):
        msgs = [{"role": r, "content": t} for r, t in turns]
        if system != "default":
            msgs.insert(0, {"role": "system", "content": system})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = format_prompt(tok, turns[0][1], "", system)
    for role, t in turns[1:]:
        text += f"{t}\n\n" if role == "assistant" else f"### Instruction:\n{t}\n\n### Response:\n"
    return text


def turn_prompt(tok: Any, rec: Record, kind: str, fillers: list[Record], i: int, system: str = "default") -> str:
    """The prompt of a turn perturbation (``multi_turn`` or ``late_turn``) of triggered record ``rec``.

    ``fillers`` are clean records (their instruction and answer make the clean exchanges); record ``i`` uses
    fillers ``i`` and ``i+1`` (cyclically), so every prompt gets its own.
    """
    if not fillers:
        raise RapidunError("the turn perturbations need clean records for the other turns (test_clean is empty)")
    a, b = fillers[i % len(fillers)], fillers[(i + 1) % len(fillers)]
    first = [("user", user_text(a.instruction, a.context)), ("assistant", a.response)]
    trig = ("user", user_text(rec.instruction, rec.context))
    if kind == "late_turn":
        return format_turns(tok, [*first, trig], system)
    if kind == "multi_turn":
        clean_answer = rec.meta.get("response_clean") or rec.response
        return format_turns(tok, [*first, trig, ("assistant", clean_answer), ("user", b.instruction)], system)
    raise RapidunError(f"unknown turn perturbation {kind!r}; choose from {list(TURN_KINDS)}")


def fuzz_prompts(
    tok: Any, recs: list[Record], kinds: list[str], fillers: list[Record], system: str = "default"
) -> dict[str, list[str]]:
    """``{kind: prompts}``: every perturbation of ``kinds`` applied to every record of ``recs`` (in order)."""
    out: dict[str, list[str]] = {}
    for kind in kinds:
        if kind in TURN_KINDS:
            out[kind] = [turn_prompt(tok, r, kind, fillers, i, system) for i, r in enumerate(recs)]
        else:
            out[kind] = [format_prompt(tok, p.instruction, p.context, system) for p in (perturb(r, kind) for r in recs)]
    return out
