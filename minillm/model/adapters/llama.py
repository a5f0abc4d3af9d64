"""LLaMA family (Llama, Mistral, Qwen2, SmolLM2), including grouped-query attention.

Heads: with ``gqa="query"`` the unit is a query head (q_proj rows, o_proj columns) and
every KV group keeps the same number of query heads; with ``gqa="kv"`` the unit is a KV
group (its query heads, its k/v rows and o_proj columns). Without GQA both are the same.
Channels: gate_proj/up_proj rows and down_proj columns. RoPE is per head and head_dim is
unchanged, so it survives slicing.
"""

from __future__ import annotations

from torch import nn

from minillm.model.adapters.base import Adapter, Block, Group, same_sizes


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    bias_flags = {"attention_bias": ".self_attn.", "mlp_bias": ".mlp."}

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def groups(self, model: nn.Module, layer: int, gqa: str = "query") -> dict[str, Group]:
        attn = self.layers(model)[layer].self_attn
        mlp = self.layers(model)[layer].mlp
        d = attn.head_dim
        n_q = attn.q_proj.out_features // d
        n_kv = attn.k_proj.out_features // d
        per_kv = n_q // n_kv
        if gqa == "kv" or n_q == n_kv:
            heads = Group(
                kind="heads",
                layer=layer,
                n_units=n_kv,
                producers=[
                    Block(attn.q_proj, 0, per_kv * d),
                    Block(attn.k_proj, 0, d),
                    Block(attn.v_proj, 0, d),
                ],
                consumers=[Block(attn.o_proj, 1, per_kv * d)],
            )
        else:
            heads = Group(
                kind="heads",
                layer=layer,
                n_units=n_q,
                producers=[Block(attn.q_proj, 0, d)],
                consumers=[Block(attn.o_proj, 1, d)],
                partitions=n_kv,
                shared=[Block(attn.k_proj, 0, d), Block(attn.v_proj, 0, d)],
            )
        channels = Group(
            kind="channels",
            layer=layer,
            n_units=mlp.up_proj.out_features,
            producers=[Block(mlp.gate_proj, 0, 1), Block(mlp.up_proj, 0, 1)],
            consumers=[Block(mlp.down_proj, 1, 1)],
        )
        return {"heads": heads, "channels": channels}

    def layer_sizes(self, model: nn.Module, layer: int) -> dict[str, int]:
        block = self.layers(model)[layer]
        d = block.self_attn.head_dim
        return {
            "heads": block.self_attn.q_proj.out_features // d,
            "kv_heads": block.self_attn.k_proj.out_features // d,
            "channels": block.mlp.up_proj.out_features,
        }

    def set_layer_attributes(self, model: nn.Module, layer: int, head_ids: list[int]) -> None:
        sizes = self.layer_sizes(model, layer)
        attn = self.layers(model)[layer].self_attn
        attn.num_key_value_groups = sizes["heads"] // sizes["kv_heads"]
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, sizes["heads"])
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = sizes["kv_heads"]

    def plain_config(self, config, sizes: list[dict]) -> dict | None:
        if not same_sizes(sizes) or config.hidden_size % sizes[0]["heads"]:
            return None  # transformers' configs insist on hidden_size % heads == 0
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return {
            "num_attention_heads": sizes[0]["heads"],
            "num_key_value_heads": sizes[0]["kv_heads"],
            "intermediate_size": sizes[0]["channels"],
            "head_dim": head_dim,
        }
