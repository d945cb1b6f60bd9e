"""Quantization probe (``verify.quant_bits``): weight-only round-to-nearest quantization of every linear layer.

Unlearned models often keep the forgotten behaviour in weight changes smaller than a quantization step, so a
4-bit copy of the model can bring it back (Zhang et al., ICLR 2025, arXiv 2410.16454). The probe quantizes the
weights of every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the model except the output head, symmetric per output
channel at 8 bits and per group of ``group_size`` input columns at 4 bits (and below), then writes the
de-quantized values back into the float model. A weight-only quantized model computes exactly ``dequant(W)·x``,
so the float copy answers as the quantized one would, and generation and perplexity run unchanged.

Backends (``verify.quant_backend``):

* ``torchao`` — PyTorch's maintained quantization library (``quantize_`` with ``IntxWeightOnlyConfig``: int8 per
  channel, int4/intN per group), chosen because it runs on the CPU and on CUDA alike and is the library PyTorch
  itself ships quantization in; GPU-only libraries (bitsandbytes 4-bit, GPTQ/AWQ kernels) cannot run on the
  machines this tool is tested on. Install with ``pip install 'rapidun[quant]'`` (``make`` does).
* ``rtn`` — the documented fallback, :func:`rtn_dequant`: the same symmetric round-to-nearest written out
  with torchao's convention (``scale = max|w| / ((2^b - 1) / 2)`` per channel or group,
  ``q = clamp(round(w · (1/scale)), -2^(b-1), 2^(b-1) - 1)``, ``w' = q · scale``; the tests check the two agree
  value for value). Used for ``Conv1D`` weights, when torchao is missing, or when asked for.
* ``auto`` (default) — torchao when it imports, else ``rtn``; the result records which one ran and why.
"""

from __future__ import annotations

from typing import Any

import torch

from rapidun.errors import RapidunError

BACKENDS = ("auto", "torchao", "rtn")


def granularity(bits: int, group_size: int, in_features: int) -> int:
    """Columns per scale: the whole row (per channel) at 8 bits and above, ``group_size`` below (or the whole row
    when ``group_size`` does not divide it)."""
    if bits >= 8 or group_size <= 0 or in_features % group_size:
        return in_features
    return group_size


def rtn_dequant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest, de-quantized: ``(out, in)`` weight → the float values its ``bits``-bit
    quantization represents, one scale per row and group of ``group`` columns.

    ``scale = max|w_g| / ((2^b − 1) / 2)``; ``q = clamp(round(w · (1/scale)), −2^(b-1), 2^(b-1) − 1)``;
    ``w' = q·scale`` (torchao's symmetric mapping; an all-zero group keeps scale 1 and stays zero).
    """
    if bits < 2 or bits > 16:
        raise RapidunError(f"verify.quant_bits: {bits} bits is outside 2..16")
    out_f, in_f = w.shape
    if in_f % group:
        raise RapidunError(f"group size {group} does not divide the weight's {in_f} columns")
    qmax = 2 ** (bits - 1) - 1
    g = w.detach().float().reshape(out_f, in_f // group, group)  # (O, G, g)
    scale = g.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)  # (O, G, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g * (1.0 / scale)), -qmax - 1, qmax)
    return (q * scale).reshape(out_f, in_f).to(w.dtype)


def _torchao() -> tuple[Any, str | None]:
    """The torchao module, or ``(None, why not)``. Its import warnings about optional GPU kernels are muted."""
    from rapidun.models import quiet_imports

    try:
        with quiet_imports():
            import torchao
            from torchao.quantization import IntxWeightOnlyConfig, quantize_  # noqa: F401
            from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: F401
        return torchao, None
    except Exception as e:  # ImportError, or a torchao built for another torch
        return None, f"torchao unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


def _torchao_dequant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """torchao's weight-only quantization of one ``(out, in)`` weight, de-quantized back to float."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w.detach().float())
    gran = PerAxis(0) if group == w.shape[1] else PerGroup(group)
    quantize_(lin, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=gran))
    return lin.weight.dequantize().to(w.dtype)


def quant_targets(model: Any) -> list[tuple[str, Any, bool]]:
    """``(name, module, transposed)`` of every linear layer to quantize: ``nn.Linear`` and GPT-2 ``Conv1D``
    (weight stored ``(in, out)``: transposed), the output head (``get_output_embeddings``) excepted."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            out.append((name, mod, False))
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
            out.append((name, mod, True))
    return out


@torch.no_grad()
def quantize_weights(model: Any, bits: int, group_size: int = 32, backend: str = "auto") -> dict[str, Any]:
    """Replace every target weight of ``model`` (in place) by its ``bits``-bit weight-only quantization.

    Returns:
        ``{"backend", "bits", "group_size", "layers", "params", "rel_error", "note"}``: the backend that ran,
        the layers and parameters quantized, and the relative Frobenius error ``‖W' − W‖ / ‖W‖`` over them.
    """
    if backend not in BACKENDS:
        raise RapidunError(f"verify.quant_backend={backend!r}; choose from {list(BACKENDS)}")
    ao, why = (None, "asked for rtn") if backend == "rtn" else _torchao()
    if backend == "torchao" and ao is None:
        raise RapidunError(f"verify.quant_backend=torchao but {why}; pip install 'rapidun[quant]' or use rtn")
    targets = quant_targets(model)
    if not targets:
        raise RapidunError("the model has no linear layers to quantize")
    err2 = ref2 = 0.0
    n_params = 0
    conv1d = 0
    for _name, mod, transposed in targets:
        w = mod.weight.data.t() if transposed else mod.weight.data  # (out, in)
        group = granularity(bits, group_size, w.shape[1])
        if ao is not None and not transposed:
            try:
                new = _torchao_dequant(w, bits, group)
            except Exception as e:  # a torchao whose API differs: the same mapping, written out
                ao, why = None, f"torchao failed ({type(e).__name__}: {str(e)[:160]}); rtn used"
                new = rtn_dequant(w, bits, group)
        else:
            conv1d += transposed
            new = rtn_dequant(w, bits, group)
        err2 += float((new.float() - w.float()).pow(2).sum())
        ref2 += float(w.float().pow(2).sum())
        n_params += w.numel()
        mod.weight.data.copy_(new.t() if transposed else new)
    used = "torchao" if ao is not None else "rtn"
    note = why if ao is None else (f"{conv1d} Conv1D layers by rtn" if conv1d else None)
    return {
        "backend": used + (f" {ao.__version__}" if ao is not None else ""),
        "bits": bits,
        "group_size": group_size if bits < 8 else None,
        "layers": len(targets),
        "params": n_params,
        "rel_error": (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0,
        "note": note,
    }
