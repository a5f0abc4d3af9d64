"""Saved models reload with identical logits; plain transformers loads only what it can."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from test_surgery import prune_randomly
from transformers import AutoModelForCausalLM

from minillm.model.adapters import adapter_for
from minillm.model.io import PRUNED_MODEL_TYPE, atomic_output_dir, load_pruned, save_pruned
from minillm.model.surgery import prune_layer


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_gives_identical_logits(tiny_model, token_batch, tmp_path):
    prune_randomly(tiny_model, uniform=False)
    save_pruned(tiny_model, None, tmp_path)
    reloaded = load_pruned(tmp_path)  # sdpa attention where the original ran eager
    torch.testing.assert_close(logits(reloaded, token_batch), logits(tiny_model, token_batch))


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_uniform_llama_loads_in_plain_transformers(family, token_batch, tmp_path):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    for layer in range(3):
        heads = adapter.groups(model, layer)["heads"]
        keep = torch.arange(heads.n_units).view(heads.partitions, -1)[:, layer % 2 :: 2]
        prune_layer(model, adapter, layer, keep.reshape(-1), torch.arange(layer % 2, 96, 2))
    config = save_pruned(model, None, tmp_path)
    assert config["model_type"] == "llama"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, token_batch), logits(model, token_batch))


def test_heads_not_dividing_hidden_size_get_a_minillm_config(tmp_path):
    model = make_tiny_model("llama-mha")
    adapter = adapter_for(model)
    for layer in range(3):  # 3 heads of 16 in a 64-wide model: LlamaConfig would reject it
        prune_layer(model, adapter, layer, torch.tensor([0, 1, 3]), None)
    assert save_pruned(model, None, tmp_path)["model_type"] == PRUNED_MODEL_TYPE


def test_uniform_opt_channels_load_in_plain_transformers(token_batch, tmp_path):
    model = make_tiny_model("opt")
    adapter = adapter_for(model)
    for layer in range(3):
        prune_layer(model, adapter, layer, None, torch.arange(0, 96, 2))
    assert save_pruned(model, None, tmp_path)["ffn_dim"] == 48
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, token_batch), logits(model, token_batch))


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_outputs_plain_transformers_cannot_express_refuse_to_load(family, tmp_path):
    """OPT/BLOOM derive head_dim (and BLOOM its ALiBi slopes) from the head count: a plain
    load would be wrong, so the saved config must make transformers refuse it."""
    model = make_tiny_model(family)
    prune_randomly(model, uniform=True)
    assert save_pruned(model, None, tmp_path)["model_type"] == PRUNED_MODEL_TYPE
    with pytest.raises((ValueError, KeyError)):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_saved_weights_are_safetensors_only(tmp_path):
    model = make_tiny_model("llama-gqa")
    prune_randomly(model, uniform=False)
    save_pruned(model, None, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"config.json", "model.safetensors", "modeling_minillm.py", "README.md"}
    layers = json.loads((tmp_path / "config.json").read_text())["minillm"]["layers"]
    assert [rec["channels"] for rec in layers] == [93, 88, 83]


def test_failed_save_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--out: .* not empty; pass --overwrite"):
        with atomic_output_dir(tmp_path):
            pass
    assert (tmp_path / "keep.txt").read_text() == "user data"
    with atomic_output_dir(tmp_path, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["new.txt"]


def test_added_biases_of_a_uniform_llama_load_in_stock_transformers(token_batch, tmp_path):
    """The refit adds down_proj/o_proj biases LLaMA has none of: a uniform output says so with
    mlp_bias/attention_bias (zero biases for the other linears they give one) and loads in
    stock transformers, without remote code, with the same logits."""
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    for layer in range(3):
        prune_layer(model, adapter, layer, None, torch.arange(0, 96, 2))
    down = model.model.layers[1].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.randn(down.out_features))
    config = save_pruned(model, None, tmp_path)
    assert config["model_type"] == "llama" and config["mlp_bias"] is True
    assert "attention_bias" not in config or config["attention_bias"] is False
    assert "auto_map" not in config and not (tmp_path / "modeling_minillm.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not stock.model.layers[0].mlp.up_proj.bias.any()  # zeros where none was added
    torch.testing.assert_close(logits(stock, token_batch), logits(model, token_batch))
    torch.testing.assert_close(
        logits(load_pruned(tmp_path), token_batch), logits(model, token_batch)
    )


def test_biases_of_per_layer_sizes_survive_the_round_trip(token_batch, tmp_path):
    """Layers of different sizes need remote code; load_pruned restores the added biases."""
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    for layer in range(3):
        prune_layer(model, adapter, layer, None, torch.arange(0, 96 - 8 * layer))
    down = model.model.layers[1].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.randn(down.out_features))
    assert save_pruned(model, None, tmp_path)["model_type"] == PRUNED_MODEL_TYPE
    reloaded = load_pruned(tmp_path)
    torch.testing.assert_close(logits(reloaded, token_batch), logits(model, token_batch))
