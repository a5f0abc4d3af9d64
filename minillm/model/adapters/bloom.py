"""BLOOM: fused query_key_value laid out per head as [q, k, v], dense, and a 4h MLP.

ALiBi slopes are computed from the model's head count, so each pruned layer keeps the
original head count's alibi tensor and selects the rows of its surviving heads (a
forward pre-hook on the attention module). Plain transformers cannot express that, nor
an MLP narrower than 4 * hidden_size: pruned BLOOM models always load through
``minillm.load_pruned``.
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.model.adapters.base import Adapter, Block, Group


def _select_alibi_heads(head_ids: torch.Tensor, n_heads: int):
    """Forward pre-hook keeping the alibi rows ``[batch * n_heads, 1, kv]`` of ``head_ids``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        alibi = kwargs["alibi"]
        batch = alibi.shape[0] // n_heads
        ids = head_ids.to(alibi.device)
        kwargs["alibi"] = alibi.view(batch, n_heads, *alibi.shape[1:])[:, ids].flatten(0, 1)
        return args, kwargs

    return hook


class BloomAdapter(Adapter):
    name = "bloom"
    model_types = ("bloom",)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.transformer.ln_f

    def groups(self, model: nn.Module, layer: int, gqa: str = "query") -> dict[str, Group]:
        block = self.layers(model)[layer]
        attn, mlp = block.self_attention, block.mlp
        d = attn.head_dim
        heads = Group(
            kind="heads",
            layer=layer,
            n_units=attn.query_key_value.out_features // (3 * d),
            producers=[Block(attn.query_key_value, 0, 3 * d)],
            consumers=[Block(attn.dense, 1, d)],
        )
        channels = Group(
            kind="channels",
            layer=layer,
            n_units=mlp.dense_h_to_4h.out_features,
            producers=[Block(mlp.dense_h_to_4h, 0, 1)],
            consumers=[Block(mlp.dense_4h_to_h, 1, 1)],
        )
        return {"heads": heads, "channels": channels}

    def layer_sizes(self, model: nn.Module, layer: int) -> dict[str, int]:
        block = self.layers(model)[layer]
        attn = block.self_attention
        heads = attn.query_key_value.out_features // (3 * attn.head_dim)
        return {"heads": heads, "kv_heads": heads, "channels": block.mlp.dense_h_to_4h.out_features}

    def set_layer_attributes(self, model: nn.Module, layer: int, head_ids: list[int]) -> None:
        attn = self.layers(model)[layer].self_attention
        attn.num_heads = len(head_ids)
        if getattr(attn, "_minillm_alibi_hook", None) is not None:
            attn._minillm_alibi_hook.remove()
        hook = _select_alibi_heads(torch.tensor(head_ids), model.config.n_head)
        attn._minillm_alibi_hook = attn.register_forward_pre_hook(hook, with_kwargs=True)

    def plain_config(self, config, sizes: list[dict]) -> dict | None:
        return None
