"""Importance criteria: each maps a group's units to scores (higher = more important).

A criterion is a function ``(ctx: ScoringContext) -> {(layer, kind): Tensor[n_units]}``.
A unit's weights are its producer rows and consumer columns (:mod:`minillm.model.adapters.base`);
``X_j`` is input feature ``j`` of a weight's linear over all calibration tokens, ``G = dL/dW``
for ``L`` the mean next-token loss of the calibration sequences.

* ``magnitude``: ``sqrt(sum_u W_ij**2)``.
* ``wanda-sp``: ``A_u = sum_{(i,j) in u} |W_ij| * ||X_j||_2``.
* ``flap``: ``sum_{j in consumer cols of u} Var(X_j) * ||W_:,j||**2``; compare across layers
  with ``normalize="standardize"`` (:func:`global_normalization`); optional bias compensation
  :func:`compensate`.
* ``taylor`` (backprop): ``sum_{(i,j) in u} |W_ij * G_ij|`` (LLM-Pruner, element-wise, first order).
* ``fms`` (MINI-LLM feature map sensitivity), per weight ``|W_ij| * ||X_j||_2 * |G_ij|``:

  - ``fms_variant="weight"`` (default, paper-faithful): ``S_u = sum_{(i,j) in u} |W_ij| ||X_j||
    |G_ij|`` with ``G`` per weight (SPSA over all weights, or backprop). Measured on SmolLM2
    (BENCHMARKS.md, Scoring) it is the best forward-only variant, though its SPSA ``G`` carries
    little signal: it ranks like ``wanda-sp``;
  - ``fms_variant="unit"``: the gradient at unit resolution, ``g_u = dL/dm_u`` of a multiplier
    of the unit's output (``= sum_{consumer cols of u} W_ij G_ij``): ``S_u = A_u * |g_u|``;
  - ``fms_variant="layer"``: the gradient at the resolution SPSA resolves, one
    multiplier per group: ``S_u = A_u / mean_v(A_v) * (|g_l| / mean_l'(|g_l'|)) ** alpha``, the
    mean over the groups of the same kind. Within a layer it ranks like ``wanda-sp``; across
    layers the gradient sets how much each layer keeps (compare with ``normalize="none"``).
  - ``fms_variant="removal"``: the layer factor from a secant instead of a tangent: ``D_l``, the
    loss increase of removing group ``l``'s lowest-``A`` units (fraction ``options["ratio"]``,
    default 0.2), estimated by SPSA whose perturbation is that removal in random halves of
    the groups (:func:`minillm.scoring.spsa.spsa_multipliers` with ``candidates``):
    ``S_u = A_u / mean_v(A_v) * (max(D_l, 0.1 mean|D|) / mean_l'(...)) ** alpha``.

  ``gradients="spsa"`` (default) estimates ``g`` from forward passes (:mod:`minillm.scoring.spsa`);
  ``gradients="backprop"`` computes it exactly (:mod:`minillm.scoring.gradients`; for ``removal``,
  which has no gradient, the exact one-group-at-a-time measurement).

Options read from ``ctx.options`` (defaults in :data:`DEFAULT_OPTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from minillm.kernels import ops
from minillm.model.adapters import Adapter, Block, Group
from minillm.scoring import gradients as exact
from minillm.scoring import spsa
from minillm.scoring.stats import InputStats, model_input_stats

Scores = dict[tuple[int, str], torch.Tensor]

DEFAULT_OPTIONS = {
    "batch_size": 8,  # sequences per statistics forward; SPSA/backprop use half (± doubles it)
    "gradients": "spsa",  # fms: "spsa" (forward only) or "backprop"
    "fms_variant": "weight",  # fms: "weight" (paper-faithful), "layer", "removal" or "unit"
    "fms_alpha": 0.5,  # fms layer/removal variants: exponent of the layer factor
    "perturbations": 4,  # rounds K over the calibration set
    "eps": None,  # None: 1e-2 (relative, multipliers) or 1e-3 (weight units, per weight)
    "dist": "rademacher",  # or "gaussian"
    "spsa_sharing": None,  # None: "sequence" (multipliers) or "global" (per weight)
    "spill": True,  # exact gradients: block inputs on disk (False: in memory, grows with depth)
}


@dataclass
class ScoringContext:
    """Everything a criterion may use; counters are updated by criteria that run the model.

    ``batches`` is calibration token ids ``[n_samples, seqlen]``. ``cache`` holds what one
    criterion computed for another step (the input statistics, used by :func:`compensate`).
    ``source``: where decoder blocks come from when the model is not resident (a block
    source of :mod:`minillm.blocks.loop`; used by the block-by-block exact gradients).
    ``checkpoint``: where those gradients save their progress (a streamed run's
    :class:`~minillm.blocks.resume.ResumeState`), or None.
    """

    model: nn.Module
    adapter: Adapter
    groups: list[Group]
    batches: torch.Tensor
    seed: int = 0
    options: dict = field(default_factory=dict)
    forward_passes: int = 0
    tokens_forwarded: int = 0
    cache: dict = field(default_factory=dict)
    source: object = None
    checkpoint: object = None

    def option(self, name: str):
        return self.options.get(name, DEFAULT_OPTIONS[name])

    def count(self, passes: int, sequences_per_pass_factor: int = 1) -> None:
        """Add ``passes`` forwards covering the calibration set ``sequences_per_pass_factor``x."""
        self.forward_passes += passes
        self.tokens_forwarded += self.batches.numel() * sequences_per_pass_factor


def linears_of(groups: list[Group]) -> list[nn.Linear]:
    """Every producer and consumer linear of ``groups``, once each, in order (tensor ids)."""
    return list(dict.fromkeys(b.linear for g in groups for b in g.producers + g.consumers))


def input_stats(ctx: ScoringContext) -> dict[nn.Linear, InputStats]:
    """Input statistics of every producer and consumer linear (one calibration pass, cached)."""
    if "stats" not in ctx.cache:
        stats, passes = model_input_stats(
            ctx.model, linears_of(ctx.groups), ctx.batches, ctx.option("batch_size")
        )
        ctx.count(passes)
        ctx.cache["stats"] = stats
    return ctx.cache["stats"]


def _unit_sum(block: Block, per_weight: torch.Tensor) -> torch.Tensor:
    """Sum of ``per_weight`` ``[out, in]`` over each unit's rows or columns: ``[n_units]``."""
    return per_weight.sum(1 - block.dim).view(-1, block.size).sum(1)


