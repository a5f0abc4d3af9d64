"""Structural removal: slice weights, biases and per-layer attributes of kept units."""

from __future__ import annotations

import torch
from torch import nn

from minillm.model.adapters import Adapter, Group


def slice_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keep rows (``dim=0``, with the bias) or columns (``dim=1``) ``index`` of ``linear``."""
    index = index.to(linear.weight.device)
    weight = linear.weight.data.index_select(dim, index).contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias.data.index_select(0, index).contiguous()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def prune_group(group: Group, keep: torch.Tensor) -> None:
    """Remove every unit of ``group`` not in ``keep`` ([k] int64 unit ids)."""
    keep = keep.sort().values
    for block in group.producers + group.consumers:
        slice_linear(block.linear, block.dim, block.indices(keep))


def first_units(group: Group, n_keep: int) -> torch.Tensor:
    """The first ``n_keep`` units, spread evenly over the group's partitions."""
    per_partition = group.n_units // group.partitions
    k = n_keep // group.partitions
    return torch.cat(
        [torch.arange(p * per_partition, p * per_partition + k) for p in range(group.partitions)]
    )


def _head_ids(layer_module: nn.Module, n_heads: int) -> list[int]:
    return getattr(layer_module, "minillm_head_ids", list(range(n_heads)))


def prune_layer(
    model: nn.Module,
    adapter: Adapter,
    layer: int,
    keep_heads: torch.Tensor | None,
    keep_channels: torch.Tensor | None,
    gqa: str = "query",
) -> None:
    """Prune one decoder layer to the given kept head units and channels (None: keep all)."""
    groups = adapter.groups(model, layer, gqa)
    layer_module = adapter.layers(model)[layer]
    if keep_heads is not None:
        heads = groups["heads"]
        ids = _head_ids(layer_module, adapter.layer_sizes(model, layer)["heads"])
        per_unit = len(ids) // heads.n_units
        kept = keep_heads.sort().values.tolist()
        layer_module.minillm_head_ids = [
            ids[u * per_unit + j] for u in kept for j in range(per_unit)
        ]
        prune_group(heads, keep_heads)
        adapter.set_layer_attributes(model, layer, layer_module.minillm_head_ids)
    if keep_channels is not None:
        prune_group(groups["channels"], keep_channels)


def count_params(model: nn.Module) -> int:
    """Every parameter of ``model`` (embeddings, norms and dense layers included)."""
    return sum(p.numel() for p in model.parameters())


def layer_records(model: nn.Module, adapter: Adapter) -> list[dict]:
    """Per decoder layer: kept ``heads``, ``kv_heads``, ``channels`` and original ``head_ids``."""
    records = []
    for i, layer_module in enumerate(adapter.layers(model)):
        sizes = adapter.layer_sizes(model, i)
        sizes["head_ids"] = list(_head_ids(layer_module, sizes["heads"]))
        records.append(sizes)
    return records


def resize_to_records(model: nn.Module, adapter: Adapter, records: list[dict]) -> None:
    """Shape a freshly built dense model like a pruned one (weights are loaded afterwards)."""
    for i, rec in enumerate(records):
        sizes = adapter.layer_sizes(model, i)
        if rec["kv_heads"] < sizes["kv_heads"]:
            group = adapter.groups(model, i, "kv")["heads"]
            prune_layer(model, adapter, i, first_units(group, rec["kv_heads"]), None, "kv")
        sizes = adapter.layer_sizes(model, i)
        if rec["heads"] < sizes["heads"]:
            group = adapter.groups(model, i, "query")["heads"]
            prune_layer(model, adapter, i, first_units(group, rec["heads"]), None, "query")
        if rec["channels"] < sizes["channels"]:
            group = adapter.groups(model, i)["channels"]
            prune_layer(model, adapter, i, None, first_units(group, rec["channels"]))
        adapter.layers(model)[i].minillm_head_ids = list(rec["head_ids"])
        adapter.set_layer_attributes(model, i, rec["head_ids"])
