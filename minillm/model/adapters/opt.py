"""OPT: q/k/v/out projections and fc1/fc2, all with biases; ReLU MLP.

OPT derives head_dim from hidden_size // num_attention_heads, so a model with heads
removed cannot be described by a plain OPT config; channels-only uniform pruning can
(``ffn_dim``).
"""

from __future__ import annotations

from torch import nn

from minillm.model.adapters.base import Adapter, Block, Group, same_sizes


class OPTAdapter(Adapter):
    name = "opt"
    model_types = ("opt",)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        decoder = model.model.decoder
        parts = [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]
        return nn.Sequential(*parts)

    def groups(self, model: nn.Module, layer: int, gqa: str = "query") -> dict[str, Group]:
        block = self.layers(model)[layer]
        attn = block.self_attn
        d = attn.head_dim
        heads = Group(
            kind="heads",
            layer=layer,
            n_units=attn.q_proj.out_features // d,
            producers=[
                Block(attn.q_proj, 0, d),
                Block(attn.k_proj, 0, d),
                Block(attn.v_proj, 0, d),
            ],
            consumers=[Block(attn.out_proj, 1, d)],
        )
        channels = Group(
            kind="channels",
            layer=layer,
            n_units=block.fc1.out_features,
            producers=[Block(block.fc1, 0, 1)],
            consumers=[Block(block.fc2, 1, 1)],
        )
        return {"heads": heads, "channels": channels}

    def layer_sizes(self, model: nn.Module, layer: int) -> dict[str, int]:
        block = self.layers(model)[layer]
        heads = block.self_attn.q_proj.out_features // block.self_attn.head_dim
        return {"heads": heads, "kv_heads": heads, "channels": block.fc1.out_features}

    def set_layer_attributes(self, model: nn.Module, layer: int, head_ids: list[int]) -> None:
        self.layers(model)[layer].self_attn.num_heads = len(head_ids)

    def plain_config(self, config, sizes: list[dict]) -> dict | None:
        if not same_sizes(sizes) or sizes[0]["heads"] != config.num_attention_heads:
            return None
        return {"ffn_dim": sizes[0]["channels"]}
