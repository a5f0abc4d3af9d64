"""minillm: structured pruning of LLMs that needs no more memory than inference.

``minillm.prune_model(model, tokenizer, ratio=..., calibration=...)`` prunes a transformers
model in memory; ``minillm.save_pruned`` / ``minillm.load_pruned`` write and read the result; the
``minillm`` command does the same from the shell (README).
"""

__version__ = "0.1.0"
__all__ = ["PruneConfig", "load_model", "load_pruned", "prune_model", "save_pruned", "__version__"]

# lazy: importing minillm.kernels or minillm.config must not pull in transformers
_EXPORTS = {
    "prune_model": "minillm.api",  # minillm.prune is the command's module
    "PruneConfig": "minillm.config",
    "load_model": "minillm.model.loading",
    "save_pruned": "minillm.model.io",
    "load_pruned": "minillm.model.io",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minillm' has no attribute '{name}'")
