"""C++ CPU operators (``minillm/csrc/minillm_ops.cpp``), compiled with ninja on first use.

``torch.utils.cpp_extension.load`` builds the extension once per machine into its cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). If the build fails (no compiler,
no ninja), :func:`available` returns False after ONE warning and the dispatcher uses the PyTorch
reference instead.

Transient memory of the dense perturbed linear: two chunks of at most ``2**20`` weights (4 MiB
each in float32) holding ``W_c + eps Z_c`` and ``W_c - eps Z_c`` for a block of output rows; the
products are written in place into ``y``. ``kind="cols"`` makes one scaled copy of ``x``
``[M, K]``; ``kind="rows"`` none.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from .noise import stream_key

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "minillm_ops.cpp"
KIND_CODES = {"dense": 0, "rows": 1, "cols": 2}


@functools.cache
def extension() -> ModuleType | None:
    """The compiled extension, or None (after one warning) when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="minillm_cpu_ops",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # any build failure means: use the reference
        warnings.warn(
            f"minillm: C++ CPU operators unavailable ({type(err).__name__}: {err}); "
            "using the PyTorch reference",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def available() -> bool:
    """Whether the C++ operators compiled (builds them on first call)."""
    return extension() is not None


def _ext() -> ModuleType:
    ext = extension()
    if ext is None:
        raise RuntimeError("MINILLM_BACKEND=cpp but the C++ operators failed to build")
    return ext


def noise_cpp(
    seed: int,
    tensor_id: int,
    rows: int,
    cols: int,
    dist: str = "rademacher",
    row_start: int = 0,
    col_start: int = 0,
) -> torch.Tensor:
    """C++ twin of :func:`minillm.kernels.noise.noise`: ``[rows, cols]`` float32 on CPU."""
    return _ext().noise(
        stream_key(seed, tensor_id), rows, cols, row_start, col_start, dist == "gaussian"
    )


def perturbed_linear_cpp(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int,
    tensor_id: int,
    eps: float,
    dist: str = "rademacher",
    kind: str = "dense",
    stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """C++ perturbed linear; same contract as ``reference.perturbed_linear_ref``."""
    y, sum_sq, sum_ = _ext().perturbed_linear(
        x,
        weight,
        bias,
        stream_key(seed, tensor_id),
        float(eps),
        dist == "gaussian",
        KIND_CODES[kind],
        stats,
    )
    return (y, sum_sq, sum_) if stats else (y, None, None)


def fms_scores_cpp(
    weight: torch.Tensor,
    x_norm: torch.Tensor,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    tensor_id: int,
    dist: str = "rademacher",
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ FMS reduction; same contract as ``reference.fms_scores_ref``."""
    keys = [stream_key(s, tensor_id) for s in seeds]
    rows, cols = _ext().fms_scores(
        weight, x_norm, keys, [float(c) for c in coeffs], dist == "gaussian"
    )
    return rows, cols
