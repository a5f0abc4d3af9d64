"""Turn unit scores into kept units: uniform per-layer ratios or one global ranking."""

from __future__ import annotations

import torch

from minillm.adapters import Group
from minillm.criteria import Scores

Keep = dict[tuple[int, str], torch.Tensor]


def _keep_top(group: Group, score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top ``n_keep`` units by score, the same number in every partition: ``[n_keep]``."""
    per = group.n_units // group.partitions
    k = n_keep // group.partitions
    parts = score.view(group.partitions, per)
    top = parts.topk(k, dim=1).indices + torch.arange(group.partitions)[:, None] * per
    return top.reshape(-1).sort().values


def uniform(groups: list[Group], scores: Scores, ratio: float) -> Keep:
    """Remove ``ratio`` of the units of every group (rounded to whole units per partition)."""
    keep = {}
    for g in groups:
        per = g.n_units // g.partitions
        removed_per_partition = min(round(ratio * per), per - 1)
        n_keep = (per - removed_per_partition) * g.partitions
        keep[(g.layer, g.kind)] = _keep_top(g, scores[(g.layer, g.kind)], n_keep)
    return keep


def global_ranking(groups: list[Group], scores: Scores, ratio: float) -> Keep:
    """Remove the lowest-scoring units across all groups until ``ratio`` of their parameters
    are gone. Scores are compared per parameter after dividing by each group's mean score,
    so criteria of different scales across layers stay comparable. A GQA partition step
    (one head per KV group) is removed as one item. Every partition keeps one unit.
    """
    items = []  # (normalized score per parameter, group index, [unit ids])
    for gi, g in enumerate(groups):
        s = scores[(g.layer, g.kind)].float()
        s = s / s.mean().clamp_min(1e-12)
        per = g.n_units // g.partitions
        order = s.view(g.partitions, per).argsort(dim=1)
        cost = g.unit_params() * g.partitions
        for rank in range(per - 1):
            units = (order[:, rank] + torch.arange(g.partitions) * per).tolist()
            items.append((float(s[units].sum()) / cost, gi, units))
    budget = ratio * sum(g.unit_params() * g.n_units for g in groups)
    removed: dict[int, set[int]] = {gi: set() for gi in range(len(groups))}
    spent = 0.0
    for _, gi, units in sorted(items, key=lambda t: t[0]):
        if spent >= budget:
            break
        removed[gi].update(units)
        spent += groups[gi].unit_params() * len(units)
    keep = {}
    for gi, g in enumerate(groups):
        kept = [u for u in range(g.n_units) if u not in removed[gi]]
        keep[(g.layer, g.kind)] = torch.tensor(kept, dtype=torch.long)
    return keep
