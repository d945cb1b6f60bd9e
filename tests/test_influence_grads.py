"""Per-sample gradients: one batched forward/backward with hooks equals a batch-size-1 autograd loop."""

from __future__ import annotations

import pytest
import torch

from helpers import make_model
from rapidun.data.template import Batch, collate, encode, format_prompt
from rapidun.errors import RapidunError
from rapidun.functional import IGNORE
from rapidun.influence.grads import (
    ParamSet,
    has_answer,
    per_sample_grads,
    per_sample_grads_loop,
    restrict_labels,
    select_params,
)
from rapidun.models import attach_lora

TOL = {"atol": 1e-5, "rtol": 1e-4}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"], "seed": 0}


def tiny_llama(vocab, tied=False, bias=False, pad_token_id=None, seed=0):
    """helpers.make_model with a training-sized init (0.2)."""
    return make_model(vocab, seed=seed, init_range=0.2, tied=tied, bias=bias, pad_token_id=pad_token_id)


def make_batch(tok):
    """Four right-padded samples of different lengths (padding is exercised)."""
    items = [
        encode(tok, format_prompt(tok, "the cat sat"), "on the mat", 64, 32),
        encode(tok, format_prompt(tok, "tell me a story", "about a fox"), "a red fox and a blue bird ran", 64, 32),
        encode(tok, format_prompt(tok, "one"), "two", 64, 32),
        encode(tok, format_prompt(tok, "what is the capital"), "the cat sat on the mat and the dog ran", 64, 32),
    ]
    batch = collate(items, tok.pad_token_id)
    assert len({len(e.input_ids) for e in items}) == 4 and (batch.attention_mask == 0).any()
    return batch


def check_equal(model, batch, pset, normalize):
    fast = per_sample_grads(model, batch, pset, normalize=normalize)
    slow = per_sample_grads_loop(model, batch, pset, normalize=normalize)
    assert fast.shape == (batch.input_ids.shape[0], pset.dim) and fast.dtype == torch.float32
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, **TOL)
    return fast


def blocks(g, pset):
    """name -> (B, D_k) block of the flat gradient."""
    return dict(zip(pset.names, torch.split(g, pset.sizes, dim=1), strict=True))


def lora_model(tok, randomize_b=True):
    model = attach_lora(make_model(len(tok), init_range=0.2), **LORA)
    if randomize_b:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("normalize", [False, True])
def test_lora_batched_equals_loop(tiny_tok, normalize):
    model = lora_model(tiny_tok)
    pset = select_params(model, "lora")
    assert pset.kind == "lora" and len(pset.names) == 2 * 3 * 2  # A and B for 3 targets in 2 layers
    assert all("lora_A" in n or "lora_B" in n for n in pset.names)
    g = check_equal(model, make_batch(tiny_tok), pset, normalize)
    for name, blk in blocks(g, pset).items():
        assert blk.abs().max() > 1e-4, name  # with B ≠ 0 both A and B carry gradient
        if normalize:
            torch.testing.assert_close(blk.norm(dim=1), torch.ones(blk.shape[0]))


def test_fresh_lora_a_grads_zero_no_nan(tiny_tok):
    model = lora_model(tiny_tok, randomize_b=False)
    pset = select_params(model, "lora")
    for normalize in (False, True):
        g = check_equal(model, make_batch(tiny_tok), pset, normalize)
        for name, blk in blocks(g, pset).items():
            if "lora_A" in name:
                assert (blk == 0).all(), name  # B = 0 ⇒ grad(A) = 0, and normalisation keeps it 0 (no NaN)
            else:
                assert blk.abs().max() > 0, name


def test_lora_pattern_narrows(tiny_tok):
    model = lora_model(tiny_tok)
    pset = select_params(model, "lora", pattern=r"layers\.1\..*lora_B")
    assert pset.names and all("layers.1." in n and "lora_B" in n for n in pset.names)
    check_equal(model, make_batch(tiny_tok), pset, True)


