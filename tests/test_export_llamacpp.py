"""Exported GGUF files run in llama.cpp itself with the logits of the PyTorch model.

Optional: needs llama-cpp-python (``pip install llama-cpp-python==0.3.36``; it builds llama.cpp
from source, ~25 min on 2 cores), skipped where it is absent. Not part of CI's required path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import VOCAB, bpe_tokenizer, prune, saved, tiny_llama

from minillm.model.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")
GGML_TYPE_F32 = 0  # KV cache in float32, so the comparison is not limited by f16 rounding


def llamacpp_logits(path, ids: list[int]) -> np.ndarray:
    """``[len(ids), vocab]`` logits of llama.cpp on ``ids`` (no BOS added)."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(ids),
        n_batch=len(ids),
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=1,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


CASES = {
    "mha-uniform-llama": dict(family="llama-mha", uniform=True),
    "gqa-per-layer-deci": dict(family="llama-gqa", uniform=False),
    "gqa-biases-llama3-rope": dict(
        family="llama-gqa",
        uniform=False,
        overrides=dict(
            attention_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_logits_equal_pytorch(case, tmp_path):
    spec = CASES[case]
    model = tiny_llama(spec["family"], **spec.get("overrides", {}))
    prune(model, spec["uniform"])
    if case.startswith("gqa-biases"):
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.5)
        down = model.model.layers[2].mlp.down_proj
        down.bias = torch.nn.Parameter(torch.randn(64) * 0.5, requires_grad=False)
    ids = torch.randint(3, VOCAB - 1, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[None]).logits[0].numpy()
    path = tmp_path / "m.gguf"
    export_gguf(saved(model, tmp_path), path, progress=False)
    actual = llamacpp_logits(path, ids.tolist())
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-3)


def test_llamacpp_tokenizes_like_the_saved_tokenizer(tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(saved(tiny_llama("llama-mha"), tmp_path), path, progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = "the theme: he said 'then' at 10:30, then left\n\n  there."
    expected = bpe_tokenizer(tmp_path)(text)["input_ids"]
    assert 257 in expected and 258 in expected  # the merges are used
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llamacpp_runs_half_and_q8_outputs(outtype, tmp_path):
    """Rounded weights: the logits stay close to the float32 model's, not equal."""
    model = tiny_llama("llama-gqa")
    prune(model, uniform=False)  # 88 and 80 channels: q8_0 falls back to f16 for down_proj
    ids = torch.randint(3, VOCAB - 1, (32,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[None]).logits[0].numpy()
    path = tmp_path / "m.gguf"
    export_gguf(saved(model, tmp_path), path, outtype=outtype, progress=False)
    actual = llamacpp_logits(path, ids.tolist())
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()
