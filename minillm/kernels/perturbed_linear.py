"""Triton perturbed linear: the +-eps pair of a linear layer in one kernel, W read once, Z in
registers; optional per-input-feature statistics of x from a column reduction.

Layout: ``x`` ``[M, K]`` stacks ``x+`` (rows ``[0, H)``) over ``x-`` (rows ``[H, 2H)``),
``H = M/2``.
A program owns output rows ``m`` and ``m + H`` for ``BM`` pair indices and ``BN`` output
features. For every ``BK`` step it loads the ``W`` tile once, builds ``W + eps Z`` and ``W - eps Z``
in registers and issues two dots (the first with ``x+``, the second with ``x-``), so the pair costs
the tensor-core FLOPs of one plain linear on ``M`` rows. ``kind="rows"`` scales the accumulators in
the epilogue; ``kind="cols"`` scales the loaded ``x`` tiles (no noise per weight at all).

The product is computed transposed, ``y^T = W' x^T`` (tiles ``[BN, BM]``): the operand built in
registers, ``W +- eps Z``, is the left one of the dot, which Hopper's wgmma reads from registers,
while ``x^T`` goes to it straight from shared memory. With ``W'`` on the right (``y = x W'^T``,
the first layout) every built tile had to be written back to shared memory first: dense noise ran
at 0.34-0.40x ``F.linear`` against 0.41-0.48x transposed, on an H200; the noise-free kinds are
the same in both layouts (BENCHMARKS.md, "GPU").

Integer work of dense Rademacher noise (per ``BK x BN`` tile and per M-tile of ``2 BM`` tokens):
``BK*BN/32`` fmix32 word hashes (2 mul + 4 xor + 3 shift ~ 10 ops, amortized ~0.3 op/weight)
plus per weight a shift, an and, a convert and two fma (~5 ops). Against ``4 BM`` tensor-core
FLOPs per weight per M-tile that is ~5/(4 BM) of the FLOP count: 1% at ``BM = 128`` (the pairing
halves it: one generated Z tile serves both halves). Because CUDA-core integer throughput is ~15-30x
below tensor-core throughput, this is why the noise is regenerated per M-tile only (loop over K
inside, never per K-split), tiles are tall in M, and one hash yields 32 signs. Gaussian noise costs
two hashes plus log/sqrt/cos per weight per M-tile and is only for small problems or CPU.

Statistics (``sum_m x^2`` and ``sum_m x`` per input feature, float32) come from a separate
column reduction over ``x`` (:func:`column_stats_triton`), not from the product's loop. Reducing
the product's ``x`` tiles in its loop (the first design, one read of ``x``) ran at 0.12-0.14x
``F.linear`` on an H200 against 0.37-0.72x without it (BENCHMARKS.md, "GPU"): the reduction
pulled the operands of the tensor-core product back into registers in every program. The
separate pass reads ``x`` once more (``2 M K`` bytes against ``2 M N K`` FLOPs) and costs 3-12%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .noise import stream_key
from .noise_triton import as_int32, gaussian_tile, rademacher_tile_nk, row_keys, unit_values

KIND_CODES = {"dense": 0, "rows": 1, "cols": 2}

# kernels below are decorated as interpreter functions when TRITON_INTERPRET=1 at import
INTERPRETED = triton.knobs.runtime.interpret


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in float32; UPCAST (interpreter only: its bf16 dot is wrong) computes the
    product from float32 copies of the operands."""
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["key"])  # a key equal to 1 must not become a constexpr
def _perturbed_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    key, eps,
    PAIRED: tl.constexpr, KIND: tl.constexpr, GAUSSIAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped order: GROUP_M row blocks sweep the N blocks together, so W tiles are reused from L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(H, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_m = rm < H
    mask_n = rn < N
    acc_p = tl.zeros((BN, BM), dtype=tl.float32)
    acc_m = tl.zeros((BN, BM), dtype=tl.float32)
    if PAIRED and KIND == 0:
        rkeys = row_keys(key, rn)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mask_k = rk < K
        xp_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk  # [BK, BM] of x^T
        xp = tl.load(xp_ptrs, mask=mask_m[None, :] & mask_k[:, None], other=0.0)
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BN, BK] tile of W
        if PAIRED:
            xm = tl.load(xp_ptrs + H * stride_xm, mask=mask_m[None, :] & mask_k[:, None], other=0.0)
            if KIND == 0:
                if GAUSSIAN:
                    z = gaussian_tile(rkeys[:, None], rk[None, :])
                else:
                    z = rademacher_tile_nk(rkeys, k0, BK, BN)
                wf = w.to(tl.float32)
                wp = (wf + eps * z).to(w.dtype)
                wm = (wf - eps * z).to(w.dtype)
            else:
                wp = w
                wm = w
                if KIND == 2:
                    zc = unit_values(key, rk, GAUSSIAN)
                    xp = (xp.to(tl.float32) * (1.0 + eps * zc)[:, None]).to(w.dtype)
                    xm = (xm.to(tl.float32) * (1.0 - eps * zc)[:, None]).to(w.dtype)
            acc_p = _dot(wp, xp, acc_p, IEEE, UPCAST)
            acc_m = _dot(wm, xm, acc_m, IEEE, UPCAST)
        else:
            acc_p = _dot(w, xp, acc_p, IEEE, UPCAST)
    if PAIRED and KIND == 1:
        zr = unit_values(key, rn, GAUSSIAN)
        acc_p = acc_p * (1.0 + eps * zr)[:, None]
        acc_m = acc_m * (1.0 - eps * zr)[:, None]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc_p += bias[:, None]
        acc_m += bias[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None] * stride_yn
    mask = mask_n[:, None] & mask_m[None, :]
    tl.store(y_ptrs, acc_p.to(y_ptr.dtype.element_ty), mask=mask)
    if PAIRED:
        tl.store(y_ptrs + H * stride_ym, acc_m.to(y_ptr.dtype.element_ty), mask=mask)


