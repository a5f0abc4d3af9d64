"""minillm: memory-efficient structured pruning of LLMs with forward-only gradients."""

__version__ = "0.1.0"
__all__ = ["load_pruned", "__version__"]


def __getattr__(name: str):
    if name == "load_pruned":  # lazy: importing minillm.kernels must not pull in transformers
        from minillm.model.io import load_pruned

        return load_pruned
    raise AttributeError(f"module 'minillm' has no attribute '{name}'")
