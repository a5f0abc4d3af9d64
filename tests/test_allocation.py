"""Allocation: budgets in parameters, GQA-valid head counts, scale-free cross-layer comparison."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from minillm.model.adapters import adapter_for
from minillm.scoring.allocation import global_ranking, uniform


def _groups(family="llama-gqa", gqa="query"):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    return [g for i in range(3) for g in adapter.groups(model, i, gqa).values()]


def _scores(groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {(g.layer, g.kind): torch.rand(g.n_units, generator=gen) + 0.1 for g in groups}


def _removed_params(groups, keep, kind=None):
    return sum(
        g.unit_params() * (g.n_units - len(keep[(g.layer, g.kind)]))
        for g in groups
        if kind is None or g.kind == kind
    )


def _assert_gqa_valid(groups, keep):
    for g in groups:
        kept = keep[(g.layer, g.kind)]
        per = g.n_units // g.partitions
        counts = torch.bincount(kept // per, minlength=g.partitions)
        assert (counts == counts[0]).all() and counts[0] >= 1


@pytest.mark.parametrize("gqa", ["query", "kv"])
def test_uniform_keeps_head_counts_gqa_valid(gqa):
    groups = _groups(gqa=gqa)
    keep = uniform(groups, _scores(groups), 0.5)
    _assert_gqa_valid(groups, keep)
    for g in groups:
        assert (
            len(keep[(g.layer, g.kind)])
            == g.n_units - round(0.5 * g.n_units / g.partitions) * g.partitions
        )


@pytest.mark.parametrize("normalize", ["mean", "standardize", "none"])
@pytest.mark.parametrize("together", [False, True])
def test_global_ranking_spends_the_parameter_budget(normalize, together):
    groups = _groups()
    keep = global_ranking(groups, _scores(groups), 0.3, normalize=normalize, together=together)
    _assert_gqa_valid(groups, keep)
    kinds = [None] if together else ["heads", "channels"]
    for kind in kinds:
        total = sum(g.unit_params() * g.n_units for g in groups if kind is None or g.kind == kind)
        biggest_step = max(
            g.unit_params() * g.partitions for g in groups if kind is None or g.kind == kind
        )
        assert abs(_removed_params(groups, keep, kind) - 0.3 * total) <= biggest_step


def test_global_ranking_removes_the_lowest_normalized_scores():
    """Hand-checkable: layer 1's channels are all below layer 0's after mean-normalization."""
    groups = [g for g in _groups("llama-mha") if g.kind == "channels"][:2]
    n = groups[0].n_units
    s0 = torch.linspace(1, 2, n) * 1000  # large raw scale, flat shape
    s1 = torch.cat([torch.full((n // 2,), 0.01), torch.full((n - n // 2,), 1.99)])
    scores = {(0, "channels"): s0, (1, "channels"): s1}
    keep = global_ranking(groups, scores, 0.25)  # a quarter of 2n channels = n/2
    assert len(keep[(0, "channels")]) == n
    assert keep[(1, "channels")].tolist() == list(range(n // 2, n))


@pytest.mark.parametrize("normalize", ["mean", "standardize"])
def test_normalized_ranking_ignores_a_layer_scale(normalize):
    groups = _groups()
    scores = _scores(groups)
    scaled = {k: v * (1000.0 if k[0] == 1 else 1.0) for k, v in scores.items()}
    a = global_ranking(groups, scores, 0.4, normalize=normalize)
    b = global_ranking(groups, scaled, 0.4, normalize=normalize)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = global_ranking(groups, scaled, 0.4, normalize="none")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_per_param_ranking_charges_each_unit_its_parameters():
    """Heads score 10 and channels 1, but a head holds 21x a channel's parameters: per
    parameter the heads are cheaper to remove; per unit the channels are."""
    groups = _groups("llama-mha")
    heads = [g for g in groups if g.kind == "heads"]
    channels = [g for g in groups if g.kind == "channels"]
    assert heads[0].unit_params() > 10 * channels[0].unit_params()
    scores = {
        (g.layer, g.kind): torch.full((g.n_units,), 10.0 if g.kind == "heads" else 1.0)
        for g in groups
    }
    per_unit = global_ranking(groups, scores, 0.1, normalize="none", together=True)
    per_param = global_ranking(groups, scores, 0.1, normalize="none", together=True, per_param=True)
    assert all(len(per_unit[(g.layer, "heads")]) == g.n_units for g in heads)
    assert all(len(per_param[(g.layer, "channels")]) == g.n_units for g in channels)
    assert any(len(per_param[(g.layer, "heads")]) < g.n_units for g in heads)
