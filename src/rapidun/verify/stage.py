"""Where the battery runs: the ``verify`` stage of ``compare`` and the ``rapidun verify`` command.

Both verify the two ends of the scale (``poisoned``, ``retrain``) with the same attacks as the models under test,
so every figure has its yardstick: a method has really forgotten when the attacks bring the behaviour back no more
than they do on retrain. Output: ``OUT/verify/<label>/<attack>.json`` (cells) and ``verification.json``.

After the attacks, the weight-distance diagnostic (:mod:`rapidun.verify.distance`) puts each model's L2 distance
to poisoned and to retrain into its summary entry (``distance``), cached per pair of model identities in
``OUT/verify/<label>/distance.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidun.config import EvalConfig, ModelConfig, VerifyConfig, to_dict
from rapidun.errors import RapidunError
from rapidun.io import read_json, stable_hash, write_json
from rapidun.models import fingerprint, load_model, resolve_model_path
from rapidun.verify.battery import Battery, summarise, verify_battery
from rapidun.verify.distance import ENDS, StateDict, cpu_state, free_memory, model_distances
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
    for label, dist in distances(models, poisoned, reference, mcfg, out).items():
        summary[label]["distance"] = dist
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


DISTANCE_VERSION = 1  # bump when the distance's definition changes: cached figures are then recomputed


def merged_state(path: str, adapter: str | None, mcfg: ModelConfig) -> StateDict:
    """The merged weights of ``path`` (+ ``adapter``) as CPU float32, the model itself dropped."""
    model, _ = loader(path, adapter, mcfg)()
    sd = cpu_state(model)
    del model
    free_memory()
    return sd


def distances(
    models: dict[str, tuple[str, str | None]], poisoned: str | None, reference: str | None, mcfg: ModelConfig,
    out: Path,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each model's weight distance to the poisoned model and to the reference, for :func:`run_verification`.

    A figure is kept in ``out/verify/<label>/distance.json`` under
    ``stable_hash({version, identity of the model, identity of the end})`` and reused while both identities hold;
    only models with a missing figure are loaded (:func:`rapidun.verify.distance.model_distances`). Pairs that
    failed (``{"error"}``) are not kept. The file's own ``key`` hashes the model's and both ends' identities.

    Returns:
        ``{label: {"to_poisoned": ..., "to_retrain": ...}}`` with the ends that are in ``models`` (empty if none).
    """
    ends = {part: end for part, end in zip(ENDS, (poisoned, reference), strict=True) if end and end in models}
    if not ends:
        return {}
    ids = {label: identity(*models[label]) for label in models}
    keys = {(label, part): stable_hash({"v": DISTANCE_VERSION, "model": ids[label], "end": ids[end]})
            for label in models for part, end in ends.items()}  # fmt: skip
    files = {label: out / "verify" / label.replace("/", "_") / "distance.json" for label in models}
    docs = {label: read_json(f) if f.is_file() else {} for label, f in files.items()}
    got: dict[str, dict[str, Any]] = {}
    for label in models:
        pairs = docs[label].get("pairs", {})
        got[label] = {part: pairs[keys[label, part]]["distance"] for part in ends if keys[label, part] in pairs}
    todo = [label for label in models if len(got[label]) < len(ends)]
    fresh = model_distances(models, poisoned, reference, lambda p, a: merged_state(p, a, mcfg), todo)
    for label, row in fresh.items():
        pairs = dict(docs[label].get("pairs", {}))
        for part, d in row.items():
            got[label][part] = d
            if "error" not in d:
                pairs[keys[label, part]] = {"end": ends[part], "model": ids[label], "to": ids[ends[part]],
                                            "distance": d}  # fmt: skip
        key = stable_hash({"v": DISTANCE_VERSION, "model": ids[label], "ends": {p: ids[e] for p, e in ends.items()}})
        write_json(files[label], {"schema": "rapidun.distance/1", "key": key, "pairs": pairs})
    return {label: {part: got[label][part] for part in ends if part in got[label]} for label in models}


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
