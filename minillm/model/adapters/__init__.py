"""Architecture adapters: which tensors form a head or a channel, and how to slice them."""

from __future__ import annotations

from torch import nn

from minillm.model.adapters.base import Adapter, Block, Group
from minillm.model.adapters.bloom import BloomAdapter
from minillm.model.adapters.gemma3 import Gemma3Adapter
from minillm.model.adapters.llama import LlamaAdapter
from minillm.model.adapters.opt import OPTAdapter

ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), OPTAdapter(), BloomAdapter(), Gemma3Adapter())

__all__ = ["ADAPTERS", "Adapter", "Block", "Group", "adapter_for", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    """The adapter of a model (or a config ``model_type``); ValueError if unsupported."""
    model_type = (
        model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    )
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )
