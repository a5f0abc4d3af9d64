"""What a prunable structure is, independent of the architecture.

A *group* is one kind of structure in one decoder layer (its attention heads, or its
MLP channels). It has ``n_units`` units (heads, KV groups or channels). Unit ``u`` owns a
contiguous block of ``block`` rows (``dim=0``, weight rows and bias entries) or columns
(``dim=1``) in each of the group's linears: ``[u * block, (u + 1) * block)``.

* ``producers`` are the linears whose output rows compute the unit (q/k/v, up/gate, fc1);
* ``consumers`` are the linears whose input columns read it (o_proj, down_proj, fc2).

Zeroing a unit's consumer columns removes it exactly: that is the masked-dense
reference of the surgery. ``partitions`` > 1 means the units are split into that many
equal contiguous partitions that must keep the same number of units (query heads of a
GQA model, evenly across KV groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Block:
    """Unit ``u`` owns indices ``[u * size, (u + 1) * size)`` of ``linear`` along ``dim``."""

    linear: nn.Linear
    dim: int
    size: int

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Row (dim 0) or column (dim 1) indices of ``units`` ([n] int64), in order."""
        offsets = torch.arange(self.size, device=units.device)
        return (units[:, None] * self.size + offsets[None, :]).reshape(-1)


@dataclass
class Group:
    """One kind of prunable structure ("heads" or "channels") of one decoder layer."""

    kind: str
    layer: int
    n_units: int
    producers: list[Block]
    consumers: list[Block]
    partitions: int = 1
    shared: list[Block] = field(default_factory=list)

    def unit_params(self) -> int:
        """Parameters removed with one unit (weights and biases)."""
        total = 0
        for b in self.producers + self.consumers:
            other = b.linear.weight.shape[1 - b.dim]
            has_bias = b.dim == 0 and b.linear.bias is not None
            total += b.size * (other + int(has_bias))
        return total


def same_sizes(records: list[dict]) -> bool:
    """Whether every layer record has the same head, KV head and channel counts."""
    keys = ("heads", "kv_heads", "channels")
    return all(all(r[k] == records[0][k] for k in keys) for r in records)


class Adapter:
    """Describes one architecture family: its layers, groups and per-layer attributes."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    # decoder blocks get different masks / RoPE per layer (sliding-window vs global layers), so
    # block 0's keyword arguments cannot be replayed for every block: the block loop records
    # each block's own (minillm.blocks.loop.capture)
    per_layer_block_kwargs: bool = False
    # config flags that give every linear under a module path a bias (LLaMA's attention_bias
    # and mlp_bias): how a plain config expresses biases the refit added (model.io)
    bias_flags: dict[str, str] = {}

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """What the last block's output goes through before the LM head (norm, projection)."""
        raise NotImplementedError

    def groups(self, model: nn.Module, layer: int, gqa: str = "query") -> dict[str, Group]:
        """``{"heads": Group, "channels": Group}`` for decoder layer ``layer``."""
        raise NotImplementedError

    def layer_sizes(self, model: nn.Module, layer: int) -> dict[str, int]:
        """Current ``{"heads", "kv_heads", "channels"}`` of decoder layer ``layer``."""
        raise NotImplementedError

    def set_layer_attributes(self, model: nn.Module, layer: int, head_ids: list[int]) -> None:
        """Update the attention module's head counts after slicing.

        ``head_ids`` are the original indices of the surviving query heads.
        """
        raise NotImplementedError

    def plain_config(self, config, sizes: list[dict]) -> dict | None:
        """Config updates that let plain transformers load the pruned model, or None.

        ``sizes`` holds one ``layer_sizes`` dict per decoder layer.
        """
        raise NotImplementedError
