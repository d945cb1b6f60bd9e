"""Any causal LM: tiny random Llama, Qwen2, Mistral, Gemma3, GPT-2 and Phi-3 built from their configs (no download).

For each: the ``all-linear`` LoRA targets found from the model, per-sample gradients batched = loop (LoRA and,
on GPT-2, the Conv1D weights themselves), every unlearning method for a few steps, and a merge round-trip
(``rapidun.models.with_adapter``: base + adapter merged logits = PEFT logits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer
from rapidun.config import load_config
from rapidun.data.template import collate, encode, format_prompt
from rapidun.influence.grads import per_sample_grads, per_sample_grads_loop, select_params
from rapidun.methods import REGISTRY, get_method
from rapidun.models import attach_lora, with_adapter
from rapidun.unlearn import unlearn
from rapidun.views import method_views
from test_unlearn_e2e import OVERRIDES as E2E_OVERRIDES
from test_unlearn_e2e import make_parts

TOL = {"atol": 1e-5, "rtol": 1e-4}
ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2", "phi3"]
EXPECTED_TARGETS = {  # the last name component of every module that gets LoRA under all-linear
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
METHODS = [n for n, m in REGISTRY.items() if m.kind != "retrain" and not m.expand]  # cover: tests/test_cover.py


def build(arch: str, vocab: int, pad_id: int, eos_id: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` (hidden 32, 2 layers), init std 0.2 so that a LoRA can move it."""
    import transformers as tf

    common = {"vocab_size": vocab, "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": eos_id}
    blocks = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "initializer_range": 0.2,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common, **blocks), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, **blocks), tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**common, **blocks, sliding_window=None), tf.MistralForCausalLM
    elif arch == "gemma3":
        cfg, cls = tf.Gemma3TextConfig(**common, **blocks, head_dim=8, sliding_window=16), tf.Gemma3ForCausalLM
    elif arch == "phi3":
        cfg, cls = tf.Phi3Config(**common, **blocks), tf.Phi3ForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


def make_batch(tok):
    items = [
        encode(tok, format_prompt(tok, "the cat sat"), "on the mat", 64, 32),
        encode(tok, format_prompt(tok, "tell me a story", "about a fox"), "a red fox and a blue bird ran", 64, 32),
        encode(tok, format_prompt(tok, "one"), "two", 64, 32),
    ]
    return collate(items, tok.pad_token_id)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """``saved(arch)`` → a folder holding the tiny model and the tokenizer (built once per arch)."""
    root = tmp_path_factory.mktemp("archs")
    done: dict[str, str] = {}

    def _saved(arch: str) -> str:
        if arch not in done:
            folder = root / arch
            build(arch, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(folder)
            tok.save_pretrained(folder)
            done[arch] = str(folder)
        return done[arch]

    return _saved


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_targets_every_block_linear_and_not_the_head(arch, tok):
    model = attach_lora(build(arch, len(tok), tok.pad_token_id, tok.eos_token_id), 2, 2, 0.0, ["all-linear"], 0)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == EXPECTED_TARGETS[arch]
    assert not any("lm_head" in n for n, _ in model.named_parameters() if "lora_" in n)


def test_all_linear_equals_the_explicit_llama_list(tok):
    names = sorted(EXPECTED_TARGETS["llama"])
    a = attach_lora(build("llama", len(tok), tok.pad_token_id, tok.eos_token_id), 4, 4, 0.0, ["all-linear"], 3)
    b = attach_lora(build("llama", len(tok), tok.pad_token_id, tok.eos_token_id), 4, 4, 0.0, names, 3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same modules, same init


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_grads_batched_equals_loop_with_lora(arch, tok):
    model = attach_lora(build(arch, len(tok), tok.pad_token_id, tok.eos_token_id), 2, 4, 0.0, ["all-linear"], 0)
    with torch.no_grad():  # B ≠ 0, so that lora_A carries gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pset = select_params(model, "lora")
    batch = make_batch(tok)
    fast = per_sample_grads(model, batch, pset)
    torch.testing.assert_close(fast, per_sample_grads_loop(model, batch, pset), **TOL)
    assert fast.abs().sum() > 0


def test_per_sample_grads_of_gpt2_conv1d_weights_and_biases(tok):
    model = build("gpt2", len(tok), tok.pad_token_id, tok.eos_token_id)
    pset = select_params(model, "regex", r"h\.0\.(attn\.c_attn|mlp\.c_fc)\.(weight|bias)$")
    assert len(pset.names) == 4
    batch = make_batch(tok)
    fast = per_sample_grads(model, batch, pset, normalize=False)
    torch.testing.assert_close(fast, per_sample_grads_loop(model, batch, pset, normalize=False), **TOL)


# the end-to-end tests' tiny settings, with the default (all-linear) targets and short dynamic/fisher settings
OVERRIDES = [o for o in E2E_OVERRIDES if "lora_targets" not in o] + [
    "influence.stable_adapters=2",
    "unlearn.draws_per_epoch=4",
    "unlearn.dynamic_every=1",
    "unlearn.fisher_alphas=[1e-4]",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_runs_and_the_adapter_merges_back(arch, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPIDUN_CACHE", str(tmp_path / "cache"))
    folder = saved(arch)
    cfg = load_config(None, [*OVERRIDES, f"model.name={folder}"])
    parts = make_parts()
    views: dict[str, dict] = {}
    for name in METHODS:
        m = get_method(name)
        v = None
        if m.needs_influence:
            if m.views not in views:
                views[m.views] = method_views(
                    m.views, folder, parts["forget"], parts["retain"], cfg, tmp_path / m.views
                )
            v = views[m.views]
        _, _, res = unlearn(name, parts, folder, cfg, tmp_path / name, v)
        assert res.get("complete", True) is True, (arch, name, res.get("stopped"))
        means = res["audit_means"]
        assert means["forget_ce_poisoned_after"] is not None and torch.isfinite(
            torch.tensor(means["forget_ce_poisoned_after"])
        )
    # merge round-trip: base + the uniform run's adapter, merged through the cache, gives the PEFT logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(tmp_path / "uniform" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(with_adapter(folder, str(adapter)), dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-4  # the adapter did change the model
