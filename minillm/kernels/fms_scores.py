"""Triton FMS score reduction: row and column sums of ``|W_ij| * ||X_j|| * |G_ij|`` where the SPSA
gradient estimate ``G = sum_s c_s Z_s`` is regenerated tile by tile from the ``(seed, coefficient)``
list and never written to memory.

A program owns a ``[BK, BN]`` tile of ``W^T`` (``BN`` output rows by ``BK`` input columns), loops
over the perturbations accumulating ``G`` in registers, then adds its partial row sums and column
sums to the ``[N]`` and ``[K]`` float32 outputs with atomics. Work: one read of W, and per weight
per perturbation the noise generation (~5 integer ops + 0.3 amortized hash) and one fma.
Reference: ``reference.fms_scores_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .noise import stream_key
from .noise_triton import as_int32, gaussian_tile, rademacher_tile, row_keys

# kernels below are decorated as interpreter functions when TRITON_INTERPRET=1 at import
INTERPRETED = triton.knobs.runtime.interpret


@triton.jit
def _fms_kernel(
    w_ptr, xn_ptr, keys_ptr, coeffs_ptr, rows_ptr, cols_ptr,
    N, K, S, stride_wn, stride_wk,
    GAUSSIAN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    mask = (rn[None, :] < N) & (rk[:, None] < K)
    w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=mask, other=0.0)
    xn = tl.load(xn_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
    g = tl.zeros((BK, BN), dtype=tl.float32)
    for s in range(S):
        rkeys = row_keys(tl.load(keys_ptr + s), rn)
        if GAUSSIAN:
            z = gaussian_tile(rkeys[None, :], rk[:, None])
        else:
            z = rademacher_tile(rkeys, pid_k * BK, BK, BN)
        g += tl.load(coeffs_ptr + s) * z
    score = tl.abs(w.to(tl.float32)) * xn[:, None] * tl.abs(g)
    tl.atomic_add(rows_ptr + rn, tl.sum(score, axis=0), mask=rn < N)
    tl.atomic_add(cols_ptr + rk, tl.sum(score, axis=1), mask=rk < K)


def fms_scores_triton(
    weight: torch.Tensor,
    x_norm: torch.Tensor,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    tensor_id: int,
    dist: str = "rademacher",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the reduction; same contract as ``reference.fms_scores_ref``."""
    n, k = weight.shape
    dev = weight.device
    keys = torch.tensor(
        [as_int32(stream_key(s, tensor_id)) for s in seeds], dtype=torch.int32, device=dev
    )
    cs = torch.tensor([float(c) for c in coeffs], dtype=torch.float32, device=dev)
    rows = torch.zeros(n, dtype=torch.float32, device=dev)
    cols = torch.zeros(k, dtype=torch.float32, device=dev)
    bn, bk = (16, 32) if INTERPRETED else (64, 128)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _fms_kernel[grid](
        weight,
        x_norm.contiguous(),
        keys,
        cs,
        rows,
        cols,
        n,
        k,
        len(seeds),
        weight.stride(0),
        weight.stride(1),
        GAUSSIAN=dist == "gaussian",
        BN=bn,
        BK=bk,
    )
    return rows, cols
