"""The interface the scoring code uses to run perturbed forwards and collect activation statistics.

Both context managers swap the ``forward`` of listed ``nn.Linear`` modules for a fused operator from
:mod:`minillm.kernels.ops` (Triton on CUDA, C++ on CPU, PyTorch reference elsewhere) and restore
the original forwards on exit, even on error. Weights are never modified and no perturbed copy of
a weight is stored; ``Z`` is regenerated from ``(seed, tensor_id)`` where it is used. Transient
memory per call: none on GPU (``W +- eps Z`` tiles live in registers); on CPU (C++) two chunks of
at most 4 MiB holding ``W_c +- eps Z_c`` for a block of output rows (``kind="cols"``: one scaled
copy of the input; ``kind="rows"``: nothing); the PyTorch reference holds a 4 MiB chunk of ``Z``
and its ``[tokens, chunk]`` product.

Usage (one SPSA perturbation)::

    linears = [(tid, mod) for tid, mod in enumerate(model_linears)]
    with perturbed(linears, seed=s, eps=1e-3):
        logits = model(torch.cat([batch, batch]))      # [2B, T, V]: +eps half, then -eps half
    loss_plus, loss_minus = per_half_loss(logits)

Forward only: the swapped forwards do not support autograd.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from minillm.kernels import ops


class StatSums(NamedTuple):
    """Per-input-feature statistics of a linear's inputs, accumulated over calls.

    ``sum_sq`` ``[in_features]`` float32: sum of squares over tokens (``sqrt`` gives the L2 norm
    ``||X_j||``); ``sum`` ``[in_features]`` float32: sum over tokens; ``count``: number of tokens.
    Mean is ``sum / count``, variance ``sum_sq / count - mean**2``.
    """

    sum_sq: torch.Tensor
    sum: torch.Tensor
    count: int


def _swap_forwards(linears: Sequence[tuple[int, nn.Linear]], make_forward) -> list:
    seen: set[int] = set()
    for tid, mod in linears:
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"tensor_id {tid}: expected nn.Linear, got {type(mod).__name__}")
        if tid in seen:
            raise ValueError(f"tensor_id {tid} listed twice: each linear needs its own id")
        seen.add(tid)
    saved = []
    for tid, mod in linears:
        saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = make_forward(tid, mod)
    return saved


def _restore(saved: list) -> None:
    for mod, old in saved:
        if old is None:
            del mod.forward
        else:
            mod.forward = old


@contextmanager
def perturbed(
    linears: Sequence[tuple[int, nn.Linear]],
    seed: int,
    eps: float,
    dist: str = "rademacher",
    kind: str = "dense",
) -> Iterator[None]:
    """Make each listed linear run the ``+eps`` / ``-eps`` pair on the two halves of its batch.

    Inside the context, a listed linear given ``x`` ``[2B, ..., in]`` computes
    ``x[:B] (W + eps Z)^T + b`` and ``x[B:] (W - eps Z)^T + b``, with ``Z`` the noise of
    ``(seed, tensor_id)`` from :mod:`minillm.kernels.noise`:

    * ``kind="dense"``: ``Z = noise(seed, tid, out, in, dist)``, one value per weight;
    * ``kind="rows"``: ``W' = diag(1 +- eps z) W``, ``z = unit_noise(seed, tid, out, dist)``;
    * ``kind="cols"``: ``W' = W diag(1 +- eps z)``, ``z = unit_noise(seed, tid, in, dist)``.

    ``linears`` lists ``(tensor_id, module)`` pairs with distinct ids; ``eps`` is in weight units
    (``dense``) or relative (``rows``/``cols``). The leading dimension of every input must be even.
    """

    def make_forward(tid: int, mod: nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % 2:
                raise ValueError(f"perturbed linear {tid}: batch {x.shape[0]} is not a ± pair")
            y = ops.perturbed_linear(
                x.reshape(-1, x.shape[-1]), mod.weight, mod.bias, seed, tid, eps, dist, kind
            )
            return y.reshape(*x.shape[:-1], y.shape[-1])

        return forward

    saved = _swap_forwards(linears, make_forward)
    try:
        yield
    finally:
        _restore(saved)


@contextmanager
def summed_input_stats(
    linears: Sequence[tuple[int, nn.Linear]],
) -> Iterator[dict[int, StatSums]]:
    """Accumulate per-input-feature statistics of each listed linear's inputs while forwards run.

    Yields a dict ``tensor_id -> StatSums(sum_sq [in], sum [in], count)`` updated in place after
    every forward; the outputs are those of the unmodified linears (the fused op reduces the
    statistics on the same read of ``x`` as the matrix product).
    """
    stats: dict[int, StatSums] = {}

    def make_forward(tid: int, mod: nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1])
            y, sum_sq, sum_ = ops.perturbed_linear_stats(x2, mod.weight, mod.bias)
            old = stats.get(tid)
            if old is None:
                stats[tid] = StatSums(sum_sq, sum_, x2.shape[0])
            else:
                stats[tid] = StatSums(old.sum_sq + sum_sq, old.sum + sum_, old.count + x2.shape[0])
            return y.reshape(*x.shape[:-1], y.shape[-1])

        return forward

    saved = _swap_forwards(linears, make_forward)
    try:
        yield stats
    finally:
        _restore(saved)