@pytest.mark.parametrize("normalize", [False, True])
def test_regex_weights_and_biases(tiny_tok, normalize):
    model = tiny_llama(len(tiny_tok), bias=True)
    pset = select_params(model, "regex", r"layers\.0\.(mlp\.(up|down)_proj|self_attn\.q_proj)\.(weight|bias)")
    assert len(pset.names) == 6 and any(n.endswith("bias") for n in pset.names)
    order = [n for n, _ in model.named_parameters() if n in pset.names]
    assert pset.names == order
    assert pset.dim == sum(p.numel() for p in pset.params) == sum(pset.sizes)
    g = check_equal(model, make_batch(tiny_tok), pset, normalize)
    assert g.abs().max() > 1e-3


def test_lm_head_answer_rows(tiny_tok):
    """The LM head only sees answer positions (A, H) in per_sample_nll: rows are regrouped by sample."""
    model = make_model(len(tiny_tok), init_range=0.2)
    pset = select_params(model, "regex", r"^lm_head\.weight$")
    for normalize in (False, True):
        check_equal(model, make_batch(tiny_tok), pset, normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_embeddings_untied_with_padding_idx(tiny_tok, normalize):
    model = tiny_llama(len(tiny_tok), pad_token_id=tiny_tok.pad_token_id)
    assert model.model.embed_tokens.padding_idx == tiny_tok.pad_token_id
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    pset = select_params(model, "embeddings")
    assert pset.params == [model.get_input_embeddings().weight]
    batch = make_batch(tiny_tok)
    batch.input_ids[0, 2] = tiny_tok.pad_token_id  # a pad id inside a real prompt: its row must still get no grad
    g = check_equal(model, batch, pset, normalize)
    per = g.view(batch.input_ids.shape[0], *model.get_input_embeddings().weight.shape)  # (B, V, H)
    assert (per[:, tiny_tok.pad_token_id] == 0).all()
    unused = torch.ones(per.shape[1], dtype=torch.bool)
    unused[batch.input_ids.unique()] = False
    assert (per[:, unused] == 0).all()  # untied: only rows of tokens that appear in the batch


@pytest.mark.parametrize("normalize", [False, True])
def test_embeddings_tied(tiny_tok, normalize):
    model = tiny_llama(len(tiny_tok), tied=True, pad_token_id=tiny_tok.pad_token_id)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pset = select_params(model, "embeddings")
    assert len(pset.params) == 1
    g = check_equal(model, make_batch(tiny_tok), pset, normalize)
    per = g.view(g.shape[0], *pset.params[0].shape)  # (B, V, H)
    assert (per[:, tiny_tok.pad_token_id] != 0).any()  # the LM head path reaches the padding row


def test_restrict_labels_and_has_answer():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7], [IGNORE, IGNORE, 8, 9, IGNORE], [5, IGNORE, 6, IGNORE, IGNORE]])
    out = restrict_labels(labels, {5, 7, IGNORE})
    assert out.tolist() == [
        [IGNORE, IGNORE, 5, IGNORE, 7],
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
        [5, IGNORE, IGNORE, IGNORE, IGNORE],
    ]
    assert has_answer(labels).tolist() == [True, True, True]
    assert has_answer(out).tolist() == [True, False, False]  # the first label is never a target


@pytest.mark.parametrize("normalize", [False, True])
def test_hotwords_equal_loop_and_zero_rows(tiny_tok, normalize):
    model = lora_model(tiny_tok)
    pset = select_params(model, "lora")
    batch = make_batch(tiny_tok)
    hot = {tiny_tok.convert_tokens_to_ids(w) for w in ("the", "fox")}
    labels = restrict_labels(batch.labels, hot)
    kept = labels[labels != IGNORE]
    assert kept.numel() and all(int(t) in hot for t in kept)
    restricted = Batch(batch.input_ids, batch.attention_mask, labels)
    assert has_answer(restricted.labels).tolist() == [True, True, False, True]  # sample 2 ("two") has no hotword
    g = check_equal(model, restricted, pset, normalize)
    assert (g[2] == 0).all()
    assert (g[[0, 1, 3]].abs().sum(1) > 0).all()
    full = per_sample_grads(model, batch, pset, normalize=normalize)
    assert not torch.allclose(full[0], g[0])  # restriction changes the gradient


