"""Evaluation: perplexity, zero-shot tasks through lm-eval, generation samples and speed."""
