"""Pruned models for stock transformers: ``from_pretrained(DIR, trust_remote_code=True)``.

minillm copies this file into every output directory whose sizes a plain transformers config
cannot express, and registers its classes in config.json's ``auto_map``; it imports only
torch and transformers, so the model loads where minillm is not installed.

config.json is the dense model's config with ``"model_type": "minillm_pruned"`` and a
``minillm`` entry: ``base_model_type`` (e.g. ``"llama"``), one record per decoder layer (kept
``heads``, ``kv_heads``, ``channels`` and the original ``head_ids`` of surviving query heads)
and ``biases``, the linears that carry a bias the base architecture lacks (FLAP compensation).
Each model class is the stock transformers class of its base architecture whose layers are
rebuilt at the pruned sizes right after construction; the forward pass is transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

MODEL_TYPE = "minillm_pruned"

_LLAMA = {
    "self_attn.q_proj": (0, "q"),
    "self_attn.k_proj": (0, "kv"),
    "self_attn.v_proj": (0, "kv"),
    "self_attn.o_proj": (1, "q"),
    "mlp.gate_proj": (0, "channels"),
    "mlp.up_proj": (0, "channels"),
    "mlp.down_proj": (1, "channels"),
}
# family -> (decoder layers' path, attention module's name, {linear: (sliced dim, size)});
# dim 0 is out_features, dim 1 in_features; sizes are in units of head_dim except "channels"
LAYOUTS = {
    "llama": ("model.layers", "self_attn", _LLAMA),
    "opt": (
        "model.decoder.layers",
        "self_attn",
        {
            "self_attn.q_proj": (0, "q"),
            "self_attn.k_proj": (0, "q"),
            "self_attn.v_proj": (0, "q"),
            "self_attn.out_proj": (1, "q"),
            "fc1": (0, "channels"),
            "fc2": (1, "channels"),
        },
    ),
    "bloom": (
        "transformer.h",
        "self_attention",
        {
            "self_attention.query_key_value": (0, "qkv"),
            "self_attention.dense": (1, "q"),
            "mlp.dense_h_to_4h": (0, "channels"),
            "mlp.dense_4h_to_h": (1, "channels"),
        },
    ),
}
FAMILY = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "llama"}


def _size(kind: str, record: dict, head_dim: int) -> int:
    units = {"q": record["heads"], "kv": record["kv_heads"], "qkv": 3 * record["heads"]}
    return record["channels"] if kind == "channels" else units[kind] * head_dim


def _resized(linear: nn.Linear, dim: int, size: int, bias: bool) -> nn.Linear:
    """An uninitialized linear like ``linear`` with ``size`` outputs (dim 0) or inputs (dim 1)."""
    shape = (size, linear.in_features) if dim == 0 else (linear.out_features, size)
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    return nn.Linear(shape[1], shape[0], bias=bias, **factory)


def _set_head_counts(attn: nn.Module, record: dict) -> None:
    """Update whichever head-count attributes this transformers version's attention reads."""
    for name, value in (
        ("num_heads", record["heads"]),
        ("num_attention_heads", record["heads"]),
        ("num_key_value_heads", record["kv_heads"]),
        ("num_key_value_groups", record["heads"] // record["kv_heads"]),
    ):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _alibi_rows(head_ids: list[int], n_heads: int):
    """BLOOM pre-hook: keep the surviving heads' rows of the dense alibi ``[batch * n, 1, kv]``,
    so every head keeps the slope it had before pruning."""
    ids = torch.tensor(head_ids, device="cpu")  # not on the meta device of a lazy load

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        alibi = kwargs["alibi"]
        batch = alibi.shape[0] // n_heads
        rows = alibi.view(batch, n_heads, *alibi.shape[1:])[:, ids.to(alibi.device)]
        kwargs["alibi"] = rows.flatten(0, 1)
        return args, kwargs

    return hook


def shrink(model: nn.Module, config) -> None:
    """Rebuild every decoder layer's linears at the sizes recorded in ``config.minillm``."""
    family = FAMILY.get(config.minillm["base_model_type"], config.minillm["base_model_type"])
    path, attn_name, linears = LAYOUTS[family]
    biases = set(config.minillm.get("biases", []))
    layers = model.get_submodule(path)
    for i, record in enumerate(config.minillm["layers"]):
        layer = layers[i]
        attn = layer.get_submodule(attn_name)
        for name, (dim, kind) in linears.items():
            owner, _, leaf = name.rpartition(".")
            parent = layer.get_submodule(owner) if owner else layer
            old = getattr(parent, leaf)
            bias = old.bias is not None or f"{path}.{i}.{name}" in biases
            setattr(parent, leaf, _resized(old, dim, _size(kind, record, attn.head_dim), bias))
        _set_head_counts(attn, record)
        if family == "bloom":
            hook = _alibi_rows(record["head_ids"], config.n_head)
            attn.register_forward_pre_hook(hook, with_kwargs=True)


class _Pruned:
    """Mixin: build the stock model, then shrink its layers to the pruned sizes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink(self, config)


class MinillmLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE


class MinillmLlamaForCausalLM(_Pruned, LlamaForCausalLM):
    config_class = MinillmLlamaConfig


class MinillmMistralConfig(MistralConfig):
    model_type = MODEL_TYPE


class MinillmMistralForCausalLM(_Pruned, MistralForCausalLM):
    config_class = MinillmMistralConfig


class MinillmQwen2Config(Qwen2Config):
    model_type = MODEL_TYPE


class MinillmQwen2ForCausalLM(_Pruned, Qwen2ForCausalLM):
    config_class = MinillmQwen2Config


class MinillmQwen3Config(Qwen3Config):
    model_type = MODEL_TYPE


class MinillmQwen3ForCausalLM(_Pruned, Qwen3ForCausalLM):
    config_class = MinillmQwen3Config


class MinillmOPTConfig(OPTConfig):
    model_type = MODEL_TYPE


class MinillmOPTForCausalLM(_Pruned, OPTForCausalLM):
    config_class = MinillmOPTConfig


class MinillmBloomConfig(BloomConfig):
    model_type = MODEL_TYPE


class MinillmBloomForCausalLM(_Pruned, BloomForCausalLM):
    config_class = MinillmBloomConfig


class MinillmGemma3Config(Gemma3TextConfig):
    model_type = MODEL_TYPE


class MinillmGemma3ForCausalLM(_Pruned, Gemma3ForCausalLM):
    config_class = MinillmGemma3Config


# base model_type -> (config class, model class) named in config.json's auto_map
CLASSES = {
    "llama": (MinillmLlamaConfig, MinillmLlamaForCausalLM),
    "mistral": (MinillmMistralConfig, MinillmMistralForCausalLM),
    "qwen2": (MinillmQwen2Config, MinillmQwen2ForCausalLM),
    "qwen3": (MinillmQwen3Config, MinillmQwen3ForCausalLM),
    "opt": (MinillmOPTConfig, MinillmOPTForCausalLM),
    "bloom": (MinillmBloomConfig, MinillmBloomForCausalLM),
    "gemma3_text": (MinillmGemma3Config, MinillmGemma3ForCausalLM),
}
