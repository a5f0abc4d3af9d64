"""One entry point per fused operator, dispatched by device.

CUDA tensors go to the Triton kernels, CPU tensors to the C++ operators, anything else to the
PyTorch reference. ``MINILLM_BACKEND={triton,cpp,reference}`` forces one backend (tests force
``triton`` on CPU under ``TRITON_INTERPRET=1``). Callers never branch on the device.

All operators are forward-only (no autograd): they serve the scoring passes, not training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference
from .noise import DISTS

BACKENDS = ("triton", "cpp", "reference")


def backend_for(device: torch.device) -> str:
    """The backend that serves tensors on ``device``, honouring ``MINILLM_BACKEND``."""
    forced = os.environ.get("MINILLM_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MINILLM_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from . import cpp

        return "cpp" if cpp.available() else "reference"
    return "reference"


def _impl(device: torch.device, name: str):
    backend = backend_for(device)
    if backend == "triton":
        from . import fms_scores, perturbed_linear

        return {
            "perturbed_linear": perturbed_linear.perturbed_linear_triton,
            "fms_scores": fms_scores.fms_scores_triton,
        }[name]
    if backend == "cpp":
        from . import cpp

        return getattr(cpp, f"{name}_cpp")
    return getattr(reference, f"{name}_ref")


@torch.no_grad()
def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int,
    tensor_id: int,
    eps: float,
    dist: str = "rademacher",
    kind: str = "dense",
) -> torch.Tensor:
    """``[x+; x-] -> [x+ (W + eps Z)^T + b; x- (W - eps Z)^T + b]``, ``x`` ``[M, K]`` (M even).

    ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None; returns ``[M, N]`` in ``x.dtype``.
    See :mod:`minillm.kernels.reference` for ``kind`` and ``dist``; W is never modified or copied.
    """
    reference.check_args(x, weight, eps, kind, dist)
    y, _, _ = _impl(x.device, "perturbed_linear")(
        x, weight, bias, seed, tensor_id, eps, dist, kind, False
    )
    return y


@torch.no_grad()
def perturbed_linear_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int = 0,
    tensor_id: int = 0,
    eps: float = 0.0,
    dist: str = "rademacher",
    kind: str = "dense",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`perturbed_linear` plus per-input-feature statistics reduced on the same read of x.

    Returns ``(y [M, N], sum_sq [K] float32, sum [K] float32)`` with sums over all M rows.
    With the default ``eps=0`` it is a plain linear with statistics (M need not be even).
    """
    reference.check_args(x, weight, eps, kind, dist)
    y, sum_sq, sum_ = _impl(x.device, "perturbed_linear")(
        x, weight, bias, seed, tensor_id, eps, dist, kind, True
    )
    return y, sum_sq, sum_


@torch.no_grad()
def fms_scores(
    weight: torch.Tensor,
    x_norm: torch.Tensor,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    tensor_id: int,
    dist: str = "rademacher",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FMS sums of ``S_ij = |W_ij| * x_norm_j * |sum_k coeffs[k] Z_k,ij|`` without forming ``G``.

    ``weight`` ``[N, K]``, ``x_norm`` ``[K]`` (per-input-feature activation L2 norm), one seed per
    coefficient (``Z_k = noise(seeds[k], tensor_id, N, K, dist)``). Returns float32
    ``(row_sums [N], col_sums [K])``: a row sum scores an output channel, a column sum an input one.
    """
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    if len(seeds) != len(coeffs):
        raise ValueError(f"{len(seeds)} seeds but {len(coeffs)} coefficients")
    if weight.dim() != 2 or x_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"weight [N, K] and x_norm [K] expected, got {tuple(weight.shape)}, "
            f"{tuple(x_norm.shape)}"
        )
    return _impl(weight.device, "fms_scores")(
        weight, x_norm, list(seeds), list(coeffs), tensor_id, dist
    )
