"""The ``--dtype`` names every command accepts and their ``torch.dtype``."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``torch.dtype`` for ``name``; ValueError naming the valid choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"--dtype: unsupported dtype '{name}'; valid: {', '.join(DTYPES)}")
    return DTYPES[name]
