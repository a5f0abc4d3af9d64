"""Tiny random-weight models of every supported family, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig

VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3)
    if family == "llama-mha":
        return LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=96,
            max_position_embeddings=128,
        )
    if family == "llama-gqa":
        return LlamaConfig(
            **common,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            max_position_embeddings=128,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=96,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    if family == "bloom":
        return BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=8)
    raise ValueError(family)


FAMILIES = ["llama-mha", "llama-gqa", "opt", "bloom"]


def make_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():  # random biases so that bias slicing is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny_model(family)


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
