"""Physical shape changes of decoder blocks: smaller MLPs, fewer heads, fewer blocks.

Structured pruning really shrinks the tensors. The new sizes are recorded in the model
config: when every layer has the same sizes, the standard fields (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``) say so and stock
transformers loads the model; when they differ, ``birdbone_layers`` lists each layer's
sizes and ``apply_layer_shapes_`` rebuilds them before the weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAYER_SHAPES = "birdbone_layers"


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the selected output rows / input columns of ``linear``."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    rows = rows.to(weight.device) if rows is not None else None
    cols = cols.to(weight.device) if cols is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def keep_mlp_channels_(mlp: nn.Module, keep: torch.Tensor, adapter: Any) -> None:
    """Keeps only the intermediate channels ``keep`` (sorted indices): rows of gate/up,
    the matching columns of down."""
    gate, up, down = adapter.mlp_linears
    keep = keep.sort().values
    setattr(mlp, gate, _sliced(getattr(mlp, gate), rows=keep))
    setattr(mlp, up, _sliced(getattr(mlp, up), rows=keep))
    setattr(mlp, down, _sliced(getattr(mlp, down), cols=keep))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def keep_heads_(
    attention: nn.Module, keep_query: torch.Tensor, keep_kv: torch.Tensor, head_dim: int, adapter: Any
) -> None:
    """Keeps query heads ``keep_query`` and KV heads ``keep_kv`` (sorted indices). Every
    kept KV head must keep the same number of query heads (grouped-query attention)."""
    q, k, v, o = adapter.attention_linears

    def columns(heads: torch.Tensor) -> torch.Tensor:
        return (heads.sort().values[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)

    setattr(attention, q, _sliced(getattr(attention, q), rows=columns(keep_query)))
    setattr(attention, k, _sliced(getattr(attention, k), rows=columns(keep_kv)))
    setattr(attention, v, _sliced(getattr(attention, v), rows=columns(keep_kv)))
    setattr(attention, o, _sliced(getattr(attention, o), cols=columns(keep_query)))
    attention.num_key_value_groups = int(keep_query.numel() // keep_kv.numel())


def remove_blocks_(model: nn.Module, drop: list[int], adapter: Any) -> None:
    """Removes whole decoder blocks and renumbers the rest (their KV-cache slots)."""
    blocks = adapter.blocks(model)
    kept = [block for i, block in enumerate(blocks) if i not in set(drop)]
    parent_name, _, attr = adapter.blocks_path.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, nn.ModuleList(kept))
    for index, block in enumerate(kept):
        attention = block.get_submodule(adapter.attention_path)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = index
        if hasattr(block, "layer_idx"):
            block.layer_idx = index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
    config.num_hidden_layers = len(kept)


def layer_shapes(model: nn.Module, adapter: Any) -> list[dict[str, int]]:
    """Each block's sizes as its tensors say."""
    _, _, head_dim = adapter.attention_shape(model.config)
    q, k, _, _ = adapter.attention_linears
    shapes = []
    for block in adapter.blocks(model):
        attention = block.get_submodule(adapter.attention_path)
        mlp = block.get_submodule(adapter.mlp_path)
        shapes.append(
            {
                "intermediate_size": getattr(mlp, adapter.mlp_linears[0]).out_features,
                "num_attention_heads": getattr(attention, q).out_features // head_dim,
                "num_key_value_heads": getattr(attention, k).out_features // head_dim,
            }
        )
    return shapes


def record_shapes(model: nn.Module, adapter: Any) -> None:
    """Writes the blocks' sizes into the config: standard fields when uniform, else
    ``birdbone_layers`` (and the standard fields at their largest, for the build)."""
    config = model.config
    _, _, head_dim = adapter.attention_shape(config)
    config.head_dim = head_dim  # keep it explicit: hidden_size / heads no longer gives it
    shapes = layer_shapes(model, adapter)
    config.num_hidden_layers = len(shapes)
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        setattr(config, key, max(s[key] for s in shapes))
    uniform = all(s == shapes[0] for s in shapes)
    if uniform:
        if hasattr(config, LAYER_SHAPES):
            delattr(config, LAYER_SHAPES)
    else:
        setattr(config, LAYER_SHAPES, shapes)


def apply_layer_shapes_(model: nn.Module, adapter: Any) -> None:
    """Resizes a freshly built model's blocks to the sizes in ``birdbone_layers`` (the
    values are then loaded from the checkpoint)."""
    shapes = getattr(model.config, LAYER_SHAPES, None)
    if not shapes:
        return
    _, _, head_dim = adapter.attention_shape(model.config)
    for block, shape in zip(adapter.blocks(model), shapes, strict=True):
        keep_mlp_channels_(block.get_submodule(adapter.mlp_path), torch.arange(shape["intermediate_size"]), adapter)
        keep_heads_(
            block.get_submodule(adapter.attention_path),
            torch.arange(shape["num_attention_heads"]),
            torch.arange(shape["num_key_value_heads"]),
            head_dim,
            adapter,
        )
