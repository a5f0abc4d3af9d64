"""Scores of every group, computed through the block loop whatever holds the model.

:func:`score` runs the calibration hidden states block by block (:mod:`minillm.blocks.loop`)
over a model that is resident (``source=None``) or streamed from its checkpoint (a
:class:`~minillm.blocks.streaming.StreamedModel`):

* ``magnitude``, ``wanda-sp``, ``flap``: each pruned block's input statistics are reduced
  while it runs on the hidden states of every calibration sequence, and its groups are scored
  right away; blocks above the last pruned one are never run. ``magnitude`` runs nothing
  unless ``compensate`` needs the statistics;
* ``taylor``: exact gradients block by block (:func:`minillm.scoring.gradients.weight_gradients`);
* ``fms`` with SPSA and the ``weight``, ``unit`` or ``layer`` variant: the statistics sweep,
  then the SPSA passes as streams through every block
  (:func:`minillm.scoring.spsa.spsa_by_block`), then for ``weight`` each pruned block again
  for its scores; ``random`` runs nothing.
* ``fms`` with ``--gradients backprop`` or ``--fms-variant removal`` needs the whole model at
  once (:func:`minillm.scoring.criteria.fms`): only a resident, single-process run offers it
  (:func:`minillm.pipeline.check_source` says so in one line otherwise).

With a :class:`~minillm.blocks.resume.ResumeState` the statistics sweep checkpoints its state
after every block and continues from a saved one. Under torchrun every rank holds its share of
the calibration rows; statistics, Gram matrices and gradients are all-reduced, so every rank
computes the same scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import torch
from torch import nn

from minillm.blocks import distributed
from minillm.blocks.loop import BlockSource, capture, resident, run_block, sweep
from minillm.blocks.resume import ResumeState
from minillm.config import PruneConfig
from minillm.model.adapters import Group, adapter_for
from minillm.scoring import spsa
from minillm.scoring.criteria import (
    CRITERIA,
    Scores,
    ScoringContext,
    fms_from_multipliers,
    fms_weight_scores,
    linears_of,
    spsa_options,
    wanda_sp,
)
from minillm.scoring.stats import InputStats, collected_stats

log = logging.getLogger("minillm")
BLOCK_CRITERIA = ("magnitude", "wanda-sp", "flap")  # a layer's scores need only its block
BLOCK_FMS = ("weight", "unit", "layer")  # fms variants with a block-by-block SPSA


def whole_model_fms(cfg: PruneConfig) -> bool:
    """Whether ``cfg`` asks for an ``fms`` estimate that needs the whole model at once."""
    return cfg.criterion == "fms" and (cfg.fms_variant not in BLOCK_FMS or cfg.gradients != "spsa")


def context(
    model: nn.Module,
    groups: list[Group],
    tokens: torch.Tensor,
    cfg: PruneConfig,
    source: BlockSource | None = None,
    resume: ResumeState | None = None,
) -> ScoringContext:
    """The :class:`ScoringContext` of a run: ``cfg``'s options, counters, caches."""
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    return ScoringContext(
        model,
        adapter_for(model),
        groups,
        tokens,
        cfg.seed,
        options=options,
        source=source,
        checkpoint=resume,
    )


def score(ctx: ScoringContext, cfg: PruneConfig) -> Scores:
    """Scores of every group of ``ctx`` (see module docstring); fills ``ctx.cache["stats"]``
    when the statistics were reduced (``compensate`` needs them). ``ctx.checkpoint``: where
    the sweeps save their state, or None."""
    resume = ctx.checkpoint
    if cfg.criterion == "fms" and not whole_model_fms(cfg):
        return _fms_by_block(ctx, cfg, resume)
    if cfg.criterion not in BLOCK_CRITERIA:  # random, taylor, whole-model fms
        scores = CRITERIA[cfg.criterion](ctx)
        if cfg.compensate and "stats" not in ctx.cache:
            ctx.cache["stats"], _ = block_stats(ctx, cfg, None, resume)
        return scores

    def block_scores(block_ctx: ScoringContext) -> Scores:
        return CRITERIA[cfg.criterion](block_ctx)

    if cfg.criterion == "magnitude" and not cfg.compensate:  # no forward: nothing to resume
        scores: Scores = {}
        for layer in sorted({g.layer for g in ctx.groups}):
            with resident(ctx.source, layer):
                groups = _block_groups(ctx, layer, cfg)
                scores.update(block_scores(replace(ctx, groups=groups, cache={})))
        return scores
    ctx.cache["stats"], scores = block_stats(ctx, cfg, block_scores, resume)
    return scores


def _block_groups(ctx: ScoringContext, layer: int, cfg: PruneConfig) -> list[Group]:
    groups = ctx.adapter.groups(ctx.model, layer, cfg.gqa)
    return [groups[k] for k in cfg.kinds]


