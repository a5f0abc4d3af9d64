"""Importance criteria: each maps a group's units to scores (higher = more important).

A criterion is a function ``(ctx: ScoringContext) -> {(layer, kind): Tensor[n_units]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from minillm.adapters import Adapter, Group

Scores = dict[tuple[int, str], torch.Tensor]


@dataclass
class ScoringContext:
    """Everything a criterion may use; counters are updated by criteria that run the model.

    ``batches`` is calibration token ids ``[n_samples, seqlen]``.
    """

    model: nn.Module
    adapter: Adapter
    groups: list[Group]
    batches: torch.Tensor
    seed: int = 0
    options: dict = field(default_factory=dict)
    forward_passes: int = 0
    tokens_forwarded: int = 0


def _unit_norms(block_weight: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Squared L2 norm of each unit's block: ``[n_units]``."""
    w = block_weight.float()
    if dim == 1:
        w = w.t()
    return w.reshape(-1, size * w.shape[1]).pow(2).sum(1)


def magnitude(ctx: ScoringContext) -> Scores:
    """L2 norm of all weights that belong to the unit (producer rows and consumer columns)."""
    scores = {}
    for g in ctx.groups:
        sq = sum(
            _unit_norms(b.linear.weight.data, b.dim, b.size) for b in g.producers + g.consumers
        )
        scores[(g.layer, g.kind)] = sq.sqrt()
    return scores


def random(ctx: ScoringContext) -> Scores:
    """Uniform random scores from ``ctx.seed``: the baseline every criterion must beat."""
    gen = torch.Generator().manual_seed(ctx.seed)
    return {(g.layer, g.kind): torch.rand(g.n_units, generator=gen) for g in ctx.groups}


CRITERIA: dict[str, Callable[[ScoringContext], Scores]] = {
    "random": random,
    "magnitude": magnitude,
}
