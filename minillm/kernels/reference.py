"""Pure-PyTorch references of the fused operators (any device, no compiler, no Triton).

They define the semantics the Triton kernels (``perturbed_linear.py``, ``fms_scores.py``) and
the C++ operators (``minillm/csrc/``) are tested against. They live apart from the Triton files
so that they import where Triton does not exist.

Conventions shared by every backend:

* ``x`` is ``[M, K]`` with the ``+eps`` half stacked over the ``-eps`` half: rows ``[0, M/2)``
  see ``W + eps*Z``, rows ``[M/2, M)`` see ``W - eps*Z``. ``weight`` is ``[N, K]``, ``bias``
  ``[N]``.
* ``kind="dense"``: ``Z = noise(seed, tensor_id, N, K)`` per weight.
  ``kind="rows"``: ``W' = diag(1 +- eps*z) W`` with ``z = unit_noise(seed, tensor_id, N)``.
  ``kind="cols"``: ``W' = W diag(1 +- eps*z)`` with ``z = unit_noise(seed, tensor_id, K)``.
* ``eps == 0`` is a plain linear; then ``M`` need not be even.
* Activation statistics are per input feature over all ``M`` rows of ``x``, in float32:
  ``sum_sq[K] = sum_m x[m, k]**2`` and ``sum[K] = sum_m x[m, k]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .noise import DISTS, noise, unit_noise

KINDS = ("dense", "rows", "cols")
CHUNK_ELEMS = 1 << 20  # noise generated per chunk by the reference: 4 MiB of float32


def check_args(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str, dist: str) -> None:
    """Validate the shared contract; raise ``ValueError`` naming the offending argument."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x [M, K] and weight [N, K] expected, got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if eps != 0.0 and x.shape[0] % 2:
        raise ValueError(f"a perturbed pair needs an even number of rows, got M={x.shape[0]}")


def half_signs(m: int, device: torch.device) -> torch.Tensor:
    """``[m, 1]`` float32: +1 for the first half of the rows, -1 for the second."""
    s = torch.ones(m, 1, dtype=torch.float32, device=device)
    s[m // 2 :] = -1.0
    return s


def perturbed_linear_ref(
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
    """Reference perturbed linear: ``(y [M, N] in x.dtype, sum_sq [K] | None, sum [K] | None)``.

    Computes ``y = x W^T + b`` then adds ``+-eps * x Z^T`` in float32, generating ``Z`` in chunks of
    output rows (transient buffer: ``CHUNK_ELEMS`` floats of noise plus ``[M, chunk]`` of product).
    """
    check_args(x, weight, eps, kind, dist)
    m, k = x.shape
    n = weight.shape[0]
    sum_sq = x.float().pow(2).sum(0) if stats else None
    sum_ = x.float().sum(0) if stats else None
    if eps == 0.0:
        return F.linear(x, weight, bias), sum_sq, sum_
    s = half_signs(m, x.device) * eps
    if kind == "cols":
        z = unit_noise(seed, tensor_id, k, dist, x.device)
        xs = (x.float() * (1.0 + s * z)).to(x.dtype)
        return F.linear(xs, weight, bias), sum_sq, sum_
    y = F.linear(x, weight).float()
    if kind == "rows":
        y = y * (1.0 + s * unit_noise(seed, tensor_id, n, dist, x.device))
    else:
        xf = x.float()
        step = max(1, CHUNK_ELEMS // max(k, 1))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            zc = noise(seed, tensor_id, r1 - r0, k, dist, x.device, row_start=r0)
            y[:, r0:r1] += s * (xf @ zc.T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), sum_sq, sum_


def fms_scores_ref(
    weight: torch.Tensor,
    x_norm: torch.Tensor,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    tensor_id: int,
    dist: str = "rademacher",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FMS reduction, chunked over output rows.

    With the SPSA gradient estimate ``G = sum_k coeffs[k] * noise(seeds[k], tensor_id)`` ``[N, K]``
    and ``S_ij = |W_ij| * x_norm_j * |G_ij|``, returns ``(S.sum(1) [N], S.sum(0) [K])`` in float32.
    ``x_norm`` ``[K]`` is the per-input-feature L2 norm of the activations (``sqrt(sum_sq)``).
    Only a chunk of ``G`` exists at a time.
    """
    n, k = weight.shape
    rows = torch.zeros(n, dtype=torch.float32, device=weight.device)
    cols = torch.zeros(k, dtype=torch.float32, device=weight.device)
    xn = x_norm.float()
    step = max(1, CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        g = torch.zeros(r1 - r0, k, dtype=torch.float32, device=weight.device)
        for seed, c in zip(seeds, coeffs, strict=True):
            g += float(c) * noise(seed, tensor_id, r1 - r0, k, dist, weight.device, row_start=r0)
        s = weight[r0:r1].float().abs() * xn * g.abs()
        rows[r0:r1] = s.sum(1)
        cols += s.sum(0)
    return rows, cols
