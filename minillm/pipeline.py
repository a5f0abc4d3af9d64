"""The one orchestration of pruning: score → allocate → prune and refit, over the block loop.

Whatever holds the model, resident in memory (``source=None``: :func:`minillm.prune`, and the
command for a model that fits) or streamed one decoder block at a time from its checkpoint
(a :class:`~minillm.blocks.streaming.StreamedModel`, ``--offload``), the same three steps run:

1. :func:`score`: the criterion's unit scores through the block loop
   (:func:`minillm.scoring.sweep.score`);
2. :func:`allocate`: the kept units of every group. By default from measured damage: each
   group's loss after its refit at a grid of sparsities, and the sparsities that minimize the
   summed damage under the parameter budget (:mod:`minillm.scoring.damage`); or one ranking of
   scores per structure kind (``global``), or the same ratio in every layer (``uniform``).
   Counts rounded to ``round_to`` multiples;
3. :func:`apply`: bottom-up through the block loop, each pruned layer's units removed and its
   consumers refit on the calibration text as it reaches the layer through the pruned layers
   below (:func:`minillm.blocks.reconstruct.prune_sequential`), or FLAP's bias compensation and
   the slicing alone.

A :class:`Pruning` carries the state between the steps, so a caller can time or checkpoint
each; :func:`report` turns it into the report fields every run writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from minillm.blocks.loop import BlockSource, resident
from minillm.blocks.reconstruct import prune_sequential
from minillm.blocks.resume import ResumeState
from minillm.config import PruneConfig
from minillm.model.adapters import Adapter, Group, adapter_for
from minillm.model.surgery import count_params, layer_records, prune_layer
from minillm.scoring import allocation, damage, sweep
from minillm.scoring.criteria import Scores, ScoringContext, compensate

DATA_FREE_CRITERIA = ("random", "magnitude")  # these never look at calibration text


@dataclass
class Pruning:
    """A run in progress: the model, its pruned layers and groups, then scores and kept units.

    ``tokens`` are the calibration ids ``[n, seqlen]`` (this rank's rows under torchrun)."""

    model: nn.Module
    adapter: Adapter
    cfg: PruneConfig
    tokens: torch.Tensor
    layers: list[int]
    groups: list[Group]
    ctx: ScoringContext
    params_before: int
    source: BlockSource | None = None
    scores: Scores = field(default_factory=dict)
    keep: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def needs_calibration(cfg: PruneConfig) -> bool:
    """Whether the run reads calibration text (every criterion but random/magnitude, and
    every repair)."""
    return cfg.refit or cfg.compensate or cfg.criterion not in DATA_FREE_CRITERIA


def pruned_layers(cfg: PruneConfig, n_layers: int) -> list[int]:
    """``cfg.layers``; unset, every layer with the ``uniform`` allocation (so every layer keeps
    the same sizes, a plain architecture), else LLM-Pruner's range."""
    if cfg.layers is None and cfg.allocator == "uniform":
        return list(range(n_layers))
    return allocation.parse_layers(cfg.layers, n_layers)


def start(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: PruneConfig,
    source: BlockSource | None = None,
    resume: ResumeState | None = None,
) -> Pruning:
    """The pruned layers and their groups of ``model`` under ``cfg``; ValueError naming the
    flag when ``--layers`` or ``--round-to`` cannot apply to this model. ``resume``: where a
    streamed run checkpoints its scoring state."""
    adapter = adapter_for(model)
    layers = pruned_layers(cfg, len(adapter.layers(model)))
    groups = [adapter.groups(model, i, cfg.gqa)[k] for i in layers for k in cfg.kinds]
    allocation.check_multiples(groups, allocation.parse_round_to(cfg.round_to))
    ctx = sweep.context(model, groups, tokens, cfg, source, resume)
    return Pruning(model, adapter, cfg, tokens, layers, groups, ctx, count_params(model), source)


def score(job: Pruning) -> None:
    """Step 1: ``job.scores``, one ``[n_units]`` tensor per group (higher = more important).

    With the damage allocation, FLAP's scores come from the Gram matrices its sweep collects
    anyway (:func:`minillm.scoring.damage.flap_from_gram`): no pass here."""
    if job.cfg.allocator == "damage" and job.cfg.criterion == "flap":
        return
    job.scores = sweep.score(job.ctx, job.cfg)


def allocate(job: Pruning) -> None:
    """Step 2: ``job.keep``, the kept unit ids of every group."""
    cfg = job.cfg
    if cfg.allocator == "damage":
        keep = _damage_keep(job)
    else:
        keep = allocation.allocate(
            job.groups,
            job.scores,
            cfg.ratio,
            cfg.criterion,
            job.ctx.options,
            per_layer=cfg.allocator == "uniform",
            together=cfg.rank_together,
        )
    multiples = allocation.parse_round_to(cfg.round_to)
    if multiples:
        keep = allocation.round_to_multiples(job.groups, job.scores, keep, multiples)
    job.keep = keep


def _damage_keep(job: Pruning) -> dict[tuple[int, str], torch.Tensor]:
    """Kept units from the damage table (one more sweep), ``ratio`` of the pruned groups'
    parameters in one budget; fills ``job.scores`` from the table's order when empty."""
    cfg = job.cfg
    table = damage.measure_damage(
        job.model,
        job.adapter,
        job.tokens,
        job.groups,
        job.scores or None,
        steps=cfg.damage_steps,
        subset=cfg.damage_subset,
        at=cfg.damage_at,
        batch_size=cfg.batch_size,
        ridge=cfg.ridge,
        spill=cfg.spill,
        source=job.source,
    )
    job.ctx.count(-(-job.tokens.shape[0] // cfg.batch_size))  # the Gram sweep
    budget = round(cfg.ratio * allocation.prunable_params(job.groups))
    chosen = damage.allocate(table.options, budget)
    job.scores = job.scores or damage.scores_from_order(table.order)
    return damage.keep_from_allocation(job.groups, table.order, chosen)


@torch.no_grad()
def apply(job: Pruning) -> None:
    """Step 3: remove the units not kept, bottom-up, refitting their consumers (``refit``) or
    compensating their mean contribution (``compensate``); one block resident at a time."""
    cfg = job.cfg
    if cfg.refit:
        prune_sequential(
            job.model,
            job.adapter,
            job.tokens,
            job.keep,
            job.layers,
            cfg.gqa,
            cfg.batch_size,
            cfg.ridge,
            select=cfg.select,
            source=job.source,
        )
        return
    for i in job.layers:
        with resident(job.source, i):
            if cfg.compensate:
                groups = [g for g in job.groups if g.layer == i]
                compensate(replace(job.ctx, groups=groups), job.keep)
            heads, channels = job.keep.get((i, "heads")), job.keep.get((i, "channels"))
            prune_layer(job.model, job.adapter, i, heads, channels, cfg.gqa)


def report(job: Pruning) -> dict:
    """What was removed and what it cost in forward passes (``report.json``'s core fields)."""
    prunable = allocation.prunable_params(job.groups)
    kept = allocation.prunable_params(job.groups, job.keep)
    return {
        "architecture": job.adapter.name,
        "criterion": job.cfg.criterion,
        "ratio": job.cfg.ratio,
        "allocation": job.cfg.allocator,
        "params_before": job.params_before,
        "params_after": count_params(job.model),
        "prunable_params": prunable,
        "prunable_params_removed": prunable - kept,
        "layers": layer_records(job.model, job.adapter),
        "pruned_layers": job.layers,
        "target": job.cfg.target,
        "forward_passes": job.ctx.forward_passes,
        "tokens_forwarded": job.ctx.tokens_forwarded,
        "calibration_tokens": job.tokens.numel(),
        "seed": job.cfg.seed,
        "config": asdict(job.cfg),
    }
