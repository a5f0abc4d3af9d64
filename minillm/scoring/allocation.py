"""Turn unit scores into kept units: which layers are pruned (``--layers``), uniform per-layer
ratios or one global ranking, counts rounded to multiples (``--round-to``), and the parameters
of the units kept."""

from __future__ import annotations

import torch

from minillm.model.adapters import Group
from minillm.scoring.criteria import Scores, global_normalization

Keep = dict[tuple[int, str], torch.Tensor]


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Layer indices of an inclusive range ``a-b`` (or one index); default as LLM-Pruner."""
    if spec is None:
        first, last = max(1, n_layers // 8), n_layers - max(1, -(-n_layers // 16)) - 1
        if first > last:
            raise ValueError(
                f"--layers: the default range skips the first and last layers, which leaves "
                f"none of this {n_layers}-layer model; pass a range such as 0-{n_layers - 1}"
            )
        return list(range(first, last + 1))
    try:
        first, _, last = spec.partition("-")
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--layers: '{spec}' is not a range such as 3-27") from None
    if not 0 <= lo <= hi < n_layers:
        raise ValueError(f"--layers: '{spec}' is outside 0-{n_layers - 1}")
    return list(range(lo, hi + 1))


def prunable_params(groups: list[Group], keep: Keep | None = None) -> int:
    """Parameters of the units of ``groups`` (only those kept in ``keep``, if given)."""
    return sum(
        g.unit_params() * (g.n_units if keep is None else len(keep[(g.layer, g.kind)]))
        for g in groups
    )


def _on_cpu(scores: Scores) -> Scores:
    """The scores as CPU tensors: criteria leave them on the compute device, the ranking and
    the kept indices live on the CPU."""
    return {key: score.detach().cpu() for key, score in scores.items()}


def _keep_top(group: Group, score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top ``n_keep`` units by score, the same number in every partition: ``[n_keep]``."""
    per = group.n_units // group.partitions
    k = n_keep // group.partitions
    parts = score.view(group.partitions, per)
    top = parts.topk(k, dim=1).indices + torch.arange(group.partitions)[:, None] * per
    return top.reshape(-1).sort().values


def uniform(groups: list[Group], scores: Scores, ratio: float) -> Keep:
    """Remove ``ratio`` of the units of every group (rounded to whole units per partition)."""
    scores = _on_cpu(scores)
    keep = {}
    for g in groups:
        per = g.n_units // g.partitions
        removed_per_partition = min(round(ratio * per), per - 1)
        n_keep = (per - removed_per_partition) * g.partitions
        keep[(g.layer, g.kind)] = _keep_top(g, scores[(g.layer, g.kind)], n_keep)
    return keep


NORMALIZATIONS = ("mean", "standardize", "none")


def _normalized(score: torch.Tensor, normalize: str) -> torch.Tensor:
    s = score.double()
    if normalize == "mean":
        return s / s.mean().clamp_min(1e-30)
    if normalize == "standardize":
        return (s - s.mean()) / s.std().clamp_min(1e-30) if s.numel() > 1 else s * 0
    if normalize == "none":
        return s
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def _rank_removals(
    groups: list[Group], scores: Scores, ratio: float, normalize: str, per_param: bool
) -> dict:
    """Units to remove per group index, lowest normalized score first, within a param budget."""
    items = []  # (normalized score of a removal step, group index, [unit ids])
    for gi, g in enumerate(groups):
        s = _normalized(scores[(g.layer, g.kind)], normalize)
        if per_param:
            s = s / g.unit_params()
        per = g.n_units // g.partitions
        order = s.view(g.partitions, per).argsort(dim=1)
        for rank in range(per - 1):
            units = (order[:, rank] + torch.arange(g.partitions) * per).tolist()
            items.append((float(s[units].mean()), gi, units))
    budget = ratio * prunable_params(groups)
    removed: dict[int, set[int]] = {gi: set() for gi in range(len(groups))}
    spent = 0.0
    for _, gi, units in sorted(items, key=lambda t: t[0]):
        cost = groups[gi].unit_params() * len(units)
        if spent + cost / 2 > budget:
            break
        removed[gi].update(units)
        spent += cost
    return removed


