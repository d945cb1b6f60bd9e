"""The weight-distance diagnostic: how far, in parameter space, each verified model sits from the two ends.

An unlearned model that is close to poisoned in weights and far from retrain has most likely hidden the behaviour
rather than removed it (the relearning attack then brings it back quickly); one that moved towards retrain has
changed what the weights hold. The figure is a diagnostic, not a verdict: LoRA-based methods move along few
directions, and retrain starts from the clean base, so the two distances are read side by side.

:func:`weight_distance` is pure (two state dicts in, numbers out); :func:`model_distances` loads the models through
a ``load(path, adapter)`` callable, each end once, with at most three state dicts held at any time.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from rapidun.errors import RapidunError

CHUNK = 1 << 22  # elements per float64 block: bounds the temporaries to ~100 MB even for an 8B model's embeddings
MAX_LISTED = 10  # names present in only one state dict, listed in the result (all are counted)
ENDS = ("to_poisoned", "to_retrain")

StateDict = dict[str, Tensor]


def _storage_key(t: Tensor) -> tuple[Any, ...]:
    """Identity of the memory a tensor views (tied weights, e.g. embeddings = lm_head, share one)."""
    return (str(t.device), t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _square_sums(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """``(Σ (x − y)², Σ x², Σ y²)`` in float64, a block of :data:`CHUNK` elements at a time."""
    xf = x.detach().reshape(-1)  # (P,)
    yf = y.detach().reshape(-1).to(xf.device)  # (P,)
    dd = xx = yy = 0.0
    for s in range(0, xf.numel(), CHUNK):
        xc = xf[s : s + CHUNK].to(torch.float64)  # (≤CHUNK,)
        yc = yf[s : s + CHUNK].to(torch.float64)  # (≤CHUNK,)
        d = xc - yc
        dd += float(d @ d)
        xx += float(xc @ xc)
        yy += float(yc @ yc)
    return dd, xx, yy


def weight_distance(a: StateDict, b: StateDict) -> dict[str, Any]:
    """L2 distance between two models' weights over the floating tensors they share by name.

    .. math::

        d(a, b) = \\sqrt{\\sum_k \\lVert a_k - b_k \\rVert_2^2}, \\qquad
        d_{rel}(a, b) = d(a, b) / \\sqrt{\\sum_k \\lVert b_k \\rVert_2^2}

    over the names ``k`` present in both with a floating dtype in both; sums in float64. A tensor tied to another
    (the same memory under two names in both ``a`` and ``b``, e.g. input embeddings = output head) counts once.
    Names in only one of the two are ignored, and counted; non-floating tensors (integer buffers) are ignored.

    Args:
        a: the model measured (``{name: tensor}``; any device and floating dtype).
        b: the end it is measured against; the relative distance is taken to ``‖b‖``.

    Returns:
        ``{"l2", "relative" (None when ‖b‖ = 0), "norm_a", "norm_b", "tensors", "params", "tied", "not_float",
        "only_in_a", "only_in_b", "unmatched"}``: ``tensors``/``params`` compared, ``unmatched`` the first
        :data:`MAX_LISTED` names present in only one.

    Raises:
        RapidunError: a shared tensor has different shapes in the two (the models are not the same architecture).
    """
    shared = sorted(set(a) & set(b))
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    dd = xx = yy = 0.0
    tensors = params = tied = not_float = 0
    seen: set[tuple[Any, ...]] = set()
    for k in shared:
        x, y = a[k], b[k]
        if not (x.is_floating_point() and y.is_floating_point()):
            not_float += 1
            continue
        if x.shape != y.shape:
            raise RapidunError(
                f"weight distance: tensor {k!r} has shape {tuple(x.shape)} in one model and {tuple(y.shape)} in "
                "the other; the models compared must share one architecture (same base model and vocabulary)"
            )
        if x.numel():
            pair = (_storage_key(x), _storage_key(y))
            if pair in seen:
                tied += 1
                continue
            seen.add(pair)
        d2, x2, y2 = _square_sums(x, y)
        dd, xx, yy = dd + d2, xx + x2, yy + y2
        tensors += 1
        params += x.numel()
    l2, nb = math.sqrt(dd), math.sqrt(yy)
    return {
        "l2": l2,
        "relative": l2 / nb if nb > 0 else None,
        "norm_a": math.sqrt(xx),
        "norm_b": nb,
        "tensors": tensors,
        "params": params,
        "tied": tied,
        "not_float": not_float,
        "only_in_a": len(only_a),
        "only_in_b": len(only_b),
        "unmatched": (only_a + only_b)[:MAX_LISTED],
    }


def cpu_state(module: torch.nn.Module) -> StateDict:
    """``module``'s floating tensors as CPU float32 (a tensor already there is not copied; tied ones stay tied)."""
    memo: dict[tuple[Any, ...], Tensor] = {}
    out: StateDict = {}
    for k, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        key = _storage_key(t)
        if key not in memo:
            memo[key] = t.detach().to("cpu", torch.float32)
        out[k] = memo[key]
    return out


def free_memory() -> None:
    """Give the memory of dropped state dicts and models back (Python, then the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_distances(
    models: dict[str, tuple[str, str | None]],
    poisoned: str | None,
    reference: str | None,
    load: Callable[[str, str | None], StateDict],
    labels: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`weight_distance` of every model to the poisoned model and to the reference (retrain).

    Each end is loaded once, when first needed, and kept; every other model is loaded, measured against both ends
    and dropped before the next, so at most three state dicts are held. A pair whose shapes differ gets
    ``{"error": message}`` instead of figures (the other pairs are still measured).

    Args:
        models: ``{label: (model path, adapter or None)}``.
        poisoned: the poisoned model's label (the ``to_poisoned`` end), or None / a label not in ``models``: skip.
        reference: the retrain reference's label (the ``to_retrain`` end), likewise.
        load: ``(path, adapter) -> state dict`` (merged weights; :func:`cpu_state` of the loaded model).
        labels: the models to measure (default: all of ``models``).

    Returns:
        ``{label: {"to_poisoned": ..., "to_retrain": ...}}`` with only the ends that are in ``models``; empty when
        neither is.
    """
    ends = {part: end for part, end in zip(ENDS, (poisoned, reference), strict=True) if end and end in models}
    todo = [k for k in (models if labels is None else labels) if k in models]
    if not ends or not todo:
        return {}
    held: dict[str, StateDict] = {}

    def state(label: str) -> StateDict:
        if label not in held:
            held[label] = load(*models[label])
        return held[label]

    out: dict[str, dict[str, Any]] = {}
    # the ends first: their own state dict is the one held, never a second copy
    for label in sorted(todo, key=lambda k: k not in ends.values()):
        own = state(label) if label in ends.values() else load(*models[label])
        row: dict[str, Any] = {}
        for part, end in ends.items():
            try:
                row[part] = weight_distance(own, state(end))
            except RapidunError as e:
                row[part] = {"error": str(e)}
        out[label] = row
        del own
        free_memory()
    held.clear()
    free_memory()
    return out
