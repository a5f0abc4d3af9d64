"""Independent references used by several test modules."""

from __future__ import annotations

import torch

from minillm.model.adapters import Group


def random_keep(group: Group, n_remove_per_partition: int, gen: torch.Generator) -> torch.Tensor:
    """Random kept units, removing the same number from every partition: ``[k]``."""
    per = group.n_units // group.partitions
    parts = [
        torch.randperm(per, generator=gen)[n_remove_per_partition:] + p * per
        for p in range(group.partitions)
    ]
    return torch.cat(parts).sort().values


def mask_removed(group: Group, keep: torch.Tensor) -> None:
    """Zero the consumer columns of every unit not in ``keep``: the masked-dense reference."""
    removed = sorted(set(range(group.n_units)) - set(keep.tolist()))
    if not removed:
        return
    removed = torch.tensor(removed, dtype=torch.long)
    with torch.no_grad():
        for block in group.consumers:
            block.linear.weight[:, block.indices(removed)] = 0
