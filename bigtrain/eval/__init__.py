"""Evaluation: perplexity, generation, lm-evaluation-harness, plots."""
