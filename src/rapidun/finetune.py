"""Supervised LoRA fine-tuning stage, used twice: the poisoned model and the clean ``retrain`` reference.

Base model + fresh LoRA adapter → :func:`rapidun.train.train` → adapter merged into a plain model folder. Results
are cached by content (base model fingerprint, training records, SFT and format settings) under
``$RAPIDUN_CACHE/sft/``; a rerun with the same inputs reuses the folder and its recorded (measured) timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from rapidun.config import ModelConfig, SFTConfig, to_dict
from rapidun.data.records import Record
from rapidun.data.template import FORMAT_VERSION, encode_records
from rapidun.io import atomic_path, read_json, stable_hash, write_json
from rapidun.memory import PeakMemory
from rapidun.models import attach_lora, cache_root, fingerprint, load_model, resolve_model_path
from rapidun.train import train


def sft_key(base_path: str, records: list[Record], mcfg: ModelConfig, scfg: SFTConfig) -> str:
    """Content key of an SFT run."""
    return stable_hash(
        {
            "base": fingerprint(base_path),
            "records": [r.to_json() for r in records],
            "max_length": mcfg.max_length,
            "max_prompt_tokens": mcfg.max_prompt_tokens,
            "dtype": mcfg.dtype,
            "system_prompt": mcfg.system_prompt,
            "sft": to_dict(scfg),
            "format": FORMAT_VERSION,
        }
    )


def finetune(records: list[Record], mcfg: ModelConfig, scfg: SFTConfig, tag: str) -> dict[str, Any]:
    """Fine-tune ``mcfg.name`` on ``records`` (or reuse the cached result). Returns the model's meta dict."""
    base_path = resolve_model_path(mcfg.name)
    key = sft_key(base_path, records, mcfg, scfg)
    folder = cache_root() / "sft" / f"{tag}-{key}"
    if (folder / "rapidun_sft.json").is_file():
        meta = read_json(folder / "rapidun_sft.json")
        return {**meta, "path": str(folder), "cached": True}
    torch.manual_seed(scfg.seed)
    model, tok, info = load_model(mcfg.name, mcfg.device, mcfg.dtype)
    samples, trunc = encode_records(tok, records, mcfg)
    model = attach_lora(model, scfg.lora_r, scfg.lora_alpha, scfg.lora_dropout, scfg.lora_targets, scfg.seed)
    with PeakMemory() as peak:
        stats = train(model, samples, scfg, tok.pad_token_id, torch.device(info["device"]), desc=f"sft:{tag}")
    t0 = time.perf_counter()
    merged = model.merge_and_unload()
    meta = {
        "tag": tag,
        "key": key,
        "base": info,
        "train": stats,
        "truncation": trunc,
        "n_records": len(records),
        "sft": to_dict(scfg),
        "peak_mem_mb": peak.peak_mb,
        "peak_mem_kind": peak.kind,
    }
    with atomic_path(folder) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta["save_s"] = time.perf_counter() - t0
        write_json(Path(tmp) / "rapidun_sft.json", meta)
    return {**meta, "path": str(folder), "cached": False}