def _configs() -> list[triton.Config]:
    """Tiles that compiled for sm_90 without register spills (ptxas -v; dense kind, bf16), checked
    for the first layout (``y = x W'^T``); not re-checked for the transposed one, which has the
    same accumulator sizes.

    ``BK = 32`` is the word size of the noise, so one hash per row and K step; ``BK = 64`` and
    ``128 x 64`` tiles spilled. ``BM`` counts pairs: the effective tile is ``2 BM x BN``. The
    kinds without per-weight noise (rows, cols, unpaired) may also take ``BK = 64``.
    """
    tiles = [
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 256, 32, 8, 3),
        (64, 128, 32, 8, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 128, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
    ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


def _tiles_for_kind(configs: list[triton.Config], named_args: dict, **kwargs) -> list:
    """Dense noise needs ``BK = 32`` (one noise word per row and K step)."""
    dense = kwargs["PAIRED"] and kwargs["KIND"] == KIND_CODES["dense"]
    return [c for c in configs if c.kwargs["BK"] == 32 or not dense]


_autotuned = triton.autotune(
    configs=_configs(),
    key=["H", "N", "K", "KIND", "PAIRED"],
    prune_configs_by={"early_config_prune": _tiles_for_kind},
)(_perturbed_linear_kernel)


@triton.jit
def _column_stats_kernel(
    x_ptr, sq_ptr, s_ptr, M, K, stride_xm, stride_xk,
    ROWS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``sq[k] += sum x[m, k]^2``, ``s[k] += sum x[m, k]`` over this program's ``ROWS`` rows."""
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    first = tl.program_id(1) * ROWS
    mask_k = rk < K
    sq = tl.zeros((BK,), dtype=tl.float32)
    s = tl.zeros((BK,), dtype=tl.float32)
    for m0 in range(first, first + ROWS, BM):
        rm = m0 + tl.arange(0, BM)
        mask = (rm < M)[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=0)
        s += tl.sum(xf, axis=0)
    tl.atomic_add(sq_ptr + rk, sq, mask=mask_k)
    tl.atomic_add(s_ptr + rk, s, mask=mask_k)


def column_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column ``sum x^2`` and ``sum x`` of ``x`` ``[M, K]``: two float32 ``[K]``."""
    m, k = x.shape
    sq = torch.zeros(k, dtype=torch.float32, device=x.device)
    s = torch.zeros_like(sq)
    rows, bm, bk = (16, 16, 32) if INTERPRETED else (512, 32, 128)
    grid = (triton.cdiv(k, bk), triton.cdiv(m, rows))
    _column_stats_kernel[grid](x, sq, s, m, k, x.stride(0), x.stride(1), rows, bm, bk)
    return sq, s


def perturbed_linear_triton(
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
    """Launch the kernel; same contract as ``reference.perturbed_linear_ref``.

    Autotuned tiles on GPU; fixed 16x16x32 tiles under ``TRITON_INTERPRET=1``.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    paired = eps != 0.0
    h = m // 2 if paired else m
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (
        x, weight, bias if bias is not None else y, y,
        h, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        as_int32(stream_key(seed, tensor_id)), float(eps),
    )  # fmt: skip
    flags = dict(
        PAIRED=paired,
        KIND=KIND_CODES[kind],
        GAUSSIAN=dist == "gaussian",
        HAS_BIAS=bias is not None,
        IEEE=ieee,
    )
    if INTERPRETED:
        grid = (triton.cdiv(h, 16) * triton.cdiv(n, 16),)
        _perturbed_linear_kernel[grid](*args, **flags, UPCAST=True, BM=16, BN=16, BK=32, GROUP_M=2)
    else:

        def grid(meta):
            return (triton.cdiv(h, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

        _autotuned[grid](*args, **flags, UPCAST=False)
    return (y, *column_stats_triton(x)) if stats else (y, None, None)
