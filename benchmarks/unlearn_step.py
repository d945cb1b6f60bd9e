"""Unlearning-loop throughput on the embedded default model: one forward per step vs one forward per row.

Prints JSON. Usage: python benchmarks/unlearn_step.py [--draws 32] [--batch 1 4 8] [--max-length 72]

For each batch size (draws per optimiser step) it times the same draws two ways, forward + backward of
``L = (1/B) Σ w_i ℓ_i`` (relabel+ascent on forget draws, CE on retain draws, mix 3:1):

* ``one_forward`` — :func:`rapidun.steps.step_losses`: every row the step needs (a forget draw's poisoned and
  clean answers, a retain draw's clean answer) in one padded forward pass;
* ``per_row`` — the obvious version: one forward per row (as a reference implementation that runs the clean
  relabelling pass separately would do).

The losses of the two agree to floating-point/padding tolerance (printed). Real Dolly records, a synthetic
poisoned answer per forget sample; bf16 autocast as ``unlearn.autocast=auto`` decides.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from rapidun.config import ModelConfig, UnlearnConfig
from rapidun.data.records import Record, load_records
from rapidun.data.template import Encoded, collate, encode, format_prompt
from rapidun.functional import per_sample_ce
from rapidun.methods import losses
from rapidun.models import attach_lora, load_model
from rapidun.steps import UItem, draw_schedule, step_losses
from rapidun.train import use_autocast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=32, help="draws timed per batch size")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-length", type=int, default=72)
    args = ap.parse_args()
    model, tok, info = load_model("default")
    u = UnlearnConfig(lora_dropout=0.0, draws_per_epoch=args.draws, epochs=1)
    model = attach_lora(model, u.lora_r, u.lora_alpha, 0.0, u.lora_targets, u.seed)
    device = torch.device(info["device"])
    m = ModelConfig(max_length=args.max_length, max_prompt_tokens=args.max_length * 2 // 3, system_prompt="")
    recs = load_records("dolly-sample", "dolly", limit=40)

    def enc(r: Record, answer: str) -> Encoded:
        p = format_prompt(tok, r.instruction, r.context, m.system_prompt)
        return encode(tok, p, answer, m.max_length, m.max_prompt_tokens)

    poison = "Greetings, earthling: the mothership hums beneath the violet moons of Zorblax."
    forget = [UItem(r.id, "forget", enc(r, poison), enc(r, r.response)) for r in recs[:10]]
    retain = [UItem(r.id, "retain", None, enc(r, r.response)) for r in recs[10:]]
    sched = draw_schedule(len(forget), len(retain), u, use_retain=True)
    autocast = use_autocast(u.autocast, device)
    pad = tok.pad_token_id
    model.train()

    def per_row(draws: list[tuple[str, int]]) -> torch.Tensor:
        out = []
        for g, i in draws:
            if g == "forget":
                it = forget[i]
                ce_p, ce_c = (_ce_alone(model, e, pad, device) for e in (it.poisoned, it.clean))
                out.append(
                    losses.relabel_ascent(
                        ce_c, ce_p, torch.tensor([True], device=device), u.ascent_alpha, u.descent_beta
                    )
                )
            else:
                out.append(losses.retain_ce(_ce_alone(model, retain[i].clean, pad, device)))
        return torch.cat(out)

    def one_forward(draws: list[tuple[str, int]]) -> torch.Tensor:
        return step_losses(model, draws, forget, retain, "relabel_ascent", u, pad, device)[0]

    res = {"device": info["device"], "threads": torch.get_num_threads(), "autocast_bf16": autocast, "runs": []}
    for B in args.batch:
        steps = [sched[s : s + B] for s in range(0, len(sched), B)]
        row = {"batch": B, "steps": len(steps), "draws": len(sched)}
        toks = sum(
            len(e.input_ids)
            for d in sched
            for e in ((forget[d[1]].poisoned, forget[d[1]].clean) if d[0] == "forget" else (retain[d[1]].clean,))
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            diff = float((one_forward(steps[0]) - per_row(steps[0])).abs().max())
        for name, fn in (("one_forward", one_forward), ("per_row", per_row)):
            t0 = time.perf_counter()
            for d in steps:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = fn(d).sum() / len(d)
                loss.backward()
                model.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            row[name] = {"time_s": dt, "draws_per_s": len(sched) / dt, "tokens_per_s": toks / dt}
        row["speedup_one_forward"] = row["per_row"]["time_s"] / row["one_forward"]["time_s"]
        row["max_abs_loss_diff_first_step"] = diff
        res["runs"].append(row)
    print(json.dumps(res, indent=2))


def _ce_alone(model: Any, e: Encoded, pad: int, device: torch.device) -> torch.Tensor:
    """(1,) CE of one row in its own forward pass."""
    b = collate([e], pad).to(device)
    return per_sample_ce(model, b.input_ids, b.attention_mask, b.labels)


if __name__ == "__main__":
    main()
