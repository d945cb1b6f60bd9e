"""Evaluation: the poison detector, batched greedy generation, perplexity, and the per-model metric set."""
