"""Counter-based noise: the one definition every backend (reference, C++, Triton) computes.

A perturbation is a ``(seed, tensor_id)`` pair; the noise value of element ``(row, col)`` is a pure
function of ``(seed, tensor_id, row, col)`` built from 32-bit integer hashing, so no backend ever
stores noise: it regenerates it where it is used.

Definition (all arithmetic modulo 2**32; ``fmix32`` is MurmurHash3's finalizer)::

    key      = stream_key(seed, tensor_id)                 # host side, once per tensor
             = fmix32(seed_lo ^ fmix32(seed_hi ^ fmix32(tensor_id + GOLDEN)))
    rkey     = fmix32(key ^ row * ROW_MUL)                  # once per row
    word(w)  = fmix32(rkey ^ w * WORD_MUL)                  # once per 32 Rademacher signs
    rademacher(row, col) = +1 if bit (col % 32) of word(col // 32) is set else -1
    gaussian(row, col)   = sqrt(-2 ln u1) * cos(2 pi u2),   # Box-Muller
        u1 = ((word(2 col) >> 8) + 1) / 2**24  in (0, 1],  u2 = (word(2 col + 1) >> 8) / 2**24

Rademacher values are bit-identical across backends (integer only); Gaussian values agree within
float tolerance (``log``/``cos`` differ in the last ulps between libm, ATen and Triton).

Cost: one ``word`` hash is 2 multiplies, 4 xors and 3 shifts and yields 32 signs, so dense
Rademacher noise costs about 0.3 integer ops per weight for the hash plus ~3 per weight to extract
and apply the sign bit. Gaussian costs two hashes plus ``log``/``sqrt``/``cos`` per weight.

Structured (per-unit) noise is the ``cols=1`` case: :func:`unit_noise`.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
ROW_MUL = 0x85EBCA77
WORD_MUL = 0xC2B2AE3D
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
DISTS = ("rademacher", "gaussian")


def fmix32_int(h: int) -> int:
    """MurmurHash3 32-bit finalizer on a Python int (host side)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_C2) & MASK32
    h ^= h >> 16
    return h


def stream_key(seed: int, tensor_id: int) -> int:
    """32-bit key of the noise stream of ``(seed, tensor_id)``; both must lie in [0, 2**64)."""
    if not (0 <= seed < 2**64 and 0 <= tensor_id < 2**64):
        raise ValueError(f"seed and tensor_id must lie in [0, 2**64), got {seed}, {tensor_id}")
    inner = fmix32_int((tensor_id + GOLDEN) ^ (tensor_id >> 32))
    return fmix32_int((seed & MASK32) ^ fmix32_int((seed >> 32) ^ inner))


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c mod 2**32`` for int64 tensors holding values in [0, 2**32), without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 32-bit finalizer, elementwise on an int64 tensor of values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def row_keys(
    key: int, rows: int, device: torch.device | str | None = None, row_start: int = 0
) -> torch.Tensor:
    """Keys ``[rows]`` (int64 holding uint32) of rows ``row_start:row_start+rows`` of ``key``."""
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)
    return fmix32(_mul32(r, ROW_MUL) ^ key)


def words(rkeys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Word hashes ``[rows, len(w)]`` for row keys ``[rows]`` and word indices ``[len(w)]``."""
    return fmix32(rkeys[:, None] ^ _mul32(w, WORD_MUL)[None, :])


def rademacher(
    seed: int,
    tensor_id: int,
    rows: int,
    cols: int,
    device: torch.device | str | None = None,
    col_start: int = 0,
    row_start: int = 0,
) -> torch.Tensor:
    """Rademacher noise ``[rows, cols]`` float32 of +-1.

    ``row_start``/``col_start`` select the block ``[row_start:, col_start:]`` of a larger tensor:
    the values equal slicing the full tensor, so callers can generate it chunk by chunk.
    """
    rk = row_keys(stream_key(seed, tensor_id), rows, device, row_start)
    col = torch.arange(col_start, col_start + cols, dtype=torch.int64, device=device)
    w0 = col_start >> 5
    w1 = ((col_start + cols - 1) >> 5) + 1 if cols else w0
    h = words(rk, torch.arange(w0, w1, dtype=torch.int64, device=device))
    bits = (h[:, (col >> 5) - w0] >> (col & 31)[None, :]) & 1
    return (bits * 2 - 1).to(torch.float32)


def gaussian(
    seed: int,
    tensor_id: int,
    rows: int,
    cols: int,
    device: torch.device | str | None = None,
    col_start: int = 0,
    row_start: int = 0,
) -> torch.Tensor:
    """Standard normal noise ``[rows, cols]`` float32 (Box-Muller on two word hashes)."""
    rk = row_keys(stream_key(seed, tensor_id), rows, device, row_start)
    col = torch.arange(col_start, col_start + cols, dtype=torch.int64, device=device)
    h1 = words(rk, 2 * col)
    h2 = words(rk, 2 * col + 1)
    u1 = ((h1 >> 8) + 1).to(torch.float32) * 2.0**-24
    u2 = (h2 >> 8).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)


def noise(
    seed: int,
    tensor_id: int,
    rows: int,
    cols: int,
    dist: str = "rademacher",
    device: torch.device | str | None = None,
    col_start: int = 0,
    row_start: int = 0,
) -> torch.Tensor:
    """Noise ``[rows, cols]`` float32 of distribution ``dist`` (``rademacher`` or ``gaussian``)."""
    if dist == "rademacher":
        return rademacher(seed, tensor_id, rows, cols, device, col_start, row_start)
    if dist == "gaussian":
        return gaussian(seed, tensor_id, rows, cols, device, col_start, row_start)
    raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")


def unit_noise(
    seed: int,
    tensor_id: int,
    n: int,
    dist: str = "rademacher",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Structured noise ``[n]`` float32: one value per unit (output row, input column, head).

    Equals ``noise(seed, tensor_id, n, 1, dist)[:, 0]``.
    """
    return noise(seed, tensor_id, n, 1, dist, device)[:, 0]
