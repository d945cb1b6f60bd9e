"""rapidun: influence-driven unlearning (RapidUn) for fine-tuned causal language models."""

__version__ = "0.1.0"
