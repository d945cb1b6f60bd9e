"""Per-sample gradients of each sample's mean answer-token loss w.r.t. a chosen parameter set.

Notation: B batch, T tokens, N rows per sample, A answer tokens in the batch, O/I a Linear's output/input size,
V vocabulary, H hidden size, D gradient length (total size of the selected parameters).

The loss of sample ``b`` is its mean shifted cross-entropy over answer tokens (:func:`rapidun.functional.
per_sample_ce`); its gradient ``g_b`` is flattened into one row of a (B, D) matrix, parameters in
:class:`ParamSet` order, each tensor row-major.

Two implementations give the same numbers (fp32 tolerance):

* :func:`per_sample_grads` — the fast one. One forward and one backward for the whole batch. Forward hooks on the
  modules that own the selected parameters capture each module's input ``x`` and register a tensor hook on its
  output that captures ``gout = ∂(Σ_b loss_b)/∂output``. Because sample ``b``'s output rows depend only on sample
  ``b``'s inputs (no batch norm in a causal LM) and ``Σ_b loss_b`` is backpropagated, ``gout[b]`` is exactly the
  gradient of ``loss_b``, so the per-sample weight gradients are outer products summed over tokens:
  Linear weight ``Σ_t gout[b,t,:] ⊗ x[b,t,:]`` (GPT-2's Conv1D, which stores the transpose: ``Σ_t x ⊗ gout``),
  Linear bias ``Σ_t gout[b,t,:]``, Embedding weight a per-sample
  scatter-add of ``gout`` rows at the input ids (a (B, V, H) buffer: B·V·H floats, e.g. 8×49152×576 ≈ 0.9 GB for
  SmolLM2 embeddings — use small batches there). Tied input/output embeddings are handled: the shared weight gets
  the embedding's scatter-add plus the LM head's outer products. Padding positions get zero ``gout`` (right
  padding, causal attention), so they add nothing. The model is put in eval mode for the call (dropout off) and
  its previous modes are restored; no ``.grad`` is accumulated anywhere.
* :func:`per_sample_grads_loop` — the obvious reference: per sample, a batch-size-1 forward/backward with
  ``torch.autograd.grad``. Slow; used by tests and benchmarks.

``normalize=True`` L2-normalises each parameter tensor's per-sample gradient separately before concatenation
(RapidIn's layer-wise normalisation); an all-zero block stays zero (no NaN).

LoRA note: a freshly attached adapter (:func:`rapidun.models.attach_lora`) has ``B = 0``, so ``grad(A) = 0`` and
only the ``lora_B`` blocks are non-zero: ``grad(B) = s · grad(W) · Aᵀ`` (``s`` the LoRA scaling) — the full weight
gradient seen through the random ``A``, i.e. a random low-rank projection of it. A trained adapter can be used
instead, in which case both ``A`` and ``B`` blocks carry signal.

Token-wise "hotwords" mode: :func:`restrict_labels` keeps only answer targets whose token id is in a given set;
samples left without answer tokens (:func:`has_answer` is False) get an all-zero gradient row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rapidun.data.template import Batch
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE, per_sample_ce, shift_labels

KINDS = ("lora", "regex", "embeddings")
SUPPORTED = "nn.Linear (weight, bias), GPT-2's Conv1D (weight, bias) and nn.Embedding (weight)"
NORM_EPS = 1e-12


@dataclass
class ParamSet:
    """The parameters whose per-sample gradients are taken, in the order of the flat gradient vector.

    Attributes:
        kind: how they were selected (``lora``, ``regex``, ``embeddings``).
        names: parameter names (as in ``model.named_parameters()``), same order as ``params``.
        params: the parameter tensors.
    """

    kind: str
    names: list[str]
    params: list[nn.Parameter]

    @property
    def sizes(self) -> list[int]:
        """Number of elements of each parameter tensor."""
        return [p.numel() for p in self.params]

    @property
    def dim(self) -> int:
        """D, the length of a flat per-sample gradient."""
        return sum(self.sizes)


def _owners(model: nn.Module, params: list[nn.Parameter], names: list[str]) -> list[list[tuple[nn.Module, str]]]:
    """For each parameter, the (module, attribute) pairs that hold it (two for tied embeddings).

    Raises:
        RapidunError: a parameter held by a module other than nn.Linear / nn.Embedding, or by none.
    """
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, mod, attr))
    out = []
    for name, p in zip(names, params, strict=True):
        found = holders.get(id(p), [])
        if not found:
            raise RapidunError(f"parameter {name} is not a parameter of this model")
        for mname, mod, attr in found:
            ok = (isinstance(mod, nn.Linear | Conv1D) and attr in ("weight", "bias")) or (
                isinstance(mod, nn.Embedding) and attr == "weight"
            )
            if not ok:
                raise RapidunError(
                    f"parameter {name} belongs to module {mname or '<root>'} of type {type(mod).__name__}; "
                    f"per-sample gradients support only {SUPPORTED} parameters — choose other parameters"
                )
            if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq):
                raise RapidunError(
                    f"parameter {name}: embedding {mname} uses max_norm or scale_grad_by_freq, "
                    "which per-sample gradients do not support"
                )
        out.append([(mod, attr) for _, mod, attr in found])
    return out


def select_params(model: nn.Module, kind: str, pattern: str | None = None) -> ParamSet:
    """Choose the parameters whose per-sample gradients are taken, and make them require grad.

    Args:
        model: a causal LM, plain or PEFT-wrapped.
        kind: ``"lora"`` — every parameter whose name contains ``lora_A`` or ``lora_B`` (the model must carry a PEFT
            adapter; ``pattern``, if given, further keeps names matching ``re.search(pattern, name)``);
            ``"regex"`` — parameters whose name matches ``re.search(pattern, name)``;
            ``"embeddings"`` — the input embedding weight (``pattern`` ignored).
        pattern: regular expression (required for ``regex``).

    Returns:
        The :class:`ParamSet`; other parameters' ``requires_grad`` flags are left as they are.

    Raises:
        RapidunError: unknown kind, nothing selected, bad pattern, or an unsupported module type.
    """
    if kind not in KINDS:
        raise RapidunError(f"unknown parameter kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    named = list(model.named_parameters())
    rx = None
    if pattern is not None and kind != "embeddings":
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise RapidunError(f"parameter pattern {pattern!r} is not a valid regular expression: {e}") from e
    if kind == "lora":
        chosen = [(n, p) for n, p in named if "lora_A" in n or "lora_B" in n]
        if not chosen:
            raise RapidunError(
                "parameter kind 'lora' needs a model with a PEFT LoRA adapter, and this one has none; "
                "attach one via rapidun.models.attach_lora (or load a trained adapter)"
            )
        if rx is not None:
            chosen = [(n, p) for n, p in chosen if rx.search(n)]
            if not chosen:
                lora_names = [n for n, _ in named if "lora_A" in n or "lora_B" in n]
                raise RapidunError(f"pattern {pattern!r} matches no LoRA parameter; candidates: {lora_names[:20]}")
    elif kind == "regex":
        if rx is None:
            raise RapidunError("parameter kind 'regex' needs a pattern")
        chosen = [(n, p) for n, p in named if rx.search(n)]
        if not chosen:
            raise RapidunError(
                f"pattern {pattern!r} matches no parameter name; candidates: {[n for n, _ in named][:20]}"
            )
    else:
        weight = model.get_input_embeddings().weight
        chosen = [(n, p) for n, p in named if p is weight]
    names = [n for n, _ in chosen]
    params = [p for _, p in chosen]
    _owners(model, params, names)
    for p in params:
        p.requires_grad_(True)
    return ParamSet(kind, names, params)


def has_answer(labels: torch.Tensor) -> torch.Tensor:
    """Which samples have at least one answer target (the first label never counts: nothing predicts it).

    Args:
        labels: (B, T), ``IGNORE`` where no loss is taken.

    Returns:
        (B,) bool.
    """
    return (shift_labels(labels) != IGNORE).any(1)


def restrict_labels(labels: torch.Tensor, hotword_ids: Collection[int]) -> torch.Tensor:
    """Token-wise "hotwords" mode: keep only answer labels whose token id is in ``hotword_ids``.

    ``labels[t]`` is the target predicted at position ``t-1`` (see :func:`rapidun.functional.shift_labels`), so
    keeping a label keeps exactly the loss term for predicting that hotword. Samples left with no answer tokens
    (check with :func:`has_answer`) get a zero loss and an all-zero gradient row.

    Args:
        labels: (B, T) with ``IGNORE`` on non-answer positions.
        hotword_ids: token ids to keep.

    Returns:
        (B, T) labels, ``IGNORE`` everywhere else.
    """
    ids = torch.tensor(sorted(set(hotword_ids)), dtype=labels.dtype, device=labels.device)  # (K,)
    keep = torch.isin(labels, ids) & (labels != IGNORE)  # (B, T)
    return torch.where(keep, labels, torch.full_like(labels, IGNORE))


def _rows_to_batch(t: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """Group answer rows (A, F) by sample into a zero-padded (B, N, F), N the most answer rows of a sample."""
    counts = torch.bincount(rows, minlength=B)  # (B,)
    starts = counts.cumsum(0) - counts  # (B,)
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]  # (A,) index within its sample
    out = t.new_zeros(B, int(counts.max()) if rows.numel() else 0, t.shape[-1])  # (B, N, F)
    out[rows, pos] = t
    return out


def _as_batched(t: torch.Tensor, rows: torch.Tensor, B: int, where: str) -> torch.Tensor:
    """A module's input/output as (B, N, F): (B, ..., F) is flattened, 2-D (A, F) answer rows are regrouped.

    The 2-D case is the LM head in :func:`rapidun.functional.per_sample_nll`, applied only to answer positions.
    """
    if t.dim() >= 3 and t.shape[0] == B:
        return t.reshape(B, -1, t.shape[-1])  # (B, N, F)
    if t.dim() == 2 and t.shape[0] == rows.numel():
        return _rows_to_batch(t, rows, B)  # (B, N, F)
    raise RapidunError(
        f"{where}: cannot tell which sample each row of a {tuple(t.shape)} tensor belongs to "
        f"(expected (B={B}, ..., F) or (A={rows.numel()} answer rows, F))"
    )


class _Capture:
    """Forward hook + output tensor hook of one module: stores its input and the gradient of its output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.x: torch.Tensor | None = None
        self.gout: torch.Tensor | None = None

    def forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            raise RapidunError(
                f"module {self.name} ran more than once in one forward pass (a module reused in several places, "
                "or gradient checkpointing recomputation); hook-based per-sample gradients need exactly one call "
                "— select other parameters or use per_sample_grads_loop"
            )
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RapidunError(f"module {self.name} produced an output without a gradient path (called under no_grad?)")
        self.x = args[0].detach()
        output.register_hook(self._grad_hook)

    def _grad_hook(self, g: torch.Tensor) -> None:
        self.gout = g.detach()


