"""Allocation from measured damage: how many units each layer loses, chosen from what removing
them costs the model after the refit.

For every pruned group (one kind of structure in one decoder layer) and a grid of removal
counts (:func:`removal_grid`), the group alone is pruned to that count and its consumer refit
(the ridge least squares of :mod:`minillm.blocks.reconstruct`, on the Gram of the consumer's
dense inputs over the whole calibration set); the refit's relative output error ``local`` comes
from the normal equations. One grid point per group, the one nearest removing ``at`` of each
partition, is also measured end to end: ``KL(dense || pruned)`` of the next-token
distributions, in nats per token, on the first ``subset`` calibration sequences. The other
points' damage is that KL scaled by their relative error (the curve's shape from the whole
calibration set, its scale, which differs between layers and kinds, measured).

It is one sweep of the block loop: block ``i`` computes the Grams of its consumers on the
calibration hidden states, then each of its groups' probe (its consumer refit in place) runs on
the subset's hidden states and becomes a *stream* that every later block runs, dense; at the
LM head each stream's KL to the dense subset stream is taken, the dense log-probabilities
computed once per chunk of positions. Streams wait in a
:class:`~minillm.blocks.loop.HiddenStore` (on disk with ``spill``), so memory is that of the
refit: calibration hidden states, one Gram per consumer of a block, one micro-batch of a stream;
a streamed model loads each block once.

:func:`allocate` picks one grid point per group minimizing the summed damage with the removed
parameters as close to the budget as the grid allows: an exact dynamic program over parameter
counts; heads and channels compete for the same budget. Which units a grid point removes: the
lowest scores per partition (the criterion's; FLAP's from the same Grams when none are given).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minillm.blocks import distributed
from minillm.blocks.loop import BlockSource, Boundary, HiddenStore, capture, resident, run_block
from minillm.blocks.reconstruct import Gram, _augmented, solve_refit
from minillm.model.adapters import Adapter, Group

log = logging.getLogger("minillm")
Key = tuple[int, str]
KL_STREAMS = 8  # probe streams compared with the dense one at a time (one micro-batch each)
KL_CHUNK = 32  # positions whose log-probabilities exist at a time (64: +27 MiB of peak)


@dataclass
class Option:
    """One grid point of a group: ``removed`` units per partition, the ``params`` that removes,
    its ``damage`` (nats per token), the refit's relative output error ``local``
    (``||W X - W' X_K||^2 / ||W X||^2`` over the calibration set) and the end-to-end KL
    ``measured`` where it was measured (NaN elsewhere)."""

    removed: int
    params: int
    damage: float = 0.0
    local: float = 0.0
    measured: float = math.nan


@dataclass
class DamageTable:
    """Grid points per group ``(layer, kind)`` (``removed`` ascending, the first removes none)
    and the order in which each group's units go (``order[key][p]``: unit ids of partition
    ``p``, first removed first)."""

    options: dict[Key, list[Option]] = field(default_factory=dict)
    order: dict[Key, torch.Tensor] = field(default_factory=dict)


def removal_grid(group: Group, steps: int) -> list[int]:
    """Units removed per partition at the fractions ``0, 1/steps, ..., (steps-1)/steps`` of a
    partition (rounded, distinct; every partition keeps at least one unit)."""
    per = group.n_units // group.partitions
    return sorted({min(round(k * per / steps), per - 1) for k in range(steps)})


def probe_point(grid: list[int], per: int, at: float) -> int | None:
    """The grid point (removed units per partition) nearest ``at * per``, ties up; not 0
    (None when the grid removes nothing: one unit per partition)."""
    return min(grid[1:], key=lambda r: (abs(r - at * per), -r), default=None)


def score_order(group: Group, score: torch.Tensor) -> torch.Tensor:
    """Units of each partition, lowest score first: ``[partitions, per]`` unit ids."""
    per = group.n_units // group.partitions
    order = score.detach().cpu().double().view(group.partitions, per).argsort(dim=1)
    return order + torch.arange(group.partitions)[:, None] * per


def kept_units(order: torch.Tensor, removed: int) -> torch.Tensor:
    """Kept unit ids (sorted) when each partition loses its first ``removed`` of ``order``."""
    return order[:, removed:].reshape(-1).sort().values


def flap_from_gram(weight: torch.Tensor, gram: Gram, block: int) -> torch.Tensor:
    """FLAP's fluctuation ``sum_{j in u} Var(X_j) ||W_:,j||^2`` per unit from the consumer's
    Gram (the statistics the ``flap`` criterion reduces): ``[n_units]``."""
    mean = gram.xsum / gram.count
    var = (gram.xtx.diagonal() / gram.count - mean.pow(2)).clamp_min(0)
    return (var * weight.double().pow(2).sum(0)).view(-1, block).sum(1).float()


class GroupFit:
    """Refits of one consumer ``y = W x + b`` for many kept column sets from one Gram: ``G W^T``
    is formed once, so each set costs its system's factorization and solve; the relative
    output error comes from the normal equations (no ``[in, in]`` product per set)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram) -> None:
        weight, bias = weight.detach(), bias.detach() if bias is not None else None
        self.weight, self.bias, self.gram = weight, bias, gram
        w_t = weight.t().double()
        self.p = gram.xtx @ w_t  # [in, out]
        self.s = gram.xsum @ w_t  # [out]
        self.e0 = float((w_t * self.p).sum())  # ||W X||^2
        self.energy = self.e0
        if bias is not None:
            b = bias.double()
            self.energy += 2 * float(b @ self.s) + gram.count * float(b @ b)

    def fit(self, cols: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(refit weight [out, k], refit bias [out], relative error)`` for columns ``cols``."""
        k = cols.numel()
        rhs = torch.empty(k + 1, self.p.shape[1], dtype=torch.float64, device=self.p.device)
        rhs[:k], rhs[k] = self.p[cols], self.s
        info: dict = {}
        weight, bias = solve_refit(
            _augmented(self.gram, cols), rhs, self.weight, self.bias, cols, ridge, info
        )
        # the solve left rhs = R + lam [W_K^T; 0] for (A + lam I_K) sol = rhs, so the residual
        # ||W X - W' X_K - c||^2 = E0 - <sol, rhs> + 2 lam <W'_K, W_K> - lam ||W'_K||^2
        sol_k = weight.t()
        shift = bias - (self.bias.double() if self.bias is not None else 0.0)
        w_k = self.weight[:, cols].t().double()
        err = (
            self.e0
            - float((sol_k * rhs[:k]).sum())
            - float(shift @ rhs[k])
            + info["lam"] * (2 * float((sol_k * w_k).sum()) - float(sol_k.pow(2).sum()))
        )
        return weight, bias, max(err, 0.0) / max(self.energy, 1e-30)


@contextmanager
def refit_in_place(lin: nn.Linear, cols: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """``lin`` as if its input columns outside ``cols`` were removed and the rest refit to
    ``weight`` ``[out, k]``, ``bias`` ``[out]`` (removed columns zeroed: exactly the surgery);
    restored on exit."""
    saved_w, saved_b = lin.weight.data.clone(), lin.bias
    try:
        lin.weight.data.zero_()
        lin.weight.data[:, cols] = weight.to(lin.weight.dtype)
        lin.bias = nn.Parameter(bias.to(lin.weight.dtype), requires_grad=False)
        yield
    finally:
        lin.weight.data.copy_(saved_w)
        lin.bias = saved_b


def layer_grams(
    block: nn.Module, linears: list[nn.Linear], boundary: Boundary
) -> tuple[list[Gram], list[torch.Tensor]]:
    """Gram statistics of the inputs of ``linears`` and the block's outputs, from one run of
    the dense ``block`` on every micro-batch of ``boundary`` (all-reduced under torchrun)."""
    grams = []
    for lin in linears:
        n, dev = lin.in_features, lin.weight.device
        zeros = torch.zeros(n, n, dtype=torch.float64, device=dev)
        grams.append(Gram(zeros, torch.zeros(n, dtype=torch.float64, device=dev)))
    handles = [
        lin.register_forward_pre_hook(lambda m, args, gram=gram: gram.add(args[0]))
        for lin, gram in zip(linears, grams, strict=True)
    ]
    try:
        out = run_block(block, boundary)
    finally:
        for h in handles:
            h.remove()
    for gram in grams:
        distributed.all_reduce_gram(gram)
    return grams, out


def _probe(
    table: DamageTable,
    group: Group,
    gram: Gram,
    scores: dict[Key, torch.Tensor] | None,
    steps: int,
    at: float,
    ridge: float,
) -> tuple[Key, int, tuple] | None:
    """Fill ``table``'s order and grid points of ``group`` (relative refit errors from its
    consumer's ``gram``); returns ``(key, probe point, (cols, weight, bias) of its refit)``,
    or None when the group cannot lose a unit."""
    key, consumer = (group.layer, group.kind), group.consumers[0]
    lin = consumer.linear
    score = scores[key] if scores is not None else flap_from_gram(lin.weight, gram, consumer.size)
    order = table.order[key] = score_order(group, score)
    grid = removal_grid(group, steps)
    probe = probe_point(grid, group.n_units // group.partitions, at)
    table.options[key] = [Option(0, 0)]
    if probe is None:
        return None
    fitter = GroupFit(lin.weight, lin.bias, gram)
    for r in grid[1:]:
        cols = consumer.indices(kept_units(order, r).to(lin.weight.device))
        weight, bias, err = fitter.fit(cols, ridge)
        table.options[key].append(Option(r, r * group.partitions * group.unit_params(), local=err))
        if r == probe:
            refit = (cols, weight, bias)
    return key, probe, refit


@torch.no_grad()
def measure_damage(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    groups: list[Group],
    scores: dict[Key, torch.Tensor] | None = None,
    *,
    steps: int = 8,
    subset: int = 8,
    at: float = 0.5,
    batch_size: int = 8,
    ridge: float = 0.1,
    spill: bool = True,
    source: BlockSource | None = None,
) -> DamageTable:
    """The damage table of ``groups`` (see the module docstring).

    ``tokens`` ``[n, seqlen]``: this rank's calibration rows (the Grams use all of them, the KL
    the first ``subset`` rows of the whole set). ``scores``: the order of each group's units
    (None: FLAP's, from the consumer Gram).
    """
    blocks = adapter.layers(model)
    by_layer: dict[int, list[Group]] = {}
    for g in groups:
        if len(g.consumers) != 1:
            raise ValueError(f"damage: {g.kind} of layer {g.layer} need exactly one consumer")
        by_layer.setdefault(g.layer, []).append(g)
    first = distributed.first_row(tokens.shape[0])
    mine = tokens[: max(0, min(tokens.shape[0], subset - first))]  # this rank's share
    boundary = capture(model, adapter, tokens, batch_size, source)
    reference = capture(model, adapter, mine, batch_size, source) if mine.numel() else None
    table, probes, top = DamageTable(), [], max(by_layer)
    with HiddenStore(spill) as store:
        for i, block in enumerate(blocks):
            with resident(source, i):
                sub = reference.at(i) if reference is not None else None
                if sub is not None:  # the earlier probes' streams run this block, dense
                    for p in range(len(probes)):
                        hidden = list(store.take(p, sub.hidden[0].device))
                        store.put(p, run_block(block, sub.with_hidden(hidden)))
                if i in by_layer:
                    grams, out = layer_grams(
                        block, [g.consumers[0].linear for g in by_layer[i]], boundary.at(i)
                    )
                    for g, gram in zip(by_layer[i], grams, strict=True):
                        found = _probe(table, g, gram, scores, steps, at, ridge)
                        if found is None:
                            continue
                        probes.append(found)
                        if sub is not None:
                            cols, weight, bias = probes[-1][2]
                            with refit_in_place(g.consumers[0].linear, cols, weight, bias):
                                store.put(len(probes) - 1, run_block(block, sub))
                    del grams
                    boundary = boundary.with_hidden(out)
                elif i < top:
                    boundary = boundary.with_hidden(run_block(block, boundary.at(i)))
                if sub is not None:
                    reference = reference.with_hidden(run_block(block, sub))
        with resident(source, "head"):
            kls = _stream_kls(model, adapter, reference, store, len(probes))
    for (key, r, _), kl in zip(probes, kls, strict=True):
        _scale(table.options[key], r, kl)
        log.info(
            "damage: layer %d %s: %s",
            *key,
            " ".join(f"{o.removed}:{o.damage:.4f}" for o in table.options[key][1:]),
        )
    return table


def _stream_kls(
    model, adapter: Adapter, reference: Boundary | None, store: HiddenStore, n: int
) -> list[float]:
    """Mean ``KL(reference || stream p)`` per position (nats) for the ``n`` streams of
    ``store``, summed over ranks. ``KL_STREAMS`` streams are held at a time, each against the
    dense log-probabilities of ``KL_CHUNK`` positions at a time."""
    totals = torch.zeros(n + 1, dtype=torch.float64)  # the last entry counts positions
    if reference is not None:
        norm, head = adapter.final_norm(model), model.get_output_embeddings()
        for j, ref in enumerate(reference.hidden):
            b, t, _ = ref.shape
            step = max(1, KL_CHUNK // b)
            ref_n = norm(ref)
            for first in range(0, n, KL_STREAMS):
                ids = range(first, min(n, first + KL_STREAMS))
                streams = [norm(store.get(p, j, ref.device)) for p in ids]
                for s in range(0, t, step):
                    lp_ref = F.log_softmax(head(ref_n[:, s : s + step]).float(), -1)
                    p_ref = lp_ref.exp()
                    for p, out in zip(ids, streams, strict=True):
                        lp = F.log_softmax(head(out[:, s : s + step]).float(), -1)
                        totals[p] += float((p_ref * (lp_ref - lp)).sum())
            totals[n] += b * t
    distributed.all_reduce_sum(totals)
    return (totals[:n] / totals[n].clamp_min(1)).tolist()


def _scale(options: list[Option], probe: int, kl: float) -> None:
    """The measured KL at grid point ``probe``; every other point's damage is its relative
    error times the probe's KL per unit of relative error."""
    ref = next(o for o in options if o.removed == probe)
    ref.measured = kl
    factor = kl / max(ref.local, 1e-30)
    for o in options[1:]:
        o.damage = o.local * factor


def allocate(
    options: dict[Key, list[Option]], budget: int, resolution: int = 4096
) -> dict[Key, Option]:
    """One grid point per group minimizing the summed ``damage``, with the removed parameters
    as close to ``budget`` as the grid allows (ties: least damage).

    An exact dynamic program over parameter counts in units of their greatest common divisor;
    where that makes more than ``resolution`` budget steps, counts are rounded to
    ``budget / resolution`` (the budget is then met to that resolution). ValueError if the
    grid cannot remove ``budget`` parameters.
    """
    keys = list(options)
    most = sum(max(o.params for o in options[k]) for k in keys)
    if budget > most:
        raise ValueError(
            f"--ratio: the pruned layers can lose at most {most:,} parameters (one unit of "
            f"each partition kept), fewer than the {budget:,} asked; lower --ratio or widen "
            "--layers"
        )
    unit = 0
    for k in keys:
        for o in options[k]:
            unit = math.gcd(unit, o.params)
    unit = max(unit, math.ceil(budget / resolution), 1)

    def steps(o: Option) -> int:
        return round(o.params / unit)

    cap = sum(max(steps(o) for o in options[k]) for k in keys)
    best = [math.inf] * (cap + 1)  # least damage spending exactly b steps on the groups so far
    best[0] = 0.0
    choices: list[list[int]] = []  # per group: the option index chosen at each total
    reach = 0
    for k in keys:
        new, pick = [math.inf] * (cap + 1), [-1] * (cap + 1)
        for b in range(reach + 1):
            if best[b] == math.inf:
                continue
            for oi, o in enumerate(options[k]):
                nb, d = b + steps(o), best[b] + o.damage
                if d < new[nb]:
                    new[nb], pick[nb] = d, oi
        reach += max(steps(o) for o in options[k])
        best = new
        choices.append(pick)
    target = round(budget / unit)
    reachable = [b for b in range(cap + 1) if best[b] < math.inf]
    total = min(reachable, key=lambda b: (abs(b - target), best[b]))
    chosen: dict[Key, Option] = {}
    for k, pick in zip(reversed(keys), reversed(choices), strict=True):
        chosen[k] = options[k][pick[total]]
        total -= steps(chosen[k])
    return dict(sorted(chosen.items()))


def keep_from_allocation(
    groups: list[Group], order: dict[Key, torch.Tensor], chosen: dict[Key, Option]
) -> dict[Key, torch.Tensor]:
    """Kept units per group: each partition loses the first ``chosen[key].removed`` of its
    removal ``order``."""
    return {
        (g.layer, g.kind): kept_units(order[(g.layer, g.kind)], chosen[(g.layer, g.kind)].removed)
        for g in groups
    }


def scores_from_order(order: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
    """Scores that rank each group's units as its removal ``order`` does (first removed
    lowest), for the steps that need scores (``--round-to``)."""
    out = {}
    for key, o in order.items():
        s = torch.empty(o.numel())
        s[o.reshape(-1)] = torch.arange(o.shape[1], dtype=torch.float32).repeat(o.shape[0])
        out[key] = s
    return out
