"""One unlearning step's inputs and losses: the samples (:class:`UItem`), the run's draws (:func:`draw_schedule`)
and the per-sample losses of a step from one forward pass (:func:`step_losses`), used by the loop of
:mod:`rapidun.train` and by the robust steps it drives (:mod:`rapidun.methods.robust`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rapidun.config import UnlearnConfig
from rapidun.data.template import Encoded, collate
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE, per_sample_nll
from rapidun.methods import losses


@dataclass
class UItem:
    """One unlearning sample. Forget samples have ``poisoned`` and, when known, ``clean``; retain only ``clean``."""

    id: str
    group: str  # "forget" | "retain"
    poisoned: Encoded | None
    clean: Encoded | None


def draw_schedule(
    n_forget: int,
    n_retain: int,
    cfg: UnlearnConfig,
    use_retain: bool,
    p_forget: torch.Tensor | None = None,
    p_retain: torch.Tensor | None = None,
) -> list[tuple[str, int]]:
    """The whole run's draws, ``epochs × draws_per_epoch`` pairs ``(group, index)``, seeded by ``cfg.seed``.

    Each draw is a forget sample with probability ``mix_forget / (mix_forget + mix_retain)`` (1 without retain
    samples), then an index within its group: uniform, or ``P(i) = p[i]`` when ``p_forget``/``p_retain`` is given
    (importance sampling). Sampling with replacement at the configured mix, the same on every rank.
    """
    if n_forget == 0:
        raise RapidunError("unlearning needs at least one forget sample")
    if cfg.draws_per_epoch <= 0 or cfg.epochs <= 0:
        raise RapidunError(f"unlearn.draws_per_epoch ({cfg.draws_per_epoch}) and epochs ({cfg.epochs}) must be > 0")
    if cfg.mix_forget <= 0 or cfg.mix_retain < 0:
        raise RapidunError(
            f"unlearn.mix_forget must be > 0 and mix_retain >= 0 (got {cfg.mix_forget}, {cfg.mix_retain})"
        )
    total = cfg.epochs * cfg.draws_per_epoch
    q_forget = 1.0 if not use_retain or n_retain == 0 else cfg.mix_forget / (cfg.mix_forget + cfg.mix_retain)
    gen = torch.Generator().manual_seed(cfg.seed)
    is_forget = (torch.rand(total, generator=gen) < q_forget).tolist()
    fi = _indices(n_forget, total, gen, p_forget, "p_forget")
    ri = _indices(max(n_retain, 1), total, gen, p_retain if n_retain else None, "p_retain")
    return [("forget", f) if flag else ("retain", r) for flag, f, r in zip(is_forget, fi, ri, strict=True)]


def _indices(n: int, total: int, gen: torch.Generator, p: torch.Tensor | None, name: str) -> list[int]:
    """``total`` indices in ``[0, n)``: uniform, or drawn with probabilities ``p`` (n,) (with replacement)."""
    if p is None:
        return torch.randint(n, (total,), generator=gen).tolist()
    p = torch.as_tensor(p, dtype=torch.float64)
    if p.shape != (n,) or not torch.isfinite(p).all() or (p < 0).any() or float(p.sum()) <= 0:
        raise RapidunError(f"{name} must be {n} finite non-negative probabilities with a positive sum")
    return torch.multinomial(p / p.sum(), total, replacement=True, generator=gen).tolist()


def row_stats(model: Any, rows: list[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over ``rows``: ``(ce (R,), logp (R,))`` — mean answer-token CE and summed log-probability."""
    batch = collate(rows, pad_id).to(device)
    nll_sum, n = per_sample_nll(model, batch.input_ids, batch.attention_mask, batch.labels)  # (R,), (R,)
    return nll_sum / n.clamp_min(1), -nll_sum