def test_mode_restored_and_no_grad_accumulated(tiny_tok):
    model = lora_model(tiny_tok)
    pset = select_params(model, "lora")
    model.train()
    frozen = model.get_base_model().model.layers[0].mlp
    frozen.eval()  # a submodule in its own mode stays in it
    batch = make_batch(tiny_tok)
    modes = [m.training for m in model.modules()]
    a = per_sample_grads(model, batch, pset)
    assert [m.training for m in model.modules()] == modes
    b = per_sample_grads(model, batch, pset)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # dropout 0.1 is off during the call
    assert model.training and not frozen.training
    assert all(p.grad is None for p in model.parameters())
    per_sample_grads_loop(model, batch, pset)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_select_sets_requires_grad(tiny_tok):
    model = make_model(len(tiny_tok))
    for p in model.parameters():
        p.requires_grad_(False)
    pset = select_params(model, "regex", r"layers\.1\.self_attn\.o_proj\.weight")
    assert [p.requires_grad for p in pset.params] == [True]
    assert sum(p.requires_grad for p in model.parameters()) == 1
    check_equal(model, make_batch(tiny_tok), pset, True)


def test_regex_no_match_lists_candidates(tiny_tok):
    model = make_model(len(tiny_tok))
    with pytest.raises(RapidunError, match="matches no parameter") as ei:
        select_params(model, "regex", r"nonexistent_weight")
    assert "model.embed_tokens.weight" in str(ei.value)
    with pytest.raises(RapidunError, match="needs a pattern"):
        select_params(model, "regex")
    with pytest.raises(RapidunError, match="not a valid regular expression"):
        select_params(model, "regex", "(")


def test_unknown_kind(tiny_tok):
    with pytest.raises(RapidunError, match="unknown parameter kind 'attention'") as ei:
        select_params(make_model(len(tiny_tok)), "attention")
    assert all(k in str(ei.value) for k in ("lora", "regex", "embeddings"))


def test_lora_without_adapter(tiny_tok):
    with pytest.raises(RapidunError, match=r"rapidun\.models\.attach_lora"):
        select_params(make_model(len(tiny_tok)), "lora")


def test_unsupported_module(tiny_tok):
    model = make_model(len(tiny_tok))
    with pytest.raises(RapidunError, match="LlamaRMSNorm") as ei:
        select_params(model, "regex", r"norm")
    assert "input_layernorm.weight" in str(ei.value) and "nn.Linear" in str(ei.value)
    bad = ParamSet("regex", ["model.norm.weight"], [model.model.norm.weight])  # hand-built sets are checked too
    with pytest.raises(RapidunError, match=r"nn\.Embedding"):
        per_sample_grads(model, make_batch(tiny_tok), bad)


def test_module_called_twice_is_an_error(tiny_tok):
    model = make_model(len(tiny_tok))
    model.model.layers[1].mlp.down_proj = model.model.layers[0].mlp.down_proj  # one Linear used in two layers
    pset = select_params(model, "regex", r"layers\.0\.mlp\.down_proj\.weight")
    model.train()
    with pytest.raises(RapidunError, match="more than once"):
        per_sample_grads(model, make_batch(tiny_tok), pset)
    assert model.training  # restored after the error, hooks removed
    assert not model.model.layers[0].mlp.down_proj._forward_hooks
    assert per_sample_grads_loop(model, make_batch(tiny_tok), pset).shape == (4, pset.dim)


def test_left_padding_is_an_error(tiny_tok):
    model = make_model(len(tiny_tok))
    pset = select_params(model, "embeddings")
    b = make_batch(tiny_tok)
    left = Batch(b.input_ids.flip(1), b.attention_mask.flip(1), b.labels.flip(1))
    with pytest.raises(RapidunError, match="right-padded"):
        per_sample_grads(model, left, pset)
