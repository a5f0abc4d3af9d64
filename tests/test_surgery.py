"""Pruned models equal masked dense models, shrink as predicted and still generate."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from helpers import mask_removed, random_keep

from minillm.model.adapters import adapter_for
from minillm.model.surgery import layer_records, prune_layer


def prune_randomly(model, uniform: bool, gqa: str = "query", seed: int = 0):
    """Prune every layer of ``model`` at random; return (masked dense copy, removed params)."""
    adapter = adapter_for(model)
    dense = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    removed_params = 0
    for layer in range(len(adapter.layers(model))):
        groups = adapter.groups(model, layer, gqa)
        dense_groups = adapter.groups(dense, layer, gqa)
        step = 1 if uniform else layer
        keeps = {}
        for kind in ("heads", "channels"):
            g = groups[kind]
            n_remove = min(step, g.n_units // g.partitions - 1) if kind == "heads" else 5 * step + 3
            keeps[kind] = random_keep(g, n_remove, gen)
            removed_params += g.unit_params() * (g.n_units - len(keeps[kind]))
            mask_removed(dense_groups[kind], keeps[kind])
        prune_layer(model, adapter, layer, keeps["heads"], keeps["channels"], gqa)
    return dense, removed_params


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-layer"])
def test_pruned_logits_equal_masked_dense(tiny_model, token_batch, uniform):
    dense, _ = prune_randomly(tiny_model, uniform)
    with torch.no_grad():
        expected = dense(token_batch).logits
        actual = tiny_model(token_batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_whole_kv_groups_removed_equal_masked_dense(token_batch):
    model = make_tiny_model("llama-gqa")
    dense, _ = prune_randomly(model, uniform=False, gqa="kv")
    sizes = layer_records(model, adapter_for(model))
    assert [s["kv_heads"] for s in sizes] == [2, 1, 1]  # layer i removes i groups
    assert all(s["heads"] == 4 * s["kv_heads"] for s in sizes)
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, dense(token_batch).logits)


def test_parameter_count_matches_prediction(tiny_model):
    before = sum(p.numel() for p in tiny_model.parameters())
    _, removed = prune_randomly(tiny_model, uniform=False)
    after = sum(p.numel() for p in tiny_model.parameters())
    assert removed > 0
    assert after == before - removed


def test_pruned_model_generates_like_masked_dense(tiny_model, token_batch):
    dense, _ = prune_randomly(tiny_model, uniform=False)
    prompt = token_batch[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = tiny_model.generate(prompt, use_cache=True, **kwargs)
    assert out.shape == (1, 13)
    assert torch.equal(out, dense.generate(prompt, use_cache=True, **kwargs))


def test_gqa_query_heads_stay_even_per_kv_group():
    model = make_tiny_model("llama-gqa")
    prune_randomly(model, uniform=False)
    for rec in layer_records(model, adapter_for(model)):
        assert rec["kv_heads"] == 2
        assert rec["heads"] % rec["kv_heads"] == 0


def test_bloom_surviving_heads_keep_their_alibi_slopes(token_batch):
    """Removing head 0 shifts the others' slopes if the model recomputed ALiBi from the
    new head count; equality with the masked dense model proves it does not."""
    model = make_tiny_model("bloom")
    adapter = adapter_for(model)
    dense = copy.deepcopy(model)
    keep = torch.arange(1, 8)
    for layer in range(3):
        mask_removed(adapter.groups(dense, layer)["heads"], keep)
        prune_layer(model, adapter, layer, keep, None)
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, dense(token_batch).logits)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'; supported: .*llama"):
        adapter_for(model)