@torch.no_grad()
def eval_ce(model: Any, rows: list[Encoded], pad_id: int, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """(R,) mean answer-token CE of each row, without gradient (model put in eval mode and left there).

    Rows are batched in length order (little padding); the result is in the input order.
    """
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    out = torch.zeros(len(rows))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        out[idx] = row_stats(model, [rows[i] for i in idx], pad_id, device)[0].float().cpu()
    return out


def answer_tokens(rows: list[Encoded]) -> torch.Tensor:
    """(R,) float64: each row's number of scored answer tokens (labels after the first that are not ignored), the
    weights that turn per-row mean CEs into the token-weighted mean of :func:`token_weighted`."""
    return torch.tensor([sum(x != IGNORE for x in e.labels[1:]) for e in rows], dtype=torch.float64)


def token_weighted(ce: torch.Tensor, n: torch.Tensor) -> float:
    """The token-weighted mean CE ``Σ_i n_i·ce_i / Σ_i n_i`` of per-row mean CEs ``ce`` (R,) over ``n`` (R,) answer
    tokens: ``Σ NLL / Σ tokens`` over all the rows, so ``exp`` of it is their perplexity
    (:func:`rapidun.eval.metrics.perplexity`)."""
    n = n.to(torch.float64)
    return float((ce.to(torch.float64) * n).sum() / n.sum().clamp_min(1))


def ratio_of(ce_before: float, ce_after: float) -> float:
    """The perplexity ratio ``exp(ce_after − ce_before)``; ``inf`` where it overflows or is not a number (a destroyed
    model), as :func:`rapidun.eval.metrics.perplexity`."""
    d = ce_after - ce_before
    return math.exp(d) if d < 709.0 else math.inf  # NaN compares False: inf


def step_losses(
    model: Any,
    draws: list[tuple[str, int]],
    forget: list[UItem],
    retain: list[UItem],
    forget_loss: str,
    cfg: UnlearnConfig,
    pad_id: int,
    device: torch.device,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """(B,) per-sample losses of ``draws`` from ONE forward pass over all the rows they need.

    Returns ``(losses (B,), rows, tokens)``: the losses and the size of the forward pass.

    A forget draw needs its poisoned row, plus its clean row for ``relabel_ascent`` (when it has one and
    ``descent_beta`` ≠ 0); a retain draw needs its clean row. Losses follow :mod:`rapidun.methods.losses`:
    ``relabel_ascent``, ``ascent``, ``npo`` (needs ``ref_logp`` (N_f,)) and ``simnpo`` on the answer CE, retain
    draws the clean CE; ``rmu`` on the hidden states of layer ``cfg.rmu_layer`` instead, forget and retain draws
    alike (:func:`rmu_losses`: the same one pass over the rows, plus one no-grad pass of the start model over the
    retain rows).
    """
    rows: list[Encoded] = []
    f_pos, f_idx, f_rp, f_rc, f_has, r_pos, r_rc = [], [], [], [], [], [], []
    for pos, (group, i) in enumerate(draws):
        if group == "forget":
            it = forget[i]
            f_pos.append(pos)
            f_idx.append(i)
            f_rp.append(len(rows))
            rows.append(it.poisoned)
            want_clean = forget_loss == "relabel_ascent" and it.clean is not None and cfg.descent_beta != 0
            f_has.append(want_clean)
            if want_clean:
                f_rc.append(len(rows))
                rows.append(it.clean)
            else:
                f_rc.append(f_rp[-1])  # placeholder index, masked by f_has
        else:
            r_pos.append(pos)
            r_rc.append(len(rows))
            rows.append(retain[i].clean)
    n_tokens = sum(len(e.input_ids) for e in rows)
    if forget_loss == "rmu":
        return rmu_losses(model, rows, f_pos, f_rp, r_pos, r_rc, len(draws), cfg, pad_id, device), len(rows), n_tokens
    ce, logp = row_stats(model, rows, pad_id, device)  # (R,), (R,)
    out = torch.zeros(len(draws), dtype=ce.dtype, device=ce.device)  # (B,)
    if f_pos:
        rp = torch.tensor(f_rp, device=ce.device)
        if forget_loss == "relabel_ascent":
            has = torch.tensor(f_has, device=ce.device)
            lf = losses.relabel_ascent(
                ce[torch.tensor(f_rc, device=ce.device)], ce[rp], has, cfg.ascent_alpha, cfg.descent_beta
            )
        elif forget_loss == "ascent":
            lf = losses.ascent(ce[rp])
        elif forget_loss == "npo":
            if ref_logp is None:
                raise RapidunError("npo needs the reference log-probabilities of the forget samples")
            lf = losses.npo(logp[rp], ref_logp.to(ce.device)[torch.tensor(f_idx, device=ce.device)], cfg.npo_beta)
        elif forget_loss == "simnpo":
            lf = losses.simnpo(ce[rp], cfg.simnpo_beta, cfg.simnpo_gamma)
        else:
            raise RapidunError(f"unknown forget loss {forget_loss!r}")
        out = out.index_put((torch.tensor(f_pos, device=ce.device),), lf)
    if r_pos:
        lr_ = losses.retain_ce(ce[torch.tensor(r_rc, device=ce.device)])
        out = out.index_put((torch.tensor(r_pos, device=ce.device),), lr_)
    return out, len(rows), n_tokens


def layer_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, T, d) hidden states of decoder layer ``layer`` (HF's ``hidden_states[layer]``: 0 = the embeddings, L = the
    output of the L-th decoder layer; the last one is after the final norm, as HF returns it).

    Runs the decoder only (no LM head), adapter included unless the caller disabled it.

    Raises:
        RapidunError: ``layer`` is not in 1..(the model's number of decoder layers), naming ``unlearn.rmu_layer``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_layers = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    if isinstance(n_layers, int) and not 1 <= layer <= n_layers:
        raise RapidunError(_layer_message(layer, n_layers))
    hs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    if not 1 <= layer < len(hs):
        raise RapidunError(_layer_message(layer, len(hs) - 1))
    return hs[layer]


def _layer_message(layer: int, n_layers: int) -> str:
    return (
        f"unlearn.rmu_layer = {layer}: the model has {n_layers} decoder layers; choose a layer in 1..{n_layers} "
        "(hidden_states[L], 0 = embeddings)"
    )


def rmu_losses(
    model: Any,
    rows: list[Encoded],
    f_pos: list[int],
    f_rows: list[int],
    r_pos: list[int],
    r_rows: list[int],
    n_draws: int,
    cfg: UnlearnConfig,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """(B,) RMU per-sample losses (Li et al. 2024, WMDP) of one step's rows, from layer ``L = cfg.rmu_layer``.

    Forget draws: ``ℓ = (1/|A|) Σ_{t∈A} ‖h_L(x)_t − c·u‖² / d`` (:func:`losses.rmu_forget`, ``c = cfg.rmu_steer``,
    ``u = losses.rmu_direction(cfg.seed, d)``); retain draws: ``ℓ = α·(1/|A|) Σ_{t∈A} ‖h_L(x)_t − h_L^0(x)_t‖² / d``
    (:func:`losses.rmu_retain`, ``α = cfg.rmu_alpha``, ``h^0`` the start model: the adapter disabled). ``A`` is the
    positions whose input token is an answer token (``labels != IGNORE``; labels are aligned with the inputs).

    One pass with gradient over all ``rows`` and one no-grad pass with the adapter disabled over the retain rows
    only (sliced from the same padded batch), both in the caller's autocast and train/eval mode, so the retain loss
    is 0 at a fresh adapter (B = 0) — exactly, where the kernels' results do not depend on the batch size.

    Args:
        model: the PEFT model being trained (``disable_adapter`` is needed when there are retain rows).
        rows: the step's rows (R).
        f_pos: draw position of each forget draw; f_rows: its row index. r_pos, r_rows: the same for retain draws.
        n_draws: B. cfg: the ``unlearn`` settings. pad_id: tokenizer pad id. device: where the model is.

    Returns:
        (B,) float32 per-sample losses.
    """
    batch = collate(rows, pad_id).to(device)
    hidden = layer_hidden(model, batch.input_ids, batch.attention_mask, cfg.rmu_layer)  # (R, T, d)
    mask = batch.labels != IGNORE  # (R, T) answer-token positions
    out = torch.zeros(n_draws, dtype=torch.float32, device=hidden.device)  # (B,)
    if f_pos:
        fr = torch.tensor(f_rows, device=hidden.device)
        u = losses.rmu_direction(cfg.seed, hidden.shape[-1])  # (d,)
        lf = losses.rmu_forget(hidden[fr], mask[fr], u, cfg.rmu_steer)  # (F,)
        out = out.index_put((torch.tensor(f_pos, device=hidden.device),), lf)
    if r_pos:
        if not hasattr(model, "disable_adapter"):
            raise RapidunError("rmu: the retain loss needs the start model's states; attach the unlearning adapter")
        rr = torch.tensor(r_rows, device=hidden.device)
        with torch.no_grad(), model.disable_adapter():  # the retain rows of the same padded batch
            frozen = layer_hidden(model, batch.input_ids[rr], batch.attention_mask[rr], cfg.rmu_layer)  # (N_r, T, d)
        lr_ = losses.rmu_retain(hidden[rr], frozen, mask[rr], cfg.rmu_alpha)  # (N_r,)
        out = out.index_put((torch.tensor(r_pos, device=hidden.device),), lr_)
    return out
