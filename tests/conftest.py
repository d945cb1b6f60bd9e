"""Shared fixtures: tiny tokenizers and a tiny Llama, all built in memory (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import make_model, make_tokenizer

# Tiny models: intra-op threads only add synchronisation cost (x100 slower on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture
def tiny_tok():
    """Tokenizer with a chat template and a pad token."""
    return make_tokenizer(chat_template=True, pad=True)


@pytest.fixture
def tiny_tok_plain():
    """Tokenizer without a chat template (Alpaca prompts), with a pad token."""
    return make_tokenizer(chat_template=False, pad=True)


@pytest.fixture
def tiny_tok_nopad():
    """Tokenizer with a chat template but no pad token."""
    return make_tokenizer(chat_template=True, pad=False)


@pytest.fixture
def tiny_model(tiny_tok):
    """Tiny random Llama whose vocabulary matches ``tiny_tok`` (seed 0)."""
    return make_model(len(tiny_tok))
