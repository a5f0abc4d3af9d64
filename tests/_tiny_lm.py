"""Tiny random-weight causal LMs and a byte-level tokenizer for the eval/recover tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_config as shared_tiny_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TOKENIZER_DIR = Path(__file__).parent / "data" / "byte_tokenizer"
VOCAB = 257  # 256 byte symbols + <|endoftext|>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is one token; id 0 is eos/bos/pad."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_config(family: str):
    """Config of the shared tiny ``family`` model (llama means GQA) over the byte vocabulary."""
    tokens = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "bloom":
        return shared_tiny_config("bloom", **tokens)
    name = "llama-gqa" if family == "llama" else family
    return shared_tiny_config(name, max_position_embeddings=256, **tokens)


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """Random-weight tiny model in eval mode, float32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


def pruned_tiny(family: str = "llama") -> torch.nn.Module:
    """Tiny model with layer 0 at half its heads and a quarter of its channels (non-uniform)."""
    from minillm.model.adapters import adapter_for
    from minillm.model.surgery import first_units, prune_layer

    model = tiny_model(family)
    adapter = adapter_for(model)
    groups = adapter.groups(model, 0)
    heads, channels = groups["heads"], groups["channels"]
    keep_heads = first_units(heads, heads.n_units // 2)
    prune_layer(model, adapter, 0, keep_heads, first_units(channels, channels.n_units // 4))
    return model
