"""The influence commands: ``rapidun influence`` (the train x test matrix and top-k lists) and ``rapidun
influence-check`` (sketch fidelity against exact gradients, optionally leave-one-out retraining)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rapidun.cli_inputs import identity, records_arg
from rapidun.cli_inputs import load_args_config as _load


def cmd_influence(args: argparse.Namespace) -> None:
    from rapidun.distributed import barrier, init_from_env, is_main
    from rapidun.influence.engine import influence
    from rapidun.influence.retrieval import write_matrix, write_topk_jsonl
    from rapidun.io import write_json
    from rapidun.run_folder import prepare_out

    init_from_env()  # several ranks under torchrun / accelerate launch; results are the same
    cfg = _load(args)
    train, test = records_arg(args.train, cfg), records_arg(args.test, cfg)
    inputs = identity(args, "model_path", "train", "test")
    out = prepare_out(args.out, cfg, args.overwrite, "influence", inputs) if is_main() else Path(args.out)
    barrier()
    res = influence(args.model_path or cfg.model.name, train, test, cfg.model, cfg.influence)
    if not is_main():
        return
    write_matrix(out / "influence.pt", res["matrix"], res["train_ids"], res["test_ids"], meta=res["config"])
    write_topk_jsonl(out / "topk.jsonl", res["topk"])
    write_json(
        out / "influence.json", {"stats": res["stats"], "config": res["config"], "shape": list(res["matrix"].shape)}
    )
    st = res["stats"]
    n = st["train"]["computed"] + st["test"]["computed"]
    print(f"influence matrix {tuple(res['matrix'].shape)} (train x test, {cfg.influence.mode}) -> {out}/influence.pt")
    print(
        f"D={st['D']}  computed {n} sketches (grad {st['train']['grad_s'] + st['test']['grad_s']:.1f} s, sketch "
        f"{st['train']['sketch_s'] + st['test']['sketch_s']:.2f} s), total {st['total_s']:.1f} s"
    )


def cmd_influence_check(args: argparse.Namespace) -> None:
    from rapidun.data.scenario import load_scenario
    from rapidun.influence.check import sketch_fidelity
    from rapidun.influence.engine import exact_grads, prepare
    from rapidun.io import write_json
    from rapidun.models import resolve_model_path
    from rapidun.pipeline import stage_scenario
    from rapidun.run_folder import prepare_out

    cfg = _load(args)
    extra = {
        k: getattr(args, k) for k in ("n", "K", "topk", "loo_train", "loo_test", "loo_removed", "loo_steps", "loo_lr")
    }
    inputs = identity(args, "model_path", "scenario") | extra
    out = prepare_out(args.out, cfg, args.overwrite, "influence-check", inputs)
    parts = load_scenario(args.scenario)[0] if args.scenario else stage_scenario(cfg, out)[0]
    recs = (parts["forget"] + parts["retain"])[: args.n]
    model_name = resolve_model_path(args.model_path or cfg.model.name)
    model, tok, pset, info = prepare(model_name, cfg.model, cfg.influence)
    G = exact_grads(model, tok, pset, recs, cfg.model, cfg.influence)  # (n, D)
    rows = sketch_fidelity(G, args.K, cfg.influence.seed, cfg.influence.rounds, k=args.topk)
    del G
    loo = None
    if args.loo_train > 0:
        from rapidun.data.template import encode_records
        from rapidun.influence.loo import leave_one_out

        enc, _ = encode_records(tok, recs[: args.loo_train + args.loo_test], cfg.model)
        tr, te = enc[: args.loo_train], enc[args.loo_train :]
        removed = list(range(0, args.loo_train, max(1, args.loo_train // args.loo_removed)))[: args.loo_removed]
        loo = leave_one_out(
            model,
            pset,
            tr,
            te,
            removed,
            tok.pad_token_id,
            args.loo_lr,
            args.loo_steps,
            K=max(args.K),
            seed=cfg.influence.seed,
            rounds=cfg.influence.rounds,
        )
    result = {
        "model": model_name,
        "param_set": cfg.influence.param_set,
        "D": pset.dim,
        "n_samples": len(recs),
        "normalize": cfg.influence.normalize,
        "device": info["device"],
        "results": rows,
        "leave_one_out": loo,
    }
    write_json(out / "influence_check.json", result)
    print(f"sketch fidelity on {len(recs)} forget+retain samples, D={pset.dim} ({cfg.influence.param_set})")
    print("K        pearson  spearman  top-k overlap")
    for r in rows:
        ov = next(v for k, v in r.items() if k.endswith("_overlap"))
        print(f"{r['K']:<8d} {r['pearson']:7.4f}  {r['spearman']:8.4f}  {ov:13.3f}")
    if loo:
        print(
            f"leave-one-out ({loo['removed']} removed of {loo['n_train']}, {loo['steps']} SGD steps, lr {loo['lr']}, "
            f"{loo['pairs']} pairs): Pearson exact {loo['pearson_exact']:.3f} / sketched {loo['pearson_sketch']:.3f}, "
            f"Spearman exact {loo['spearman_exact']:.3f} / sketched {loo['spearman_sketch']:.3f}"
        )
    print(f"written: {out / 'influence_check.json'}")
