"""SPSA estimates converge to the backprop gradient; scoring memory does not grow with them."""

from __future__ import annotations

import pytest
import torch
from _memory import PeakTensorBytes
from conftest import VOCAB, make_tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from minillm.kernels.noise import noise
from minillm.model.adapters import adapter_for
from minillm.scoring import gradients as exact
from minillm.scoring import spsa
from minillm.scoring.criteria import CRITERIA, ScoringContext

TOKENS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))


def _groups(model):
    adapter = adapter_for(model)
    return [g for i in range(len(adapter.layers(model))) for g in adapter.groups(model, i).values()]


def _rel_err(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float((est - ref).norm() / ref.norm())


@pytest.mark.parametrize("sharing", ["global", "sequence"])
def test_layer_multiplier_spsa_converges_to_backprop(sharing):
    model = make_tiny_model("llama-mha")
    groups = _groups(model)
    ref = torch.cat(exact.multiplier_gradients(model, groups, TOKENS, "layer")[0])
    errs = {}
    for k in (2, 300):
        est, passes = spsa.spsa_multipliers(
            model, groups, TOKENS, resolution="layer", n_perturbations=k, sharing=sharing
        )
        assert passes == k
        g = torch.cat([spsa.multiplier_gradient(est, i, 1) for i in range(len(groups))])
        errs[k] = _rel_err(g, ref)
    # 6 coordinates: the error falls like sqrt(dim / measurements)
    assert errs[300] < 0.25
    assert errs[300] < errs[2] / 2


def test_unit_multiplier_spsa_converges_gaussian():
    model = make_tiny_model("opt")  # biases everywhere, fc2 sees flattened tokens
    groups = _groups(model)[:2]  # layer 0: 4 heads + 96 channels
    ref = torch.cat(exact.multiplier_gradients(model, groups, TOKENS, "unit")[0])
    est, _ = spsa.spsa_multipliers(
        model, groups, TOKENS, resolution="unit", n_perturbations=400, dist="gaussian"
    )
    g = torch.cat(
        [spsa.multiplier_gradient(est, i, g.n_units, "gaussian") for i, g in enumerate(groups)]
    )
    cos = float(g @ ref / (g.norm() * ref.norm()))
    assert cos > 0.8  # 100 coordinates, 1600 sequence-level measurements


def _tiny_linear_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=8,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_per_weight_spsa_converges_to_backprop():
    model = _tiny_linear_lm()
    tokens = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    down = model.model.layers[0].mlp.down_proj  # 16 x 8 = 128 weights
    ref = exact.weight_gradients(model, [down], tokens)[0][down]
    cos = {}
    for k in (4, 600):
        est, _ = spsa.spsa_weights(
            model, [(7, down)], tokens, n_perturbations=k, eps=1e-3, batch_size=4
        )
        g = sum(c * noise(s, 7, *down.weight.shape) for s, c in est)
        cos[k] = float((g * ref).sum() / (g.norm() * ref.norm()))
    assert cos[600] > 0.8  # expected sqrt(600 / (600 + 128)) = 0.91
    assert cos[600] > cos[4]


def test_spsa_leaves_parameters_bit_identical():
    model = make_tiny_model("bloom")
    groups = _groups(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spsa.spsa_multipliers(model, groups, TOKENS, resolution="unit", n_perturbations=2)
    linears = [(i, b.linear) for i, b in enumerate(groups[0].producers + groups[0].consumers)]
    spsa.spsa_weights(model, linears, TOKENS, n_perturbations=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_estimate_is_seeds_and_scalars():
    model = make_tiny_model("llama-gqa")
    est, _ = spsa.spsa_multipliers(model, _groups(model), TOKENS, n_perturbations=3)
    assert len(est) == 3 * TOKENS.shape[0]  # per-sequence sharing: one seed per sequence
    assert all(isinstance(s, int) and isinstance(c, float) for s, c in est)


def _fms_peak(model, variant: str, k: int) -> int:
    ctx = ScoringContext(
        model,
        adapter_for(model),
        _groups(model),
        TOKENS,
        options={"fms_variant": variant, "perturbations": k, "batch_size": 4},
    )
    with PeakTensorBytes() as meter:
        CRITERIA["fms"](ctx)
    return meter.peak


@pytest.mark.parametrize("variant", ["layer", "unit", "weight"])
def test_fms_peak_memory_does_not_grow_with_perturbations(variant):
    model = make_tiny_model("llama-gqa")
    few, many = _fms_peak(model, variant, 1), _fms_peak(model, variant, 16)
    assert many <= few * 1.02 + 4096


def test_scoring_peak_memory_within_wanda_sp():
    """Same batch size: the ± halves of an SPSA pass hold as many sequences as a stats pass, and
    exact gradients (block by block, block inputs spilled) hold one block's gradients."""
    model = make_tiny_model("llama-gqa")
    tokens = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(5))
    runs = [
        ("wanda-sp", {}),
        ("fms", {"perturbations": 2}),
        ("taylor", {"spill": True}),
        ("fms", {"gradients": "backprop", "spill": True}),
    ]
    peaks = []
    for name, options in runs:
        ctx = ScoringContext(
            model, adapter_for(model), _groups(model), tokens, options={"batch_size": 4, **options}
        )
        with PeakTensorBytes() as meter:
            CRITERIA[name](ctx)
        peaks.append(meter.peak)
    wanda, fms_spsa, taylor, fms_exact = peaks
    assert fms_spsa <= 1.1 * wanda
    assert taylor <= 1.15 * wanda
    assert fms_exact <= 1.15 * wanda


def test_removal_estimate_matches_one_at_a_time_damage():
    """The random-subset regression of pruning damage recovers each group's own damage."""
    model = make_tiny_model("llama-mha")
    groups = _groups(model)
    gen = torch.Generator().manual_seed(0)
    cands = [torch.rand(g.n_units, generator=gen) < 0.3 for g in groups]
    exact_damage, _ = spsa.removal_damage(model, groups, TOKENS, cands)
    errs = {}
    for k in (2, 200):
        est, _ = spsa.spsa_multipliers(
            model, groups, TOKENS, resolution="layer", n_perturbations=k, candidates=cands
        )
        got = torch.cat([spsa.multiplier_gradient(est, i, 1) for i in range(len(groups))])
        errs[k] = _rel_err(got, exact_damage)
    # 800 sequence-level measurements of 6 damages; groups interact, so not exact
    assert errs[200] < 0.5
    assert errs[200] < errs[2]