def _group_sum(g: Group, per_weight: Callable[[Block], torch.Tensor], consumers_only=False):
    blocks = g.consumers if consumers_only else g.producers + g.consumers
    return sum(_unit_sum(b, per_weight(b)) for b in blocks)


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


def wanda_sp(ctx: ScoringContext) -> Scores:
    """``A_u = sum_{(i,j) in u} |W_ij| * ||X_j||_2`` (structured Wanda)."""
    stats = input_stats(ctx)
    return {
        (g.layer, g.kind): _group_sum(
            g, lambda b: b.linear.weight.detach().float().abs() * stats[b.linear].norm
        )
        for g in ctx.groups
    }


def flap(ctx: ScoringContext) -> Scores:
    """FLAP fluctuation: ``sum_{j in consumer cols of u} Var(X_j) * ||W_:,j||**2``."""
    stats = input_stats(ctx)
    return {
        (g.layer, g.kind): _group_sum(
            g,
            lambda b: b.linear.weight.detach().float().pow(2) * stats[b.linear].var,
            consumers_only=True,
        )
        for g in ctx.groups
    }


def _exact_sums(ctx: ScoringContext, per_weight) -> dict:
    """Row and column sums of ``per_weight(W, G, stats)`` ``[out, in]`` for every linear, with
    ``G`` exact and block by block (:func:`minillm.scoring.gradients.weight_gradients`)."""

    def reduce(lin, grad, stats):
        s = per_weight(lin.weight.detach().float(), grad, stats)
        return s.sum(1), s.sum(0)

    sums, passes, stats = exact.weight_gradients(
        ctx.model,
        linears_of(ctx.groups),
        ctx.batches,
        max(1, ctx.option("batch_size") // 2),
        reduce=reduce,
        spill=ctx.option("spill"),
        source=ctx.source,
        checkpoint=ctx.checkpoint,
    )
    ctx.count(passes)
    ctx.cache.setdefault("stats", stats)
    return sums


def _scores_from_sums(groups: list[Group], sums: dict) -> Scores:
    """Unit scores from per-linear ``(row sums [out], column sums [in])``."""
    return {
        (g.layer, g.kind): sum(
            sums[b.linear][b.dim].view(-1, b.size).sum(1) for b in g.producers + g.consumers
        )
        for g in groups
    }


def taylor(ctx: ScoringContext) -> Scores:
    """First-order Taylor by backprop: ``sum_{(i,j) in u} |W_ij * G_ij|``."""
    sums = _exact_sums(ctx, lambda w, g, st: (w * g).abs())
    return _scores_from_sums(ctx.groups, sums)


def fms(ctx: ScoringContext) -> Scores:
    """MINI-LLM feature map sensitivity; formulas and variants in the module docstring."""
    variant = ctx.option("fms_variant")
    if variant == "weight":
        return _fms_weight(ctx)
    if variant not in (*spsa.RESOLUTIONS, "removal"):
        raise ValueError(f"fms_variant must be weight, unit, layer or removal, got {variant!r}")
    a = wanda_sp(ctx)
    if variant == "removal":
        return _fms_removal(ctx, a)
    return fms_from_multipliers(ctx, a, _multiplier_gradients(ctx, variant), variant)


def fms_from_multipliers(
    ctx: ScoringContext, a: Scores, grads: list[torch.Tensor], variant: str
) -> Scores:
    """FMS of the ``unit``/``layer`` variants from the activation scores ``a`` (wanda-sp) and
    ``grads[i]`` ``[n_coords]``, ``dL/dm`` of ``ctx.groups[i]``'s multipliers."""
    if variant == "unit":
        return {
            (g.layer, g.kind): a[(g.layer, g.kind)] * grads[i].abs()
            for i, g in enumerate(ctx.groups)
        }
    return _tilted(ctx, a, torch.stack([g.abs().sum() for g in grads]))


def _tilted(ctx: ScoringContext, a: Scores, sens: torch.Tensor) -> Scores:
    """``A_u / mean(A) * (sens_l / mean sens) ** alpha``, the mean over groups of one kind."""
    scores = {}
    for kind in {g.kind for g in ctx.groups}:
        idx = [i for i, g in enumerate(ctx.groups) if g.kind == kind]
        f = (sens[idx] / sens[idx].mean().clamp_min(1e-30)).pow(ctx.option("fms_alpha"))
        for i, fi in zip(idx, f, strict=True):
            key = (ctx.groups[i].layer, kind)
            scores[key] = a[key] / a[key].mean().clamp_min(1e-30) * fi
    return scores


def _fms_removal(ctx: ScoringContext, a: Scores) -> Scores:
    """Layer factor from the loss increase of removing each group's lowest-``A`` units."""
    frac = ctx.options.get("ratio", 0.2)
    cands = []
    for g in ctx.groups:
        s = a[(g.layer, g.kind)]
        cands.append(s <= s.kthvalue(max(1, round(frac * g.n_units))).values)
    if ctx.option("gradients") == "backprop":  # no gradient of a finite removal: exact sweep
        damage, passes = spsa.removal_damage(
            ctx.model, ctx.groups, ctx.batches, cands, ctx.option("batch_size")
        )
        ctx.count(passes, len(ctx.groups) + 1)
        sens = damage
    else:
        kw = spsa_options(ctx, per_weight=False)
        est, passes = spsa.spsa_multipliers(
            ctx.model, ctx.groups, ctx.batches, resolution="layer", candidates=cands, **kw
        )
        ctx.count(passes, 2 * kw["n_perturbations"])
        ctx.cache["spsa_estimate"] = est
        sens = torch.cat([spsa.multiplier_gradient(est, i, 1) for i in range(len(ctx.groups))])
    return _tilted(ctx, a, sens.clamp_min(0.1 * sens.abs().mean()))  # noise can make D < 0


def spsa_options(ctx: ScoringContext, per_weight: bool) -> dict:
    """Keyword arguments of the SPSA estimators from ``ctx``'s options (per weight or not)."""
    eps, sharing = ctx.option("eps"), ctx.option("spsa_sharing")
    return dict(
        n_perturbations=ctx.option("perturbations"),
        eps=eps if eps is not None else (1e-3 if per_weight else 1e-2),
        dist=ctx.option("dist"),
        seed=ctx.seed,
        sharing=sharing if sharing is not None else ("global" if per_weight else "sequence"),
        batch_size=max(1, ctx.option("batch_size") // 2),
    )


def _multiplier_gradients(ctx: ScoringContext, resolution: str) -> list[torch.Tensor]:
    half = max(1, ctx.option("batch_size") // 2)
    if ctx.option("gradients") == "backprop":
        grads, passes = exact.multiplier_gradients(
            ctx.model, ctx.groups, ctx.batches, resolution, half
        )
        ctx.count(passes)
        return grads
    kw = spsa_options(ctx, per_weight=False)
    est, passes = spsa.spsa_multipliers(
        ctx.model, ctx.groups, ctx.batches, resolution=resolution, **kw
    )
    ctx.count(passes, 2 * kw["n_perturbations"])
    ctx.cache["spsa_estimate"] = est
    return [
        spsa.multiplier_gradient(est, i, spsa.n_coords(g, resolution), kw["dist"])
        for i, g in enumerate(ctx.groups)
    ]


def _fms_weight(ctx: ScoringContext) -> Scores:
    if ctx.option("gradients") == "backprop":
        sums = _exact_sums(ctx, lambda w, g, st: w.abs() * st.norm * g.abs())
        return _scores_from_sums(ctx.groups, sums)
    stats = input_stats(ctx)
    linears = linears_of(ctx.groups)
    kw = spsa_options(ctx, per_weight=True)
    est, passes = spsa.spsa_weights(ctx.model, list(enumerate(linears)), ctx.batches, **kw)
    ctx.count(passes, 2 * kw["n_perturbations"])
    ctx.cache["spsa_estimate"] = est
    return fms_weight_scores(ctx.groups, dict(enumerate(linears)), stats, est, kw["dist"])


def fms_weight_scores(
    groups: list[Group],
    linears: dict[int, nn.Linear],
    stats: dict[nn.Linear, InputStats],
    estimate: spsa.Estimate,
    dist: str,
) -> Scores:
    """FMS of the ``weight`` variant for ``groups`` from a per-weight SPSA ``estimate`` whose
    tensor ids are the keys of ``linears`` (every producer and consumer of ``groups``)."""
    seeds, coeffs = [s for s, _ in estimate], [c for _, c in estimate]
    sums = {
        lin: ops.fms_scores(lin.weight.detach(), stats[lin].norm, seeds, coeffs, tid, dist)
        for tid, lin in linears.items()
    }
    return _scores_from_sums(groups, sums)


@torch.no_grad()
def compensate(ctx: ScoringContext, keep: dict[tuple[int, str], torch.Tensor]) -> int:
    """FLAP bias compensation; call **before** the surgery (it needs the removed columns).

    For each consumer, ``bias += W[:, removed] @ mean(X[removed])`` so the layer's output keeps
    the mean contribution of the removed units; a zero bias is added where the linear has none.
    Returns the number of linears whose bias was created.
    """
    stats = input_stats(ctx)
    created = 0
    for g in ctx.groups:
        kept = torch.zeros(g.n_units, dtype=torch.bool)
        kept[keep[(g.layer, g.kind)]] = True
        removed = (~kept).nonzero().flatten()
        if removed.numel() == 0:
            continue
        for b in g.consumers:
            lin = b.linear
            cols = b.indices(removed)
            delta = lin.weight[:, cols].float() @ stats[lin].mean[cols]
            if lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                )
                created += 1
            lin.bias += delta.to(lin.bias.dtype)
    return created


def global_normalization(criterion: str, options: dict | None = None) -> str:
    """The ``normalize`` argument of :func:`~minillm.scoring.allocation.global_ranking` for a
    criterion.

    FLAP standardizes per group; the ``fms`` layer and removal variants are comparable as they
    are (their layer factor is the point); every other criterion is divided by its group mean.
    """
    options = options or {}
    if criterion == "flap":
        return "standardize"
    if criterion == "fms" and options.get("fms_variant", DEFAULT_OPTIONS["fms_variant"]) in (
        "layer",
        "removal",
    ):
        return "none"
    return "mean"


CRITERIA: dict[str, Callable[[ScoringContext], Scores]] = {
    "random": random,
    "magnitude": magnitude,
    "wanda-sp": wanda_sp,
    "flap": flap,
    "taylor": taylor,
    "fms": fms,
}
