"""Triton device functions for the counter-based noise of :mod:`minillm.kernels.noise`, and a
launcher that writes a noise block (used by the tests to prove bit-identity).

The fused kernels call :func:`rademacher_tile` (``fms_scores.py``: a ``[BK, BN]`` tile of
``Z^T``), :func:`rademacher_tile_nk` (``perturbed_linear.py``: the ``[BN, BK]`` tile of ``Z``) and
:func:`gaussian_tile` (either layout, by broadcasting) in registers: ``BN`` weight rows (output
features) by ``BK`` columns (input features), ``BK`` a multiple of 32 so one word hash serves 32
consecutive columns of one row.

All integer arithmetic is on ``uint32`` (wrapping multiply, logical shifts); constants are
materialized as ``uint32`` so no operand is promoted to 64 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .noise import DISTS, stream_key


def as_int32(key: int) -> int:
    """A uint32 key as the int32 with the same bits (what a Triton ``i32`` argument carries)."""
    return key - (1 << 32) if key >= 1 << 31 else key


@triton.jit
def _u32(c: tl.constexpr):
    return tl.full((), c, tl.uint32)


@triton.jit
def fmix32(h):
    """MurmurHash3 finalizer on a uint32 tensor."""
    h ^= h >> 16
    h = h * _u32(0x85EBCA6B)
    h ^= h >> 13
    h = h * _u32(0xC2B2AE35)
    h ^= h >> 16
    return h


@triton.jit
def row_keys(key, rows):
    """Row keys (uint32, shape of ``rows``) of the stream ``key`` (int32 bits of the uint32 key)."""
    k = key.to(tl.uint32, bitcast=True)
    return fmix32(k ^ (rows.to(tl.uint32) * _u32(0x85EBCA77)))


@triton.jit
def word_hash(rkeys, w):
    """Word hashes: ``rkeys`` and ``w`` broadcast against each other (uint32 result)."""
    return fmix32(rkeys ^ (w.to(tl.uint32) * _u32(0xC2B2AE3D)))


@triton.jit
def rademacher_tile(rkeys, k0, BK: tl.constexpr, BN: tl.constexpr):
    """``[BK, BN]`` float32 tile of +-1: element ``(i, j)`` is the noise of row ``rkeys[j]``,
    column ``k0 + i``. ``k0`` must be a multiple of 32 and ``BK`` a multiple of 32.

    Integer work: ``BK/32 * BN`` word hashes (~10 ops each) + ``BK * BN`` (shift, and, convert).
    """
    w = k0 // 32 + tl.arange(0, BK // 32)
    h = word_hash(rkeys[None, :], w[:, None])  # [BK/32, BN]
    shifts = tl.arange(0, 32).to(tl.uint32)
    bits = (h[:, None, :] >> shifts[None, :, None]) & _u32(1)  # [BK/32, 32, BN]
    bits = tl.reshape(bits, (BK, BN))
    return bits.to(tl.float32) * 2.0 - 1.0


@triton.jit
def rademacher_tile_nk(rkeys, k0, BK: tl.constexpr, BN: tl.constexpr):
    """The transpose of :func:`rademacher_tile` built in place: ``[BN, BK]``, element ``(j, i)``
    the noise of row ``rkeys[j]``, column ``k0 + i`` (no layout conversion of the tile)."""
    w = k0 // 32 + tl.arange(0, BK // 32)
    h = word_hash(rkeys[:, None], w[None, :])  # [BN, BK/32]
    shifts = tl.arange(0, 32).to(tl.uint32)
    bits = (h[:, :, None] >> shifts[None, None, :]) & _u32(1)  # [BN, BK/32, 32]
    bits = tl.reshape(bits, (BN, BK))
    return bits.to(tl.float32) * 2.0 - 1.0


@triton.jit
def gaussian_tile(rkeys, cols):
    """Box-Muller normals, ``rkeys`` ``[1, BN]`` against ``cols`` ``[BK, 1]`` -> ``[BK, BN]``."""
    c2 = cols * 2
    h1 = word_hash(rkeys, c2)
    h2 = word_hash(rkeys, c2 + 1)
    u1 = ((h1 >> 8) + _u32(1)).to(tl.float32) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def unit_values(key, units, GAUSSIAN: tl.constexpr):
    """Structured noise ``unit_noise(...)[units]`` (column 0 of each unit's row), float32."""
    rk = row_keys(key, units)
    if GAUSSIAN:
        u1 = ((word_hash(rk, _u32(0)) >> 8) + _u32(1)).to(tl.float32) * 5.9604644775390625e-08
        u2 = (word_hash(rk, _u32(1)) >> 8).to(tl.float32) * 5.9604644775390625e-08
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    return (word_hash(rk, _u32(0)) & _u32(1)).to(tl.float32) * 2.0 - 1.0


@triton.jit(do_not_specialize=["key"])
def _noise_kernel(
    out_ptr,
    key,
    rows,
    cols,
    row_start,
    col_start,
    GAUSSIAN: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
):
    # program (pid_n, pid_k) writes out[rows pid_n*BN.., cols pid_k*BK..]; the tile is Z^T
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    rkeys = row_keys(key, row_start + rn)
    if GAUSSIAN:
        z = gaussian_tile(rkeys[None, :], (col_start + rk)[:, None])
    else:
        z = rademacher_tile(rkeys, col_start + pid_k * BK, BK, BN)
    mask = (rn[None, :] < rows) & (rk[:, None] < cols)
    tl.store(out_ptr + rn[None, :] * cols + rk[:, None], z, mask=mask)


def noise_triton(
    seed: int,
    tensor_id: int,
    rows: int,
    cols: int,
    dist: str = "rademacher",
    device: torch.device | str = "cuda",
    row_start: int = 0,
    col_start: int = 0,
) -> torch.Tensor:
    """Triton twin of :func:`minillm.kernels.noise.noise` (``col_start`` a multiple of 32)."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    if col_start % 32:
        raise ValueError(f"col_start must be a multiple of 32, got {col_start}")
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    bk, bn = 32, 16
    grid = (triton.cdiv(rows, bn), triton.cdiv(cols, bk))
    _noise_kernel[grid](
        out,
        as_int32(stream_key(seed, tensor_id)),
        rows,
        cols,
        row_start,
        col_start,
        GAUSSIAN=dist == "gaussian",
        BK=bk,
        BN=bn,
    )
    return out