def _per_module(
    mod: nn.Module, attr: str, cap: _Capture, rows: torch.Tensor, B: int, numel: int, device: torch.device
) -> torch.Tensor:
    """(B, numel) per-sample gradient of ``mod.<attr>`` from the captured input / output gradient."""
    if cap.x is None or cap.gout is None:  # module unused, or no gradient reached it
        return torch.zeros(B, numel, dtype=torch.float32, device=device)
    g = _as_batched(cap.gout.float(), rows, B, cap.name)  # (B, N, O) or (B, N, H)
    if isinstance(mod, nn.Embedding):
        V, H = mod.weight.shape
        if cap.x.shape[0] != B:
            raise RapidunError(f"{cap.name}: expected token ids of shape (B={B}, ...), got {tuple(cap.x.shape)}")
        ids = cap.x.reshape(B, -1)  # (B, N)
        flat = torch.zeros(B * V, H, dtype=torch.float32, device=device)  # (B·V, H)
        offs = ids + torch.arange(B, device=ids.device)[:, None] * V  # (B, N) row of (sample, token) in flat
        flat.index_add_(0, offs.reshape(-1), g.reshape(-1, H))  # (B·N,) rows added from (B·N, H)
        per = flat.view(B, V, H)  # (B, V, H)
        if mod.padding_idx is not None:
            per[:, mod.padding_idx] = 0.0  # nn.Embedding never updates its padding row
        return per.reshape(B, V * H)  # (B, D_k)
    if attr == "bias":
        return g.sum(1)  # (B, O)
    x = _as_batched(cap.x.float(), rows, B, cap.name)  # (B, N, I)
    if isinstance(mod, Conv1D):  # y = x W + b with W of shape (I, O)
        return torch.einsum("bni,bno->bio", x, g).reshape(B, -1)  # (B, I, O) -> (B, I·O)
    return torch.einsum("bno,bni->boi", g, x).reshape(B, -1)  # (B, O, I) -> (B, O·I)


