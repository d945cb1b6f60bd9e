"""RapidUn per-sample weights from the four directional influence views (SPEC §2, steps 6–10).

Notation: ``N_f`` forget samples, ``N_r`` retain samples. An influence matrix is indexed ``[train i, test j]``
(the convention of :mod:`rapidun.influence.retrieval`); the four views are named *train set* then *test set*:

====  ===================================  ==============  =========================================
view  train ← test                         shape           the authors' RapidIn file
====  ===================================  ==============  =========================================
FF    forget ← forget                      ``(N_f, N_f)``  ``influence_results_<N_f>_FTF.json``
FR    forget ← retain                      ``(N_f, N_r)``  ``influence_results_<N_f>_FTR.json``
RF    retain ← forget                      ``(N_r, N_f)``  ``influence_results_<N_r>_RTF.json``
RR    retain ← retain                      ``(N_r, N_r)``  ``influence_results_<N_r>_RTR.json``
====  ===================================  ==============  =========================================

The chain, one pure function per step (all arithmetic in float64, torch tensors or numpy arrays in, float64
torch tensors out):

1. :func:`mask_self` — FF and RR: the self-pairs ``(i, i)`` become NaN ("no observation") unless included.
2. :func:`topk_keep` — per test sample ``j`` keep the ``k`` largest raw values of column ``j``, 0 elsewhere.
3. :func:`aggregate` — per train sample ``i`` the median over test samples ``j`` → vectors FF, FR, RF, RR.
4. :func:`fuse` — ``S_forget = α·FF − β·FR``, ``S_retain = γ·RR − δ·RF``.
5. :func:`robust_scale` — ``z = (S − median S) / max(1.4826·MAD(S), floor)`` (or ``IQR/1.349``).
6. :func:`bounded_weights` — ``w = exp(clip(z/τ, ln w_min, ln w_max))`` plus saturation fractions, then
   :func:`normalize_mean` — ``w / mean(w)``.

:func:`rapidun_weights` runs the chain for both groups and returns every intermediate for the audit table.
:func:`load_rapidin_json` reads the authors' RapidIn retrieval files into dense matrices (the only I/O here).

Self-pair convention. NaN in a matrix means "no observation for this pair": :func:`topk_keep` never selects a
NaN entry and leaves it NaN, and :func:`aggregate` takes each row's median over its non-NaN entries only. So an
excluded self-pair is neither a top-k candidate nor one of the values whose median is taken (a row of FF then
has a median over ``N_f − 1`` test samples), whereas a real but non-kept entry is 0 and *does* count. With
``include_self=True`` (the authors' setting) the diagonal is an ordinary entry — usually the column's largest,
``‖g_i‖²`` — and is always kept.

Median. Every median here is the standard one: the middle value of the sorted values, and for an even count
the mean of the two middle values (``numpy.median``). ``torch.median`` returns the *lower* middle value instead;
that definition does not reproduce the authors' weight files (max error 2.3), the standard one does (~1e-15).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from rapidun.config import WeightingConfig
from rapidun.errors import RapidunError

ArrayLike = torch.Tensor | np.ndarray
MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): makes the MAD a consistent estimate of σ for normal data
IQR_TO_SIGMA = 1.349  # Φ⁻¹(3/4) − Φ⁻¹(1/4): IQR of the standard normal
SCALE_METHODS = ("mad", "iqr")


def _as_f64(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    """``x`` as a float64 tensor (same device for tensors), checked to have ``ndim`` dimensions."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64)
    else:
        raise RapidunError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if t.ndim != ndim:
        raise RapidunError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_no_inf(t: torch.Tensor, name: str) -> None:
    if torch.isinf(t).any():
        raise RapidunError(f"{name} contains ±inf; influence values must be finite (NaN marks an excluded pair)")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise RapidunError(f"{name} contains NaN or ±inf at positions {torch.nonzero(~torch.isfinite(t))[:5].tolist()}")


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of a finite 1-D ``v`` (``numpy.quantile``'s default; q=0.5 is the median).

    With ``s`` the sorted values and ``p = q·(n − 1)``: ``s[⌊p⌋] + (p − ⌊p⌋)·(s[⌈p⌉] − s[⌊p⌋])``.
    """
    s = torch.sort(v).values  # (n,)
    p = q * (len(s) - 1)
    lo, hi = math.floor(p), math.ceil(p)
    return s[lo] + (p - lo) * (s[hi] - s[lo])


def mask_self(M: ArrayLike, include_self: bool = False) -> torch.Tensor:
    """Mark the self-pairs of a square view (FF or RR) as excluded.

    For ``include_self=False`` returns a float64 copy of ``M`` with ``M'[i, i] = NaN`` for every ``i`` — NaN is
    this module's "no observation" marker: never kept by :func:`topk_keep`, not counted by :func:`aggregate`.
    For ``include_self=True`` returns a float64 copy of ``M`` unchanged (the authors' setting). Both axes must
    list the same samples in the same order (train sample ``i`` is test sample ``i``).

    Args:
        M: Influence view ``(N, N)``, indexed ``[train i, test j]``.
        include_self: Keep the diagonal as ordinary entries.

    Returns:
        Tensor ``(N, N)`` float64.

    Raises:
        RapidunError: ``M`` is not a square 2-D array.
    """
    t = _as_f64(M, "self-pair view", 2).clone()  # (N, N)
    if t.shape[0] != t.shape[1]:
        raise RapidunError(f"self-pairs are defined for square views (FF, RR) only, got shape {tuple(t.shape)}")
    if not include_self:
        t.diagonal().fill_(math.nan)  # (N,) view of the diagonal
    return t


def topk_keep(M: ArrayLike, k: int = 40) -> torch.Tensor:
    """Per test sample keep the ``k`` largest influence values, zero elsewhere.

    For column ``j`` let ``T_j`` be the ``min(k, n_j)`` train indices with the largest values among the ``n_j``
    non-NaN entries (ties: lower train index first). Then

        K[i, j] = M[i, j]  if i ∈ T_j,   NaN  if M[i, j] is NaN,   0  otherwise.

    Values are kept raw: when a column has fewer than ``k`` positive entries, negative ones are kept too (the
    authors' "top 40 helpful" lists are all train samples sorted most-positive first). ``k ≥ N`` keeps every
    non-NaN entry.

    Args:
        M: Influence view ``(N, Q)``, float; NaN = excluded pair (see :func:`mask_self`); no ±inf.
        k: Entries kept per column (≥ 1).

    Returns:
        Tensor ``(N, Q)`` float64.

    Raises:
        RapidunError: ``k`` is not a positive integer, ``M`` is not 2-D, or ``M`` holds ±inf.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RapidunError(f"top_k must be a positive integer, got {k!r}")
    t = _as_f64(M, "influence view", 2)  # (N, Q)
    _check_no_inf(t, "influence view")
    nan = torch.isnan(t)  # (N, Q)
    key = t.masked_fill(nan, -math.inf)  # (N, Q); excluded entries sort last
    order = torch.sort(key, dim=0, descending=True, stable=True).indices  # (N, Q) train indices, best first
    top = order[: min(k, t.shape[0])]  # (k', Q)
    keep = torch.zeros_like(nan).scatter_(0, top, True)  # (N, Q) True at the kept entries
    out = torch.where(keep, t, torch.zeros_like(t))  # (N, Q)
    return out.masked_fill(nan, math.nan)  # (N, Q); a NaN picked when k' > n_j stays NaN


def aggregate(M_kept: ArrayLike) -> torch.Tensor:
    """Per train sample, the median over test samples of the kept influence values.

    ``a[i] = median{ K[i, j] : K[i, j] not NaN }`` with the standard median (mean of the two middle values for
    an even count, as ``numpy.median``): with ``s`` the ``n_i`` sorted values of row ``i``,
    ``a[i] = (s[⌊(n_i − 1)/2⌋] + s[⌊n_i/2⌋]) / 2``. Zeros (non-kept entries) count; NaN (excluded) do not.

    Args:
        M_kept: Tensor ``(N, Q)`` from :func:`topk_keep`.

    Returns:
        Tensor ``(N,)`` float64.

    Raises:
        RapidunError: ``M_kept`` is not 2-D, holds ±inf, or a row has no non-NaN entry.
    """
    t = _as_f64(M_kept, "kept influence view", 2)  # (N, Q)
    _check_no_inf(t, "kept influence view")
    nan = torch.isnan(t)  # (N, Q)
    n = (~nan).sum(dim=1)  # (N,) counted entries per row
    if (n == 0).any():
        rows = torch.nonzero(n == 0).flatten()[:5].tolist()
        raise RapidunError(
            f"no influence value left to aggregate for train sample(s) {rows} (a view with one test sample and "
            "self-pairs excluded?); include self-pairs or use more samples"
        )
    s = torch.sort(t.masked_fill(nan, math.inf), dim=1).values  # (N, Q); excluded entries sort last
    lo = ((n - 1) // 2).unsqueeze(1)  # (N, 1)
    hi = (n // 2).unsqueeze(1)  # (N, 1)
    return (s.gather(1, lo) + s.gather(1, hi)).squeeze(1) / 2  # (N, 1) -> (N,)


def fuse(
    FF: ArrayLike,
    FR: ArrayLike,
    RF: ArrayLike,
    RR: ArrayLike,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the aggregated views into one score per sample.

        S_forget = α·FF − β·FR        (N_f,)
        S_retain = γ·RR − δ·RF        (N_r,)

    A forget sample scores high when it helps the other forget samples (FF) more than the retain ones (FR);
    a retain sample when it helps the retain set (RR) more than the forget set (RF).

    Args:
        FF: Aggregated forget←forget ``(N_f,)``.
        FR: Aggregated forget←retain ``(N_f,)``.
        RF: Aggregated retain←forget ``(N_r,)``.
        RR: Aggregated retain←retain ``(N_r,)``.
        alpha: Weight of FF.
        beta: Weight of FR.
        gamma: Weight of RR.
        delta: Weight of RF.

    Returns:
        ``(S_forget, S_retain)``, float64 tensors ``(N_f,)`` and ``(N_r,)``.

    Raises:
        RapidunError: Not 1-D, or FF/FR (RR/RF) lengths differ.
    """
    ff, fr, rf, rr = (_as_f64(v, name, 1) for v, name in ((FF, "FF"), (FR, "FR"), (RF, "RF"), (RR, "RR")))
    if ff.shape != fr.shape:
        raise RapidunError(f"FF and FR must both have one value per forget sample, got {len(ff)} and {len(fr)}")
    if rr.shape != rf.shape:
        raise RapidunError(f"RR and RF must both have one value per retain sample, got {len(rr)} and {len(rf)}")
    return alpha * ff - beta * fr, gamma * rr - delta * rf


def robust_center_scale(S: ArrayLike, floor: float = 1e-3, method: str = "mad") -> tuple[float, float]:
    """Robust centre and scale of a score vector.

    ``c = median(S)``; scale ``σ = max(1.4826·median|S − c|, floor)`` for ``method="mad"`` and
    ``σ = max((Q₃ − Q₁)/1.349, floor)`` for ``"iqr"`` (quartiles by linear interpolation, ``numpy.quantile``'s
    default). Both are consistent estimates of the standard deviation for normal data.

    Args:
        S: Scores ``(N,)``, finite, N ≥ 1.
        floor: Lower bound of the scale, > 0.
        method: ``"mad"`` or ``"iqr"``.

    Returns:
        ``(c, σ)`` as Python floats.

    Raises:
        RapidunError: Empty or non-finite ``S``, ``floor ≤ 0``, or an unknown ``method``.
    """
    s = _as_f64(S, "scores", 1)
    if len(s) == 0:
        raise RapidunError("cannot scale an empty score vector")
    _check_finite(s, "scores")
    if not (isinstance(floor, int | float) and floor > 0 and math.isfinite(floor)):
        raise RapidunError(f"floor must be a positive number, got {floor!r}")
    if method not in SCALE_METHODS:
        raise RapidunError(f"unknown robust scale {method!r}; choose one of {', '.join(SCALE_METHODS)}")
    c = _quantile(s, 0.5)
    if method == "mad":
        spread = MAD_TO_SIGMA * _quantile((s - c).abs(), 0.5)
    else:
        spread = (_quantile(s, 0.75) - _quantile(s, 0.25)) / IQR_TO_SIGMA
    return float(c), max(float(spread), float(floor))


def robust_scale(S: ArrayLike, floor: float = 1e-3, method: str = "mad") -> torch.Tensor:
    """Robust z-scores, ``z = (S − c) / σ`` with ``(c, σ)`` from :func:`robust_center_scale`.

    MAD (default): ``z = (S − median S) / max(1.4826·MAD(S), floor)``, ``MAD(S) = median|S − median S|``.
    IQR: ``z = (S − median S) / max(IQR(S)/1.349, floor)``. Since ``σ ≥ floor > 0``, all-equal scores give
    ``z = 0`` exactly; a spread below the floor (e.g. most scores equal) saturates large ``|z|``.

    Args:
        S: Scores ``(N,)``.
        floor: Lower bound of the scale, > 0.
        method: ``"mad"`` or ``"iqr"``.

    Returns:
        Tensor ``(N,)`` float64.

    Raises:
        RapidunError: See :func:`robust_center_scale`.
    """
    c, sigma = robust_center_scale(S, floor, method)
    return (_as_f64(S, "scores", 1) - c) / sigma


def bounded_weights(
    z: ArrayLike, tau: float, w_min: float = 0.2, w_max: float = 3.0
) -> tuple[torch.Tensor, float, float]:
    """Bounded exponential weights and the fraction saturated at each bound.

        w = exp(clip(z/τ, ln w_min, ln w_max))          ∈ [w_min, w_max]
        low  = mean[ z/τ ≤ ln w_min ],   high = mean[ z/τ ≥ ln w_max ]

    Saturation is measured on ``z/τ`` before any normalisation; :func:`normalize_mean` then rescales ``w``, so
    the final weights may leave ``[w_min, w_max]``.

    Args:
        z: Robust z-scores ``(N,)``, finite.
        tau: Temperature, > 0 (larger = flatter weights).
        w_min: Lower bound, > 0.
        w_max: Upper bound, ≥ ``w_min``.

    Returns:
        ``(w, low, high)``: ``w`` float64 ``(N,)``; ``low``, ``high`` fractions in [0, 1] (0 for N = 0).

    Raises:
        RapidunError: Non-finite ``z``, ``tau ≤ 0``, or bounds not ``0 < w_min ≤ w_max``.
    """
    t = _as_f64(z, "z-scores", 1)
    _check_finite(t, "z-scores")
    if not (isinstance(tau, int | float) and tau > 0 and math.isfinite(tau)):
        raise RapidunError(f"tau must be a positive number, got {tau!r}")
    if not (0 < w_min <= w_max < math.inf):
        raise RapidunError(f"weight bounds must satisfy 0 < w_min <= w_max, got w_min={w_min!r}, w_max={w_max!r}")
    lo, hi = math.log(w_min), math.log(w_max)
    x = t / tau
    n = max(len(x), 1)
    low = float((x <= lo).sum()) / n
    high = float((x >= hi).sum()) / n
    return torch.exp(x.clamp(lo, hi)), low, high


def normalize_mean(w: ArrayLike) -> torch.Tensor:
    """Divide by the group mean, ``w / mean(w)``, so the weights average 1.

    Args:
        w: Positive weights ``(N,)``, N ≥ 1.

    Returns:
        Tensor ``(N,)`` float64 with mean 1.

    Raises:
        RapidunError: Empty, non-finite, or non-positive mean.
    """
    t = _as_f64(w, "weights", 1)
    if len(t) == 0:
        raise RapidunError("cannot normalise an empty weight vector")
    _check_finite(t, "weights")
    m = t.mean()
    if m <= 0:
        raise RapidunError(f"weights must have a positive mean, got {float(m)!r}")
    return t / m


def _check_views(FF: torch.Tensor, FR: torch.Tensor, RF: torch.Tensor, RR: torch.Tensor) -> None:
    nf, nr = FF.shape[0], RR.shape[0]
    want = {"FF": (nf, nf), "FR": (nf, nr), "RF": (nr, nf), "RR": (nr, nr)}
    got = {"FF": FF.shape, "FR": FR.shape, "RF": RF.shape, "RR": RR.shape}
    bad = [f"{k} {tuple(got[k])} (expected {want[k]})" for k in want if tuple(got[k]) != want[k]]
    if bad:
        raise RapidunError(
            "influence views have inconsistent shapes: "
            + "; ".join(bad)
            + f". Views are [train, test]: FF forget×forget, FR forget×retain, RF retain×forget, RR retain×retain "
            f"(N_f={nf} from FF rows, N_r={nr} from RR rows)"
        )


def rapidun_weights(
    FF: ArrayLike, FR: ArrayLike, RF: ArrayLike, RR: ArrayLike, cfg: WeightingConfig | None = None
) -> dict[str, Any]:
    """The whole RapidUn weighting chain (SPEC §2 steps 6–10) for the forget and retain groups.

    For each view ``V``: ``v = aggregate(topk_keep(V', top_k))`` with ``V' = mask_self(V, include_self)`` for FF
    and RR and ``V' = V`` for FR and RF; then
    ``S_f = α·ff − β·fr``, ``S_r = γ·rr − δ·rf``; ``z = robust_scale(S)``; ``w = exp(clip(z/τ, ln w_min,
    ln w_max))`` with ``τ = τ_forget`` or ``τ_retain``; ``w ← w / mean(w)`` per group.

    Args:
        FF: forget←forget ``(N_f, N_f)``, indexed ``[train, test]``.
        FR: forget←retain ``(N_f, N_r)`` (forget samples as train, retain as test).
        RF: retain←forget ``(N_r, N_f)``.
        RR: retain←retain ``(N_r, N_r)``.
        cfg: Settings; default :class:`WeightingConfig` ().

    Returns:
        Dict of float64 tensors and floats:

        * ``"FF"``, ``"FR"`` ``(N_f,)`` and ``"RF"``, ``"RR"`` ``(N_r,)`` — aggregated views;
        * ``"S_forget"``, ``"z_forget"``, ``"w_forget"`` ``(N_f,)``; ``"S_retain"``, ``"z_retain"``,
          ``"w_retain"`` ``(N_r,)`` — fused scores, z-scores, final weights (mean 1 per group);
        * ``"center_forget"``, ``"scale_forget"``, ``"center_retain"``, ``"scale_retain"`` — the robust
          centre and scale (after the floor) used for z;
        * ``"sat_low_forget"``, ``"sat_high_forget"``, ``"sat_low_retain"``, ``"sat_high_retain"`` — fraction of
          the group at ``w_min`` / ``w_max`` before the mean normalisation.

    Raises:
        RapidunError: Inconsistent view shapes or any invalid setting (see the step functions).
    """
    cfg = cfg or WeightingConfig()
    views = {name: _as_f64(v, name, 2) for name, v in (("FF", FF), ("FR", FR), ("RF", RF), ("RR", RR))}
    _check_views(views["FF"], views["FR"], views["RF"], views["RR"])
    out: dict[str, Any] = {}
    for name, v in views.items():
        m = mask_self(v, cfg.include_self) if name in ("FF", "RR") else v  # (N, Q)
        out[name] = aggregate(topk_keep(m, cfg.top_k))  # (N,)
    s_f, s_r = fuse(out["FF"], out["FR"], out["RF"], out["RR"], cfg.alpha, cfg.beta, cfg.gamma, cfg.delta)
    for group, s, tau in (("forget", s_f, cfg.tau_forget), ("retain", s_r, cfg.tau_retain)):
        c, sigma = robust_center_scale(s, cfg.floor, cfg.scale_method)
        z = (s - c) / sigma
        w, low, high = bounded_weights(z, tau, cfg.w_min, cfg.w_max)
        out |= {
            f"S_{group}": s,
            f"z_{group}": z,
            f"w_{group}": normalize_mean(w),
            f"center_{group}": c,
            f"scale_{group}": sigma,
            f"sat_low_{group}": low,
            f"sat_high_{group}": high,
        }
    return out


def coverage_scores(FF: ArrayLike, top_k: int = 40, include_self: bool = False) -> torch.Tensor:
    """Inverse coverage of each forget sample by the other forget samples (the ``coverage`` method).

    ``cov_j = median_i K[i, j]`` with ``K = topk_keep(mask_self(FF), top_k)``: how much the forget samples that
    influence test sample ``j`` most explain it. ``S_j = −cov_j``: a forget sample the others explain least
    scores highest — the inverse of RapidUn's emphasis, which favours samples that explain the others (rows).

    Args:
        FF: forget←forget view ``(N_f, N_f)``, indexed ``[train i, test j]``.
        top_k: entries kept per test sample.
        include_self: keep the diagonal.

    Returns:
        ``(N_f,)`` float64 scores.
    """
    K = topk_keep(mask_self(FF, include_self), top_k)  # (N_f, N_f) [train, test]
    return -aggregate(K.T)  # (N_f,) one value per test sample j


def coverage_weights(FF: ArrayLike, cfg: WeightingConfig | None = None) -> dict[str, Any]:
    """Forget weights from :func:`coverage_scores`: RobustScale, ``exp(clip(z/τ_forget))``, mean 1.

    Returns:
        ``{"S_forget", "z_forget", "w_forget"}`` ``(N_f,)`` float64 plus ``center_forget``, ``scale_forget``,
        ``sat_low_forget``, ``sat_high_forget`` (as :func:`rapidun_weights`).
    """
    cfg = cfg or WeightingConfig()
    s = coverage_scores(FF, cfg.top_k, cfg.include_self)
    c, sigma = robust_center_scale(s, cfg.floor, cfg.scale_method)
    z = (s - c) / sigma
    w, low, high = bounded_weights(z, cfg.tau_forget, cfg.w_min, cfg.w_max)
    return {
        "S_forget": s,
        "z_forget": z,
        "w_forget": normalize_mean(w),
        "center_forget": c,
        "scale_forget": sigma,
        "sat_low_forget": low,
        "sat_high_forget": high,
    }


def effective_sample_size(w: ArrayLike) -> float:
    """Kish's effective sample size as a fraction of N: ``(Σw)² / (N·Σw²)`` ∈ (0, 1]; 1 for equal weights."""
    t = _as_f64(w, "weights", 1)
    if len(t) == 0 or float((t * t).sum()) == 0.0:
        return float("nan")
    return float(t.sum() ** 2 / (len(t) * (t * t).sum()))
