"""Influence matrices between two sets of gradient sketches, self-pair exclusion, top-k retrieval and I/O.

Notation: ``N`` train samples, ``Q`` test (query) samples, ``K`` sketch length. ``g_i = P(∇ℓ_i)`` is the
sketched gradient of sample ``i`` (one row of a :class:`rapidun.influence.cache.SketchCache`). The influence
of train sample ``i`` on test sample ``j`` is the single-checkpoint TracIn score

    I[i, j] = ⟨g_i, g_j⟩                                  (mode "dot")
    I[i, j] = ⟨g_i, g_j⟩ / (‖g_i‖ · ‖g_j‖)                  (mode "cosine"; 0 when either row is zero)

up to the learning rate, which does not change rankings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rapidun.errors import RapidunError
from rapidun.io import atomic_path, write_jsonl

MODES = ("dot", "cosine")
NORM_EPS = 1e-12  # cosine: a row with norm below this is treated as zero (all its scores are 0)


def _pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def influence_matrix(
    train: torch.Tensor,
    test: torch.Tensor,
    mode: str = "dot",
    chunk: int = 4096,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Influence of every train sample on every test sample, ``I = G_train · G_testᵀ``.

    ``I[i, j] = ⟨g_i, g_j⟩`` for mode ``"dot"``; for ``"cosine"`` both row sets are first L2-normalised,
    ``g / max(‖g‖, 1e-12)``, so a zero row scores 0 against everything. All arithmetic is float32 even when
    the inputs are float16 (the cache's storage dtype): inputs are upcast chunk by chunk, so float16 inputs
    keep their memory footprint. The test set is moved to ``device`` once, ``(Q, K)`` float32; train rows go
    over in chunks of ``chunk``, so device memory stays ``O((Q + chunk) · K)``. Note: float32 matmuls on
    CUDA follow ``torch.set_float32_matmul_precision`` (full precision by default; TF32 if a caller chose
    ``"high"``, ~1e-3 relative error).

    Args:
        train: Tensor ``(N, K)``, any float dtype and device.
        test: Tensor ``(Q, K)``, same ``K``.
        mode: ``"dot"`` or ``"cosine"``.
        chunk: Train rows per matmul (≥ 1).
        device: Where to compute; default CUDA when available, else CPU.

    Returns:
        Tensor ``(N, Q)`` float32 on CPU.

    Raises:
        RapidunError: Unknown ``mode`` (the message lists the modes), non-2-D inputs, different ``K``, or a bad
            ``chunk``.
    """
    if mode not in MODES:
        raise RapidunError(f"unknown influence mode {mode!r}; choose one of {', '.join(MODES)}")
    for name, t in (("train", train), ("test", test)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RapidunError(f"{name} sketches must be a 2-D float tensor (n, K), got {shape}")
    if train.shape[1] != test.shape[1]:
        raise RapidunError(
            f"train and test sketches have different lengths K ({train.shape[1]} vs {test.shape[1]}); "
            "were they built with the same sketch settings?"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise RapidunError(f"chunk must be a positive integer, got {chunk!r}")
    dev = _pick_device(device)
    n, q = train.shape[0], test.shape[0]
    out = torch.empty(n, q, dtype=torch.float32)  # (N, Q)
    t = test.detach().to(device=dev, dtype=torch.float32)  # (Q, K)
    if mode == "cosine":
        t = F.normalize(t, dim=1, eps=NORM_EPS)  # (Q, K), unit or zero rows
    tt = t.T  # (K, Q)
    for start in range(0, n, chunk):
        a = train[start : start + chunk].detach().to(device=dev, dtype=torch.float32)  # (c, K)
        if mode == "cosine":
            a = F.normalize(a, dim=1, eps=NORM_EPS)  # (c, K)
        out[start : start + a.shape[0]] = (a @ tt).cpu()  # (c, Q)
    return out


def _check_ids(matrix: torch.Tensor, train_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    """``matrix`` must be ``(len(train_ids), len(test_ids))``."""
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise RapidunError(f"influence matrix must be a 2-D tensor (N, Q), got {type(matrix).__name__}")
    if tuple(matrix.shape) != (len(train_ids), len(test_ids)):
        raise RapidunError(
            f"influence matrix has shape {tuple(matrix.shape)} but there are {len(train_ids)} train ids and "
            f"{len(test_ids)} test ids"
        )


def exclude_self(
    matrix: torch.Tensor, train_ids: Sequence[str], test_ids: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask self-pairs, ``train_ids[i] == test_ids[j]``, of a matrix whose two sides share samples.

    Used for the forget×forget / retain×retain views, where a sample's influence on itself (``‖g_i‖²``, the
    largest entry of its column) would dominate every ranking.

    Args:
        matrix: Tensor ``(N, Q)``.
        train_ids: ``N`` ids of the rows.
        test_ids: ``Q`` ids of the columns.

    Returns:
        ``(masked, mask)``: ``masked`` is a copy of ``matrix`` with self-pairs set to 0 (so sums and plots
        stay finite); ``mask`` is bool ``(N, Q)``, True at self-pairs. Averages that must ignore self-pairs
        should use ``masked[~mask]`` (or divide by ``(~mask).sum(0)``); :func:`topk` takes ``mask`` to skip them.

    Raises:
        RapidunError: ``matrix`` is not ``(len(train_ids), len(test_ids))``.
    """
    _check_ids(matrix, train_ids, test_ids)
    rows: dict[str, list[int]] = {}
    for i, tid in enumerate(train_ids):
        rows.setdefault(tid, []).append(i)
    pairs = [(i, j) for j, qid in enumerate(test_ids) for i in rows.get(qid, ())]
    mask = torch.zeros(matrix.shape, dtype=torch.bool, device=matrix.device)  # (N, Q)
    if pairs:
        ii, jj = torch.tensor(pairs, dtype=torch.long, device=matrix.device).T  # (P,), (P,)
        mask[ii, jj] = True
    masked = matrix.masked_fill(mask, 0)  # (N, Q) copy
    return masked, mask


def topk(
    matrix: torch.Tensor,
    k: int,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    largest: bool = True,
    mask: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` most (or least) influential train samples of each test sample.

    For column ``j``, train indices are ordered by score, descending when ``largest`` (ascending otherwise);
    equal scores keep train-index order (stable). Entries where ``mask`` is True, and NaN entries, are never
    returned, so a row may hold fewer than ``k`` items; ``k > N`` is clipped to ``N``.

    Args:
        matrix: Tensor ``(N, Q)``, e.g. from :func:`influence_matrix`.
        k: Items per test sample (≥ 0).
        train_ids: ``N`` row ids.
        test_ids: ``Q`` column ids.
        largest: Most influential (True) or least (False) first.
        mask: Optional bool ``(N, Q)``, True = skip (e.g. from :func:`exclude_self`).

    Returns:
        One dict per test sample, in ``test_ids`` order:
        ``{"test_id": str, "train_ids": [str, ...], "scores": [float, ...]}``, most influential first.

    Raises:
        RapidunError: Shapes do not match the ids or ``mask``, or ``k < 0``.
    """
    _check_ids(matrix, train_ids, test_ids)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise RapidunError(f"k must be a non-negative integer, got {k!r}")
    m = matrix.detach().to(device="cpu", dtype=torch.float32)  # (N, Q)
    skip = torch.isnan(m)  # (N, Q)
    if mask is not None:
        if tuple(mask.shape) != tuple(m.shape):
            raise RapidunError(f"mask has shape {tuple(mask.shape)}, matrix has {tuple(m.shape)}")
        skip |= mask.to(device="cpu", dtype=torch.bool)
    key = -m if largest else m  # (N, Q); ascending key = best first
    out = []
    for j, qid in enumerate(test_ids):
        ok = (~skip[:, j]).nonzero().flatten()  # (n_ok,) candidate train indices, ascending
        best = ok[torch.sort(key[ok, j], stable=True).indices[:k]]  # (min(k, n_ok),) best first, ties by index
        out.append({"test_id": qid, "train_ids": [train_ids[i] for i in best.tolist()], "scores": m[best, j].tolist()})
    return out


def write_matrix(
    path: str | Path,
    matrix: torch.Tensor,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Save an influence matrix with its ids, atomically, as ``torch.save`` of a dict.

    The file holds ``{"matrix": Tensor (N, Q) float32, "train_ids": [...], "test_ids": [...], "meta": {...}}``;
    ``meta`` (optional, JSON-able) records provenance such as the mode and the sketch-cache meta.

    Raises:
        RapidunError: ``matrix`` is not ``(len(train_ids), len(test_ids))``.
    """
    _check_ids(matrix, train_ids, test_ids)
    # .clone(): torch.save of a view would store the whole underlying buffer.
    m = matrix.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()  # (N, Q)
    blob = {"matrix": m, "train_ids": list(train_ids), "test_ids": list(test_ids), "meta": dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def read_matrix(path: str | Path) -> dict[str, Any]:
    """Load a file written by :func:`write_matrix`.

    Returns:
        ``{"matrix": Tensor (N, Q) float32, "train_ids": list[str], "test_ids": list[str], "meta": dict}``.

    Raises:
        RapidunError: The file is missing, unreadable, or not an influence matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise RapidunError(f"influence matrix file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RapidunError(f"cannot read influence matrix {path}: {e}") from e
    if not isinstance(blob, dict) or not {"matrix", "train_ids", "test_ids"} <= set(blob):
        raise RapidunError(f"{path} is not an influence matrix written by rapidun (missing keys)")
    try:
        _check_ids(blob["matrix"], blob["train_ids"], blob["test_ids"])
    except RapidunError as e:
        raise RapidunError(f"{path}: {e}") from e
    return {**blob, "meta": blob.get("meta") or {}}


def write_topk_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write :func:`topk` rows, one JSON object per line, atomically."""
    write_jsonl(path, rows)
