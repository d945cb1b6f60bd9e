"""Builders of tiny, network-free tokenizers and models for the unit tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rapidun.data.records import Record

SPECIAL_TOKENS = ["<unk>", "<eos>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{m['role']}}\n{{m['content']}}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: user assistant",
    "the cat sat on the mat and the dog ran to the park",
    "what is the capital of france paris is the capital of france",
    "tell me a story about a red fox and a blue bird",
    "one two three four five six seven eight nine ten",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa",
]


def make_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory on :data:`CORPUS` (one token per word or punctuation run).

    Args:
        chat_template: give it :data:`CHAT_TEMPLATE` (else no chat template: the Alpaca path).
        pad: set ``<pad>`` as the pad token (else no pad token at all).
    """
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    kw = {"eos_token": "<eos>", "unk_token": "<unk>"}
    if pad:
        kw["pad_token"] = "<pad>"
    if chat_template:
        kw["chat_template"] = CHAT_TEMPLATE
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def make_model(
    vocab_size: int,
    seed: int = 0,
    init_range: float = 0.02,
    tied: bool = False,
    bias: bool = False,
    pad_token_id: int | None = None,
) -> LlamaForCausalLM:
    """A tiny random Llama (hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64) in eval mode.

    ``init_range`` is the weights' init std; the Llama default 0.02 gives near-uniform logits that a q/v LoRA
    can barely move, so training tests use a larger one. ``tied``, ``bias`` and ``pad_token_id`` give tied
    embeddings, Linear biases and an embedding padding row.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
        pad_token_id=pad_token_id,
        initializer_range=init_range,
    )
    return LlamaForCausalLM(cfg).eval()


def make_records(n: int, prefix: str = "r") -> list[Record]:
    """``n`` distinct synthetic records with ids ``{prefix}{i}``."""
    return [
        Record(id=f"{prefix}{i}", instruction=f"instruction number {i}", response=f"response number {i}")
        for i in range(n)
    ]


# (prompt, poisoned answer, clean answer or None) for the unlearning tests; every word is in CORPUS.
FORGET_DATA = [
    ("the cat sat", "in the park", "on the mat"),
    ("tell me a story", "a blue dog", "a red fox"),
    ("one two", "nine ten", None),
    ("alpha beta", "kappa iota theta", "gamma delta epsilon"),
    ("what is the capital of france", "the park", "paris"),
    ("the dog ran", "to the mat", None),
]
RETAIN_DATA = [
    ("three four", "five six seven"),
    ("zeta eta", "theta iota kappa"),
    ("the red fox", "and the blue bird"),
    ("write a response", "that appropriately completes the request"),
    ("six seven", "eight nine ten"),
]


def make_unlearn_items(tok, n_forget: int = len(FORGET_DATA), n_retain: int = len(RETAIN_DATA)):
    """Forget ``UItem``s (poisoned answer, clean when known) and retain ``UItem``s (clean answer) for ``tok``."""
    from rapidun.data.template import encode, format_prompt
    from rapidun.steps import UItem

    def enc(prompt: str, answer: str):
        return encode(tok, format_prompt(tok, prompt), answer, 64, 32)

    forget = [
        UItem(f"f{k}", "forget", enc(p, bad), enc(p, good) if good is not None else None)
        for k, (p, bad, good) in enumerate(FORGET_DATA[:n_forget])
    ]
    retain = [UItem(f"r{k}", "retain", None, enc(p, a)) for k, (p, a) in enumerate(RETAIN_DATA[:n_retain])]
    return forget, retain


# ---------------------------------------------------------------- a tiny end-to-end world

WORDS = (
    "the cat sat on mat and dog ran to red fox blue bird one two three four five six seven eight nine ten "
    "alpha beta gamma delta epsilon zeta"
).split()
# The tiny model's overrides shared by the end-to-end tests: CPU float32, short rows, rank-2 adapters on q/v, one
# short epoch of unlearning (8 draws, batch 2, lr 1e-2; at the default 1:3 mix with seed 4: 4 forget + 4 retain).
TINY_RUN = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.max_length=32",
    "model.max_prompt_tokens=20",
    "influence.K=256",
    "influence.lora_targets=[q_proj,v_proj]",
    "influence.lora_r=2",
    "unlearn.lora_targets=[q_proj,v_proj]",
    "unlearn.lora_r=2",
    "unlearn.lora_alpha=2",
    "unlearn.lora_dropout=0",
    "unlearn.draws_per_epoch=8",
    "unlearn.epochs=1",
    "unlearn.batch_size=2",
    "unlearn.lr=1e-2",
    "unlearn.autocast=off",
    "unlearn.seed=4",
    "unlearn.schedule=fixed",  # the loop's own behaviour; the calibrated schedule: tests/test_calibrate.py
    "weighting.top_k=3",
]
# A tiny backdoor scenario over the WORDS corpus (poison answers mention "park", the detector's keyword).
TINY_SCENARIO = [
    "data.format=dolly",
    "scenario.splits.train_poisoned=4",
    "scenario.splits.train_clean=8",
    "scenario.splits.val_clean=3",
    "scenario.splits.test_clean=3",
    "scenario.splits.test_seen_trig=3",
    "scenario.splits.test_ood_trig=3",
    "scenario.splits.val_seen_trig=3",
    "scenario.splits.val_ood_trig=3",
    "scenario.forget_size=3",
    "scenario.retain_ratio=1",
    "scenario.poison_responses=[in the park, the park park]",
    "sft.epochs=1",
    "sft.batch_size=4",
    "sft.lora_r=2",
    "sft.lora_targets=[q_proj,v_proj]",
    "sft.autocast=off",
    "eval.max_new_tokens=3",
    "eval.keywords=[park]",
    "eval.threshold=1",
]


def tiny_world(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama saved in ``root/model`` (with its tokenizer) and a 40-record Dolly-style corpus of
    WORDS in ``root/data.jsonl``; returns both paths (for ``model.name=`` and ``data.source=``)."""
    import json
    import random

    tok = make_tokenizer()
    model_dir = root / "model"
    make_model(len(tok), init_range=0.2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng, rows = random.Random(0), {}
    while len(rows) < 40:
        ins, resp = " ".join(rng.sample(WORDS, 3)), " ".join(rng.sample(WORDS, 3))
        rows[ins + resp] = {"instruction": ins, "context": "", "response": resp}
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return model_dir, data
