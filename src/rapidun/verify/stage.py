"""Where the battery runs: the ``verify`` stage of ``compare`` and the ``rapidun verify`` command.

Both verify the two ends of the scale (``poisoned``, ``retrain``) with the same attacks as the models under test,
so every figure has its yardstick: a method has really forgotten when the attacks bring the behaviour back no more
than they do on retrain. Output: ``OUT/verify/<label>/<attack>.json`` (cells) and ``verification.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidun.config import EvalConfig, ModelConfig, VerifyConfig, to_dict
from rapidun.errors import RapidunError
from rapidun.io import write_json
from rapidun.models import fingerprint, load_model, resolve_model_path
from rapidun.verify.battery import Battery, summarise, verify_battery
from rapidun.verify.target import Target


def loader(path: str, adapter: str | None, mcfg: ModelConfig) -> Callable[[], tuple[Any, Any]]:
    """``() -> (model, tokenizer)``: ``path`` loaded, with a PEFT ``adapter`` merged in memory (no folder written)."""

    def load() -> tuple[Any, Any]:
        model, tok, _ = load_model(path, mcfg.device, mcfg.dtype)
        if adapter:
            from rapidun.models import import_peft

            model = import_peft().PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        return model, tok

    return load


def identity(path: str, adapter: str | None) -> dict[str, Any]:
    """Content identity of a model under test (fingerprints of the folder and of the adapter)."""
    return {"model": fingerprint(resolve_model_path(path)), "adapter": fingerprint(str(adapter)) if adapter else None}


def run_verification(
    models: dict[str, tuple[str, str | None]],
    target: Target,
    vcfg: VerifyConfig,
    ecfg: EvalConfig,
    mcfg: ModelConfig,
    out: Path,
    poisoned: str | None = "poisoned",
    reference: str | None = "retrain",
) -> dict[str, Any]:
    """Verify every model of ``models`` (``{label: (model path, adapter or None)}``; the reference first, so its
    log-likelihoods are there for the KS test) and write ``out/verification.json``.

    Returns:
        ``{"schema", "config", "split", "poisoned", "reference", "summary", "cells"}``: ``summary`` from
        :func:`rapidun.verify.battery.summarise`; ``cells`` every cell's full result (generations' hits
        included), per label and attack.
    """
    order = sorted(models, key=lambda k: (k != reference, k != poisoned))
    results: dict[str, Any] = {}
    for label in order:
        path, adapter = models[label]
        b = Battery(label, loader(path, adapter, mcfg), identity(path, adapter), target, vcfg, ecfg, mcfg,
                    out / "verify" / label.replace("/", "_"))  # fmt: skip
        results[label] = verify_battery(b, list(vcfg.attacks))
    summary = summarise(results, poisoned if poisoned in results else None, reference if reference in results else None)
    doc = {
        "schema": "rapidun.verification/1",
        "config": to_dict(vcfg),
        "split": vcfg.split if target.kind == "scenario" else "probes",
        "target": target.kind,
        "poisoned": poisoned if poisoned in results else None,
        "reference": reference if reference in results else None,
        "models": {k: {"path": v[0], "adapter": v[1]} for k, v in models.items()},
        "summary": summary,
        "cells": results,
    }
    write_json(out / "verification.json", doc)
    return doc


def compare_models(
    out: Path, poisoned_path: str, retrain_path: str | None, methods: dict[str, Any], seeds: int
) -> dict[str, tuple[str, str | None]]:
    """The models the ``compare`` stage verifies: poisoned, retrain, and each method's first ``seeds`` seeds
    (``<method>@<seed>`` = the poisoned model + the cell's adapter; methods without an adapter are skipped)."""
    models: dict[str, tuple[str, str | None]] = {"poisoned": (poisoned_path, None)}
    if retrain_path:
        models["retrain"] = (retrain_path, None)
    for name, e in methods.items():
        for seed in list(e.get("per_seed", {}))[:seeds]:
            cell = e["per_seed"][seed].get("dir")
            if not cell:
                continue
            adapter = out / cell / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                raise RapidunError(f"{adapter}: the cell of {name} seed {seed} has no adapter to verify; rerun compare")
            models[f"{name}@{seed}"] = (poisoned_path, str(adapter))
    return models
