"""Allocation from measured damage: the table's probe is the KL of a real pruning, the other
grid points follow the refit's error curve, the relative error from the normal equations is the
one a direct computation gives, and the dynamic program is the brute-force optimum."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import VOCAB, make_tiny_model

from minillm.blocks.loop import capture, run_block
from minillm.blocks.reconstruct import consumer_gram, prune_sequential
from minillm.model.adapters import adapter_for
from minillm.scoring import damage
from minillm.scoring.criteria import CRITERIA, ScoringContext
from minillm.scoring.damage import Option, allocate

TOKENS = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(7))


def _table(seed: int, n_groups: int = 4, n_options: int = 4):
    gen = torch.Generator().manual_seed(seed)
    options = {}
    for gi in range(n_groups):
        step = [3, 2, 5, 2][gi % 4] * 10
        dmg = torch.rand(n_options - 1, generator=gen).cumsum(0).tolist()
        options[(gi, "channels")] = [Option(0, 0, 0.0)] + [
            Option(r, r * step, d) for r, d in zip(range(1, n_options), dmg, strict=True)
        ]
    return options


def _brute(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        spent = sum(o.params for o in combo)
        cost = (abs(spent - budget), sum(o.damage for o in combo))
        best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [40, 90, 150, 230])
def test_dp_equals_brute_force(seed, budget):
    options = _table(seed)
    chosen = allocate(options, budget)
    gap, dmg = _brute(options, budget)
    assert abs(sum(o.params for o in chosen.values()) - budget) == gap
    assert math.isclose(sum(o.damage for o in chosen.values()), dmg, rel_tol=1e-12)


def test_dp_prefers_the_group_that_costs_less():
    options = {
        (0, "channels"): [Option(0, 0, 0.0), Option(1, 10, 1.0), Option(2, 20, 5.0)],
        (1, "channels"): [Option(0, 0, 0.0), Option(1, 10, 0.1), Option(2, 20, 0.3)],
    }
    chosen = allocate(options, 20)
    assert chosen[(0, "channels")].removed == 0 and chosen[(1, "channels")].removed == 2


def test_budget_beyond_the_grid_is_a_one_line_error_naming_the_flags():
    with pytest.raises(ValueError, match=r"--ratio.*--layers") as err:
        allocate(_table(0), 10_000)
    assert "\n" not in str(err.value)


def test_removal_grid_keeps_one_unit_per_partition():
    model = make_tiny_model("llama-gqa")
    groups = adapter_for(model).groups(model, 1)
    assert damage.removal_grid(groups["heads"], 8) == [0, 1, 2, 3]  # 4 heads per KV group
    assert damage.removal_grid(groups["channels"], 4) == [0, 24, 48, 72]


def _kl(model, pruned, tokens) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(tokens).logits.float(), -1)
        lq = torch.log_softmax(pruned(tokens).logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "bloom", "gemma3"])
@pytest.mark.parametrize("spill", [True, False])
def test_probe_damage_is_the_kl_of_the_real_pruning(family, spill):
    """The measured grid point's damage equals KL(dense || the model with that group alone
    pruned and refit); the other points are its relative error scaled by the same factor."""
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    groups = [g for i in range(3) for g in adapter.groups(model, i).values()]
    kw = dict(steps=4, subset=4, batch_size=4, spill=spill)
    table = damage.measure_damage(model, adapter, TOKENS, groups, **kw)
    for key in [(1, "channels"), (2, "heads"), (0, "channels")]:
        opts = table.options[key]
        probe = next(o for o in opts if not math.isnan(o.measured))
        group = [g for g in groups if (g.layer, g.kind) == key]
        keep = damage.keep_from_allocation(group, table.order, {key: probe})
        pruned = copy.deepcopy(model)
        prune_sequential(pruned, adapter_for(pruned), TOKENS, keep, [key[0]], batch_size=4)
        assert probe.damage > 0
        assert math.isclose(probe.damage, _kl(model, pruned, TOKENS[:4]), rel_tol=1e-3)
        for o in opts[1:]:
            assert math.isclose(o.damage, probe.measured * o.local / probe.local, rel_tol=1e-9)
    again = damage.measure_damage(model, adapter, TOKENS, groups, **kw)  # the model stayed dense
    assert again.options[(1, "channels")][-1].damage == table.options[(1, "channels")][-1].damage


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_relative_error_from_the_normal_equations_is_the_direct_one(family):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    group = adapter.groups(model, 1)["channels"]
    lin = group.consumers[0].linear
    boundary = capture(model, adapter, TOKENS, 6)
    boundary = boundary.with_hidden(run_block(adapter.layers(model)[0], boundary.at(0)))
    gram = consumer_gram(adapter.layers(model)[1], lin, boundary.at(1))
    inputs = []
    handle = lin.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        run_block(adapter.layers(model)[1], boundary.at(1))
    handle.remove()
    x = torch.cat(inputs).double()
    cols = torch.arange(0, lin.in_features, 3)
    weight, bias, err = damage.GroupFit(lin.weight, lin.bias, gram).fit(cols, ridge=0.1)
    bias_in = lin.bias.detach().double() if lin.bias is not None else 0
    dense = x @ lin.weight.detach().double().t() + bias_in
    refit = x[:, cols] @ weight.t() + bias
    want = float((dense - refit).pow(2).sum() / dense.pow(2).sum())
    assert math.isclose(err, want, rel_tol=1e-6)


def test_flap_from_the_gram_ranks_as_the_flap_criterion():
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    group = adapter.groups(model, 0)["channels"]
    lin = group.consumers[0].linear
    gram = consumer_gram(adapter.layers(model)[0], lin, capture(model, adapter, TOKENS, 6))
    ctx = ScoringContext(model, adapter, [group], TOKENS, options={"batch_size": 6})
    ref = CRITERIA["flap"](ctx)[(0, "channels")]
    torch.testing.assert_close(damage.flap_from_gram(lin.weight, gram, 1), ref, rtol=1e-4, atol=0)


def test_allocated_keep_meets_the_budget_and_stays_gqa_valid():
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    groups = [g for i in range(3) for g in adapter.groups(model, i).values()]
    table = damage.measure_damage(model, adapter, TOKENS, groups, steps=4, subset=2, batch_size=2)
    total = sum(g.unit_params() * g.n_units for g in groups)
    chosen = allocate(table.options, round(0.4 * total))
    keep = damage.keep_from_allocation(groups, table.order, chosen)
    removed = sum(g.unit_params() * (g.n_units - len(keep[(g.layer, g.kind)])) for g in groups)
    assert removed == sum(o.params for o in chosen.values())
    assert abs(removed - 0.4 * total) <= max(g.unit_params() for g in groups) * 2
    for g in groups:
        per = g.n_units // g.partitions
        counts = torch.bincount(keep[(g.layer, g.kind)] // per, minlength=g.partitions)
        assert (counts == counts[0]).all() and counts[0] >= 1
