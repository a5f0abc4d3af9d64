"""Tiny random-weight models of every supported family, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, Gemma3TextConfig, LlamaConfig, OPTConfig

VOCAB = 128


def tiny_config(family: str, **overrides):
    """Config of a 3-layer, 64-wide model of ``family``; ``overrides`` replace any field."""
    sizes = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, max_position_embeddings=128)
    if family == "llama-mha":
        kwargs = dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)
        return LlamaConfig(**{**sizes, **kwargs, **overrides})
    if family == "llama-gqa":
        kwargs = dict(
            num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=96
        )
        return LlamaConfig(**{**sizes, **kwargs, **overrides})
    if family == "opt":
        kwargs = dict(num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64)
        return OPTConfig(**{**sizes, **kwargs, **overrides})
    if family == "bloom":
        sizes.pop("max_position_embeddings")
        return BloomConfig(**{**sizes, "n_layer": 3, "n_head": 8, **overrides})
    if family == "gemma3":  # 4 heads of 24 (96 != 64 wide), a sliding window of 4 tokens
        kwargs = dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=24,
            intermediate_size=96,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        return Gemma3TextConfig(**{**sizes, **kwargs, **overrides})
    raise ValueError(family)


FAMILIES = ["llama-mha", "llama-gqa", "opt", "bloom"]
EXTRA_FAMILIES = ["gemma3"]  # tested by their own modules (tests/test_gemma3.py)


def make_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():  # random biases so that bias slicing is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
        for name, param in model.named_parameters():  # Gemma's RMSNorms start at zero
            if family == "gemma3" and "norm" in name:
                param.normal_(0, 0.5)
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


WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (ids < VOCAB), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def random_text(n_words: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n_words,), generator=gen).tolist()
    return " ".join(WORDS[i] for i in ids)


@pytest.fixture
def tiny_model_dir(tmp_path, family):
    """A tiny model of ``family`` saved with its tokenizer, like a hub checkpoint."""
    path = tmp_path / f"tiny-{family}"
    make_tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(4000))
    return path
