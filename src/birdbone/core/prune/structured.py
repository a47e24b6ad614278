"""Structured pruning that physically removes MLP channels, attention heads and whole
decoder blocks, so the model gets smaller and faster, not just sparser.

Scores come from the calibration walk, in the spirit of Wanda's |W| * ||X|| applied to
whole units (as in FLAP / Wanda-sp):
- MLP channel c: ||X_down[:, c]||_2 * ||W_down[:, c]||_2, how much that channel feeds
  the block's output;
- query head h: the same sum over the columns of o_proj that head h writes; a KV group
  scores the sum of its query heads;
- block: its influence, 1 - cos(input, output) averaged over calibration tokens
  (ShortGPT's block influence); the least influential blocks go.
Widths are rounded to a multiple (default 32) so llama.cpp's block quantization fits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from birdbone.core import structure
from birdbone.core.profile import block_influence_of, column_importance, head_importance
from birdbone.core.prune.patterns import describe
from birdbone.core.stream import require_in_memory
from birdbone.core.walk import InputStats, calibration_walk
from birdbone.errors import PruneError

log = logging.getLogger(__name__)


def kept_width(width: int, ratio: float, multiple: int) -> int:
    """Channels kept when ``ratio`` of ``width`` go, rounded to a multiple."""
    kept = width - round(ratio * width)
    if multiple > 1:
        kept = max(multiple, int(round(kept / multiple)) * multiple)
    return min(kept, width)


def heads_kept(heads: int, kv_heads: int, ratio: float, mode: str) -> tuple[int, int]:
    """(query heads, KV heads) kept: whole KV groups in ``kv_groups`` mode, or the same
    number of query heads from every group in ``query`` mode."""
    per_group = heads // kv_heads
    if mode == "kv_groups":
        kv = kv_heads - round(ratio * kv_heads)
        return kv * per_group, kv
    return (per_group - round(ratio * per_group)) * kv_heads, kv_heads


def check_structured(bundle: Any, pattern: Any) -> None:
    """Raises before any compute when the pattern would empty a layer or removes nothing."""
    config = bundle.model.config
    heads, kv_heads, _ = bundle.adapter.attention_shape(config)
    if pattern.kind == "mlp_channels":
        for name, linear in bundle.adapter.linears(bundle.model).items():
            if name.endswith(bundle.adapter.mlp_linears[0]):
                width = linear.out_features
                if width - round(pattern.ratio * width) < 1:
                    raise PruneError(
                        f"{name}: ratio {pattern.ratio} would remove every one of its {width} channels. "
                        "Fix: lower the ratio."
                    )
    elif pattern.kind == "heads":
        q, kv = heads_kept(heads, kv_heads, pattern.ratio, pattern.mode)
        if q < 1 or kv < 1:
            raise PruneError(
                f"ratio {pattern.ratio} would remove every attention head ({heads} heads in {kv_heads} KV groups). "
                "Fix: lower the ratio."
            )
        step = 1 / kv_heads if pattern.mode == "kv_groups" else 1 / (heads // kv_heads)
        if 0 < q < heads and abs((heads - q) / heads - pattern.ratio) > 1e-9:
            log.warning(
                "heads ratio %s removes %d of %d heads (%.3f): with %d KV groups, "
                "mode '%s' removes heads in steps of %.3f",
                pattern.ratio,
                heads - q,
                heads,
                (heads - q) / heads,
                kv_heads,
                pattern.mode,
                step,
            )
        if q == heads:
            raise PruneError(
                f"ratio {pattern.ratio} removes no head: with {heads} heads in {kv_heads} KV groups, mode "
                f"'{pattern.mode}' removes heads in steps of {step:.3f} of the heads. "
                "Fix: raise the ratio or change the mode."
            )
    elif pattern.kind == "blocks":
        blocks = len(bundle.adapter.blocks(bundle.model))
        if pattern.count >= blocks:
            raise PruneError(f"removing {pattern.count} blocks would leave none of {blocks}. Fix: lower blocks.count.")


class _StructuredPruner:
    """The walk's method for channels and heads: scores from this block's inputs, then the
    block is rebuilt smaller before its outputs are carried to the next block."""

    needs_inputs = True
    needs_gram = False
    needs_frequency = False

    def __init__(self, pattern: Any, adapter: Any, config: Any, criterion: str = "wanda"):
        self.pattern = pattern
        self.criterion = criterion
        self.adapter = adapter
        self.heads, self.kv_heads, self.head_dim = adapter.attention_shape(config)
        self.removed: dict[int, int] = {}

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        a = self.adapter
        if self.pattern.kind == "mlp_channels":
            down_name = f"{a.mlp_path}.{a.mlp_linears[2]}"
            down = linears[down_name]
            score = column_importance(self._input_norm(stats[down_name]), down.weight)
            keep = score.topk(kept_width(down.in_features, self.pattern.ratio, self.pattern.multiple)).indices
            structure.keep_mlp_channels_(block.get_submodule(a.mlp_path), keep, a)
            self.removed[index] = down.in_features - keep.numel()
            return
        o_name = f"{a.attention_path}.{a.attention_linears[3]}"
        o = linears[o_name]
        head_score = head_importance(self._input_norm(stats[o_name]), o.weight, self.head_dim)  # [heads]
        per_group = self.heads // self.kv_heads
        q_keep, kv_keep = heads_kept(self.heads, self.kv_heads, self.pattern.ratio, self.pattern.mode)
        grouped = head_score.reshape(self.kv_heads, per_group)
        if self.pattern.mode == "kv_groups":
            groups = grouped.sum(-1).topk(kv_keep).indices.sort().values
            query = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
        else:
            groups = torch.arange(self.kv_heads)
            within = grouped.topk(q_keep // self.kv_heads, dim=-1).indices.sort(-1).values
            query = (groups[:, None] * per_group + within).reshape(-1)
        structure.keep_heads_(block.get_submodule(a.attention_path), query, groups, self.head_dim, a)
        self.removed[index] = self.heads - query.numel()

    def _input_norm(self, stats: InputStats) -> torch.Tensor:
        """||X_c|| for the activation-aware score; all ones for plain weight magnitude."""
        return stats.norm() if self.criterion == "wanda" else torch.ones(stats.features)


class _BlockInfluence:
    """Measures each block's influence, 1 - mean cos(input, output), without changing it."""

    needs_inputs = True
    needs_gram = False
    needs_frequency = False
    modifies_blocks = False

    def __init__(self) -> None:
        self.influence: dict[int, float] = {}

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        pass

    def after_block(self, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        self.influence[index] = block_influence_of(inputs, outputs)


def block_influence(
    bundle: Any, calibration: torch.Tensor, batch_size: int = 4, device: Any = "cpu", compute_dtype: Any = None
) -> dict[int, float]:
    """Each block's influence over the calibration data (the model is not changed)."""
    method = _BlockInfluence()
    calibration_walk(bundle, calibration, method, batch_size, device, "block influence", compute_dtype)
    return method.influence


STRUCTURED_CRITERIA = ("magnitude", "wanda")


def prune_structure_(
    bundle: Any,
    pattern: Any,
    calibration: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    criterion: str = "wanda",
) -> dict[str, Any]:
    """Removes MLP channels, heads or blocks from ``bundle.model`` in place and records the
    new sizes in its config. Returns a report (units removed per layer, params before and
    after, seconds).

    Args:
        criterion: for channels and heads, ``wanda`` (||W|| * ||X||, activation-aware) or
            ``magnitude`` (||W|| alone); blocks are always ranked by influence.
    """
    from birdbone.core.evaluate import parameter_count

    if criterion not in STRUCTURED_CRITERIA:
        raise PruneError(f"unknown structured criterion '{criterion}'; known: {', '.join(STRUCTURED_CRITERIA)}")
    require_in_memory(bundle, f"structured pruning ({pattern.kind})")
    check_structured(bundle, pattern)
    before = parameter_count(bundle.model)
    linear_before = sum(m.weight.numel() for m in bundle.adapter.linears(bundle.model).values())
    start = time.perf_counter()
    if pattern.kind == "blocks":
        influence = block_influence(bundle, calibration, batch_size, device, compute_dtype)
        drop = sorted(sorted(influence, key=influence.__getitem__)[: pattern.count])
        structure.remove_blocks_(bundle.model, drop, bundle.adapter)
        removed: dict[str, Any] = {"blocks": drop, "influence": influence}
    else:
        method = _StructuredPruner(pattern, bundle.adapter, bundle.model.config, criterion)
        calibration_walk(bundle, calibration, method, batch_size, device, f"{pattern.kind} pruning", compute_dtype)
        removed = {"per_layer": method.removed}
    structure.record_shapes(bundle.model, bundle.adapter)
    after = parameter_count(bundle.model)
    linear_after = sum(m.weight.numel() for m in bundle.adapter.linears(bundle.model).values())
    return {
        "pattern": describe(pattern),
        "criterion": criterion if pattern.kind != "blocks" else "block_influence",
        "params_before": before,
        "params_after": after,
        "sparsity": 1 - linear_after / linear_before,  # share of the block Linears' weights removed
        "removed": removed,
        "shapes": structure.layer_shapes(bundle.model, bundle.adapter),
        "seconds": time.perf_counter() - start,
    }
