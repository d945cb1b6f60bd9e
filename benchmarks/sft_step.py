"""Training-step throughput on the embedded default model: answer-only LM head vs full logits.

Prints JSON. Usage: python benchmarks/sft_step.py [--batch 8] [--prompt 32] [--answer 24] [--steps 3]
The answer-only path (``rapidun.functional.per_sample_nll``) projects only answer positions onto the
vocabulary; the reference path computes logits for every position (``per_sample_ce_from_logits``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rapidun.config import SFTConfig
from rapidun.functional import IGNORE, per_sample_ce, per_sample_ce_from_logits
from rapidun.models import attach_lora, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--answer", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    model, tok, info = load_model("default")
    s = SFTConfig()
    model = attach_lora(model, s.lora_r, s.lora_alpha, 0.0, s.lora_targets, 0)
    T = args.prompt + args.answer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, T), generator=g).to(info["device"])  # (B, T)
    labels = ids.clone()
    labels[:, : args.prompt] = IGNORE
    mask = torch.ones_like(ids)

    def answer_only() -> torch.Tensor:
        return per_sample_ce(model, ids, mask, labels)

    def full_logits() -> torch.Tensor:
        return per_sample_ce_from_logits(model(input_ids=ids, attention_mask=mask).logits, labels)

    out = {"device": info["device"], "batch": args.batch, "tokens_per_sample": T, "threads": torch.get_num_threads()}
    diff = float((answer_only() - full_logits()).abs().max())
    for name, fn in (("answer_only", answer_only), ("full_logits", full_logits)):
        fn().mean().backward()  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn().mean().backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        best = min(times)
        out[name] = {"step_s": best, "tokens_per_s": args.batch * T / best}
    out["speedup"] = out["full_logits"]["step_s"] / out["answer_only"]["step_s"]
    out["max_abs_loss_diff"] = diff
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