def global_ranking(
    groups: list[Group],
    scores: Scores,
    ratio: float,
    normalize: str = "mean",
    together: bool = False,
    per_param: bool = False,
) -> Keep:
    """Remove the lowest-scoring units across layers until ``ratio`` of their parameters are gone.

    Scores are made comparable across groups by ``normalize``: ``"mean"`` divides by the group's
    mean (relative importance within the layer), ``"standardize"`` subtracts the mean and divides by
    the standard deviation (FLAP), ``"none"`` uses them as they are (criteria whose scores already
    carry a cross-layer scale; :func:`minillm.scoring.criteria.global_normalization` says which).
    Units are ranked by normalized score, not per parameter, and the budget counts parameters.
    ``together=False`` ranks heads and channels apart, each losing ``ratio`` of its own parameters;
    ``True`` ranks them in one list. A GQA removal step (one query head in every KV group) is one
    item scored by its mean, so head counts stay GQA-valid; every partition keeps at least one unit.
    """
    kinds = [None] if together else sorted({g.kind for g in groups})
    scores = _on_cpu(scores)
    keep = {}
    for kind in kinds:
        sub = [g for g in groups if kind is None or g.kind == kind]
        removed = _rank_removals(sub, scores, ratio, normalize, per_param)
        for gi, g in enumerate(sub):
            kept = [u for u in range(g.n_units) if u not in removed[gi]]
            keep[(g.layer, g.kind)] = torch.tensor(kept, dtype=torch.long)
    return keep


def allocate(
    groups: list[Group],
    scores: Scores,
    ratio: float,
    criterion: str,
    options: dict | None = None,
    *,
    per_layer: bool = False,
    together: bool = False,
) -> Keep:
    """Kept units per group: ``ratio`` of every group (``per_layer``, ``--uniform``), or one
    global ranking made comparable as ``criterion`` needs (:func:`global_normalization`)."""
    if per_layer:
        return uniform(groups, scores, ratio)
    normalize = global_normalization(criterion, options)
    return global_ranking(groups, scores, ratio, normalize=normalize, together=together)


def parse_round_to(spec: str | None) -> dict[str, int]:
    """``{"heads": n, "channels": m}`` of ``--round-to`` ('8' means both kinds; {} if None)."""
    if spec is None:
        return {}
    items = spec.split(",") if "=" in spec else [f"heads={spec}", f"channels={spec}"]
    multiples = {}
    for item in items:
        kind, _, value = item.partition("=")
        if kind not in ("heads", "channels") or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"--round-to: '{spec}' is not N or heads=N,channels=M with integers N, M >= 1"
            )
        multiples[kind] = int(value)
    return multiples


def check_multiples(groups: list[Group], multiples: dict[str, int]) -> None:
    """ValueError naming ``--round-to`` if a multiple exceeds a partition's unit count."""
    for g in groups:
        per, n = g.n_units // g.partitions, multiples.get(g.kind, 1)
        if n > per:
            where = "per KV group" if g.partitions > 1 else "per layer"
            raise ValueError(
                f"--round-to: {g.kind}={n} exceeds the {per} {g.kind} {where} of layer "
                f"{g.layer}; use a multiple <= {per} or leave {g.kind} out"
            )


def round_to_multiples(
    groups: list[Group], scores: Scores, keep: Keep, multiples: dict[str, int]
) -> Keep:
    """Round each partition's kept count to the nearest multiple of ``multiples[kind]``.

    Post-processing of any allocation: a partition that kept ``k`` units keeps the multiple of
    ``n`` nearest to ``k`` (halves up; at least ``n``; all units where that exceeds them),
    dropping its lowest-scoring kept units or restoring its highest-scoring removed ones. For
    GQA query heads the partition is a KV group, so every group keeps the same multiple.
    Kinds absent from ``multiples`` and groups absent from ``keep`` are left as they are.
    """
    check_multiples(groups, multiples)
    scores = _on_cpu(scores)
    out = dict(keep)
    for g in groups:
        if g.kind not in multiples or (g.layer, g.kind) not in keep:
            continue
        n, per = multiples[g.kind], g.n_units // g.partitions
        kept = set(keep[(g.layer, g.kind)].tolist())
        score = scores[(g.layer, g.kind)]
        new = []
        for p in range(g.partitions):
            units = range(p * per, (p + 1) * per)
            ranked = sorted(units, key=lambda u: (u not in kept, -float(score[u])))
            k = sum(u in kept for u in units)
            target = min(max(n * ((k + n // 2) // n), n), per)  # halves round up
            new += ranked[:target]
        out[(g.layer, g.kind)] = torch.tensor(sorted(new), dtype=torch.long)
    return out
