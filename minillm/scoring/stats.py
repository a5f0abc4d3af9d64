"""Per-input-feature statistics of linears over the calibration tokens (sums of x and x**2).

:func:`collected_stats` reduces them inside any forward (a block of the block loop, or the
whole decoder); :func:`model_input_stats` runs the decoder (``model.base_model``: no logits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from minillm.scoring.perturb import summed_input_stats


@dataclass
class InputStats:
    """Statistics of one linear's inputs over ``count`` calibration tokens.

    ``sum_sq`` and ``sum`` are ``[in_features]`` float64 sums over tokens of ``x_j**2`` and
    ``x_j``.
    """

    sum_sq: torch.Tensor
    sum: torch.Tensor
    count: int = 0

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over tokens: ``[in_features]`` float32."""
        return self.sum_sq.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        """``[in_features]`` float32 mean over tokens."""
        return (self.sum / max(self.count, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        """``[in_features]`` float32 variance over tokens (population, ``1/count``)."""
        m = self.sum / max(self.count, 1)
        return (self.sum_sq / max(self.count, 1) - m * m).clamp_min(0).float()


def _batches(tokens: torch.Tensor, batch_size: int):
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


@contextmanager
def collected_stats(linears: Sequence[nn.Linear]) -> Iterator[dict[nn.Linear, InputStats]]:
    """Statistics of the inputs of ``linears`` over every forward run inside the context.

    Yields a dict that is filled with ``{linear: InputStats}`` when the context exits; the
    statistics are reduced by the fused linear of :mod:`minillm.kernels` on the same read of each
    input as its matrix product (forward only).
    """
    unique = list(dict.fromkeys(linears))
    stats: dict[nn.Linear, InputStats] = {}
    with summed_input_stats(list(enumerate(unique))) as fused:
        yield stats
    for tid, lin in enumerate(unique):
        if tid in fused:
            f = fused[tid]
            stats[lin] = InputStats(f.sum_sq.double(), f.sum.double(), f.count)


@torch.no_grad()
def model_input_stats(
    model: nn.Module, linears: Sequence[nn.Linear], tokens: torch.Tensor, batch_size: int = 8
) -> tuple[dict[nn.Linear, InputStats], int]:
    """Run ``tokens`` ``[n, seqlen]`` through the decoder; statistics of every linear's input.

    Returns ``({linear: InputStats}, forward_passes)``. The logits are never computed.
    """
    passes = 0
    with collected_stats(linears) as stats:
        for batch in _batches(tokens, batch_size):
            model.base_model(input_ids=batch.to(model.device), use_cache=False)
            passes += 1
    return stats, passes