def _fms_by_block(ctx: ScoringContext, cfg: PruneConfig, resume: ResumeState | None) -> Scores:
    """``fms`` in three sweeps: the statistics and wanda-sp scores of the pruned blocks
    (resumable), the SPSA passes as streams through every block, then for the ``weight``
    variant each pruned block again for its scores (the multiplier variants need no weights)."""
    variant = cfg.fms_variant
    stats, a = block_stats(ctx, cfg, wanda_sp, resume)
    ctx.cache["stats"] = stats
    per_weight = variant == "weight"
    kw = spsa_options(ctx, per_weight)
    rounds, half = kw.pop("n_perturbations"), kw.pop("batch_size")
    linears = dict(enumerate(linears_of(ctx.groups)))

    def make_pass(k: int, bi: int, i0: int, b: int) -> spsa.Pass:
        if per_weight:
            return spsa.weight_pass(list(linears.items()), k, bi, b, **kw)
        return spsa.multiplier_pass(ctx.groups, k, bi, i0, b, resolution=variant, **kw)

    estimate, passes = spsa.spsa_by_block(
        ctx.model,
        ctx.batches,
        make_pass,
        n_perturbations=rounds,
        batch_size=half,
        first_row=distributed.first_row(ctx.batches.shape[0]),
        source=ctx.source,
        spill=cfg.spill,
    )
    ctx.count(passes, 2 * rounds)
    if not per_weight:
        grads = [
            spsa.multiplier_gradient(estimate, gi, spsa.n_coords(g, variant), kw["dist"])
            for gi, g in enumerate(ctx.groups)
        ]
        for g in grads:
            distributed.all_reduce_sum(g)
        return fms_from_multipliers(ctx, a, grads, variant)
    # one seed per round on every rank: all-reduce the coefficients
    coeffs = torch.tensor([c for _, c in estimate], dtype=torch.float64)
    distributed.all_reduce_sum(coeffs)
    estimate = list(zip([s for s, _ in estimate], coeffs.tolist(), strict=True))
    scores: Scores = {}
    for layer in sorted({g.layer for g in ctx.groups}):
        with resident(ctx.source, layer):
            groups = _block_groups(ctx, layer, cfg)
            mine = set(linears_of(groups))
            block_linears = {tid: lin for tid, lin in linears.items() if lin in mine}
            scores.update(fms_weight_scores(groups, block_linears, stats, estimate, kw["dist"]))
    return scores


def block_stats(
    ctx: ScoringContext, cfg: PruneConfig, block_scores, resume: ResumeState | None = None
) -> tuple[dict[nn.Linear, InputStats], Scores]:
    """Run the calibration hidden states up to the last pruned block; returns the statistics of
    the pruned blocks' linears and the scores ``block_scores(block_ctx)`` returns while each
    pruned block is resident (None: no scores). With ``resume``, the state is checkpointed
    after every block and a checkpoint found there is continued from."""
    model, adapter, source = ctx.model, ctx.adapter, ctx.source
    layers = sorted({g.layer for g in ctx.groups})
    names = {m: n for n, m in model.named_modules()}
    all_stats: dict = {}
    scores: Scores = {}
    with torch.no_grad():
        boundary = capture(model, adapter, ctx.batches, cfg.batch_size, source)
    first = 0
    saved = resume.load() if resume is not None else None
    if saved is not None:
        done, tensors, meta = saved
        device = boundary.hidden[0].device
        boundary = boundary.with_hidden(
            [tensors[f"hidden.{j}"].to(device) for j in range(len(boundary.hidden))]
        )
        all_stats, scores = _unpack(model, tensors, meta)
        first = done + 1
        log.info("resuming after block %d from %s", done, resume.dir)

    def visit(i: int, inputs) -> list[torch.Tensor]:
        block = adapter.layers(model)[i]
        if i not in layers:
            out = run_block(block, inputs)
        else:
            groups = _block_groups(ctx, i, cfg)
            with collected_stats(linears_of(groups)) as stats:
                out = run_block(block, inputs)
            distributed.all_reduce_stats(stats)
            all_stats.update(stats)
            if block_scores is not None:
                scores.update(block_scores(replace(ctx, groups=groups, cache={"stats": stats})))
        if resume is not None:
            resume.save(i, *_pack(names, out, all_stats, scores))
        return out

    with torch.no_grad():
        sweep(model, adapter, boundary, range(first, layers[-1] + 1), visit, source=source)
    ctx.count(len(boundary.hidden))
    return all_stats, scores


def _pack(names: dict, hidden, stats, scores) -> tuple[dict, dict]:
    tensors = {f"hidden.{j}": h for j, h in enumerate(hidden)}
    counts = {}
    for lin, st in stats.items():
        name = names[lin]
        tensors[f"stats.{name}.sum_sq"], tensors[f"stats.{name}.sum"] = st.sum_sq, st.sum
        counts[name] = st.count
    for (layer, kind), sc in scores.items():
        tensors[f"scores.{layer}.{kind}"] = sc
    return tensors, {"counts": counts}


def _unpack(model: nn.Module, tensors: dict, meta: dict) -> tuple[dict, Scores]:
    modules = dict(model.named_modules())
    stats = {
        modules[name]: InputStats(tensors[f"stats.{name}.sum_sq"], tensors[f"stats.{name}.sum"], n)
        for name, n in meta["counts"].items()
    }
    scores = {}
    for key, t in tensors.items():
        if key.startswith("scores."):
            _, layer, kind = key.split(".")
            scores[(int(layer), kind)] = t
    return stats, scores
