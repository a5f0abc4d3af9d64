"""minillm: memory-efficient structured pruning of LLMs with forward-only gradients."""

__version__ = "0.1.0"