def _normalize(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2-normalise each (B, D_k) block per sample; all-zero rows stay zero."""
    return [b / b.norm(dim=1, keepdim=True).clamp_min(NORM_EPS) for b in blocks]


def _check_right_padded(batch: Batch) -> None:
    att = batch.attention_mask
    if (att[:, 1:] > att[:, :-1]).any():
        raise RapidunError(
            "per-sample gradients need a right-padded batch (rapidun.data.template.collate): with left padding "
            "the positions of real tokens would not start at 0"
        )


def _in_eval(model: nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` with every submodule in eval mode (dropout off), then restore each module's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            return fn()
    finally:
        for m, mode in modes:
            m.training = mode


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def per_sample_grads(model: nn.Module, batch: Batch, pset: ParamSet, normalize: bool = True) -> torch.Tensor:
    """Per-sample gradients for a whole batch with one forward and one backward (see module docstring).

    Args:
        model: a causal LM, plain or PEFT-wrapped; each selected module must run once per forward.
        batch: right-padded (B, T) tensors from :func:`rapidun.data.template.collate`.
        pset: the parameters (from :func:`select_params`).
        normalize: L2-normalise each parameter tensor's block per sample (RapidIn).

    Returns:
        (B, D) float32 on the model's device; row ``b`` is the gradient of sample ``b``'s mean answer-token loss.
    """
    _check_right_padded(batch)
    owners = _owners(model, pset.params, pset.names)
    for p in pset.params:
        p.requires_grad_(True)
    mod_names = {id(m): n for n, m in model.named_modules()}
    dev = _device(model)
    batch = batch.to(dev)
    B = batch.input_ids.shape[0]
    rows = torch.nonzero(shift_labels(batch.labels) != IGNORE, as_tuple=True)[0]  # (A,) sample of each answer row

    mods = {id(mod): mod for pairs in owners for mod, _ in pairs}  # each owning module once
    caps = {k: _Capture(mod_names.get(k, type(m).__name__)) for k, m in mods.items()}

    def run() -> torch.Tensor:
        handles = []
        try:
            for k, mod in mods.items():
                handles.append(mod.register_forward_hook(caps[k].forward_hook))
            losses = per_sample_ce(model, batch.input_ids, batch.attention_mask, batch.labels)  # (B,)
            if losses.requires_grad and pset.params:
                # Gradients w.r.t. the selected parameters only: nothing is accumulated into any .grad; the output
                # hooks fire on the way.
                torch.autograd.grad(losses.sum(), pset.params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        blocks = []
        for p, pairs in zip(pset.params, owners, strict=True):
            block = torch.zeros(B, p.numel(), dtype=torch.float32, device=dev)  # (B, D_k)
            for mod, attr in pairs:
                block = block + _per_module(mod, attr, caps[id(mod)], rows, B, p.numel(), dev)
            blocks.append(block)
        if normalize:
            blocks = _normalize(blocks)
        return torch.cat(blocks, 1) if blocks else torch.zeros(B, 0, device=dev)  # (B, D)

    return _in_eval(model, run)


def per_sample_grads_loop(model: nn.Module, batch: Batch, pset: ParamSet, normalize: bool = True) -> torch.Tensor:
    """Reference per-sample gradients: one batch-size-1 forward/backward per sample (padding stripped).

    Args and Returns: as :func:`per_sample_grads`.
    """
    _check_right_padded(batch)
    _owners(model, pset.params, pset.names)
    for p in pset.params:
        p.requires_grad_(True)
    dev = _device(model)
    batch = batch.to(dev)

    def run() -> torch.Tensor:
        out = []
        for b in range(batch.input_ids.shape[0]):
            keep = batch.attention_mask[b].bool()  # (T,)
            ids = batch.input_ids[b][keep][None]  # (1, L)
            labels = batch.labels[b][keep][None]  # (1, L)
            loss = per_sample_ce(model, ids, torch.ones_like(ids), labels).sum()
            grads = (
                torch.autograd.grad(loss, pset.params, allow_unused=True)
                if loss.requires_grad
                else [None] * len(pset.params)
            )
            blocks = [
                (torch.zeros(p.numel(), device=dev) if g is None else g.float().reshape(-1))[None]  # (1, D_k)
                for p, g in zip(pset.params, grads, strict=True)
            ]
            if normalize:
                blocks = _normalize(blocks)
            out.append(torch.cat(blocks, 1) if blocks else torch.zeros(1, 0, device=dev))  # (1, D)
        return torch.cat(out, 0)  # (B, D)

    return _in_eval(model, run)
