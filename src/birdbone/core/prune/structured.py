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
import math
import time
from typing import Any

import torch
from torch import nn

from birdbone.core import structure
from birdbone.core.masks import MaskSet, zero_masked_
from birdbone.core.profile import block_influence_of, column_importance, head_importance
from birdbone.core.prune.patterns import describe
from birdbone.core.stream import require_in_memory
from birdbone.core.walk import InputStats, ReadOnlyMethod, calibration_walk
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

    def __init__(self, pattern: Any, adapter: Any, config: Any, criterion: str = "wanda", prior: MaskSet | None = None):
        self.pattern = pattern
        self.criterion = criterion
        self.adapter = adapter
        self.heads, self.kv_heads, self.head_dim = adapter.attention_shape(config)
        self.removed: dict[int, int] = {}
        # soft (``prior`` given, even empty): zero the units and record masks, shapes unchanged
        self.prior = prior
        self.masks = MaskSet() if prior is not None else None

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        a = self.adapter
        prior = self._prior_masks(index, linears)
        if self.pattern.kind == "mlp_channels":
            down_name = f"{a.mlp_path}.{a.mlp_linears[2]}"
            down = linears[down_name]
            score = column_importance(self._input_norm(stats[down_name]), down.weight)
            if prior is not None:  # channels earlier waves removed stay removed
                score = score.masked_fill(~prior[down_name].any(0).to(score.device), float("-inf"))
            keep = score.topk(kept_width(down.in_features, self.pattern.ratio, self.pattern.multiple)).indices
            self.removed[index] = down.in_features - keep.numel()
            if prior is None:
                structure.keep_mlp_channels_(block.get_submodule(a.mlp_path), keep, a)
                return
            kept = torch.zeros(down.in_features, dtype=torch.bool).index_fill_(0, keep.cpu(), True)
            units = {f"{a.mlp_path}.{n}": ("rows", kept) for n in a.mlp_linears[:2]}
            units[down_name] = ("cols", kept)
            self._mask_units(index, linears, prior, units)
            return
        o_name = f"{a.attention_path}.{a.attention_linears[3]}"
        o = linears[o_name]
        head_score = head_importance(self._input_norm(stats[o_name]), o.weight, self.head_dim)  # [heads]
        if prior is not None:  # heads earlier waves removed stay removed
            gone = ~prior[o_name].reshape(-1, self.heads, self.head_dim).any(-1).any(0)
            head_score = head_score.masked_fill(gone.to(head_score.device), float("-inf"))
        per_group = self.heads // self.kv_heads
        q_keep, kv_keep = heads_kept(self.heads, self.kv_heads, self.pattern.ratio, self.pattern.mode)
        grouped = head_score.reshape(self.kv_heads, per_group)
        if self.pattern.mode == "kv_groups":
            groups = grouped.sum(-1).topk(kv_keep).indices.sort().values
            query = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).reshape(-1)
        else:
            groups = torch.arange(self.kv_heads, device=grouped.device)
            within = grouped.topk(q_keep // self.kv_heads, dim=-1).indices.sort(-1).values
            query = (groups[:, None] * per_group + within).reshape(-1)
        self.removed[index] = self.heads - query.numel()
        if prior is None:
            structure.keep_heads_(block.get_submodule(a.attention_path), query, groups, self.head_dim, a)
            return
        q, k, v, o_lin = (f"{a.attention_path}.{n}" for n in a.attention_linears)
        kept_q = torch.zeros(self.heads, dtype=torch.bool).index_fill_(0, query.cpu(), True)
        kept_kv = torch.zeros(self.kv_heads, dtype=torch.bool).index_fill_(0, groups.cpu(), True)
        q_dims = kept_q.repeat_interleave(self.head_dim)
        kv_dims = kept_kv.repeat_interleave(self.head_dim)
        units = {q: ("rows", q_dims), k: ("rows", kv_dims), v: ("rows", kv_dims), o_lin: ("cols", q_dims)}
        self._mask_units(index, linears, prior, units)

    def _prior_masks(self, index: int, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor] | None:
        """This block's keep-masks from earlier waves (soft mode), all-True where none."""
        if self.prior is None:
            return None
        out = {}
        for name, linear in linears.items():
            full = f"{self.adapter.blocks_path}.{index}.{name}.weight"
            out[name] = self.prior[full] if full in self.prior else torch.ones(linear.weight.shape, dtype=torch.bool)
        return out

    @torch.no_grad()
    def _mask_units(
        self,
        index: int,
        linears: dict[str, nn.Linear],
        prior: dict[str, torch.Tensor],
        units: dict[str, tuple[str, torch.Tensor]],
    ) -> None:
        """Zeroes the rows / columns not kept and records every Linear's mask of the block."""
        assert self.masks is not None
        for name, linear in linears.items():
            mask = prior[name].clone()
            if name in units:
                axis, kept = units[name]
                mask &= kept[:, None] if axis == "rows" else kept[None, :]
            zero_masked_(linear.weight.data, mask)
            self.masks[f"{self.adapter.blocks_path}.{index}.{name}.weight"] = mask

    def _input_norm(self, stats: InputStats) -> torch.Tensor:
        """||X_c|| for the activation-aware score; all ones for plain weight magnitude."""
        norm = stats.norm()
        return norm if self.criterion == "wanda" else torch.ones_like(norm)


class _BlockInfluence(ReadOnlyMethod):
    """Measures each block's influence, 1 - mean cos(input, output), without changing it."""

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


def _check(bundle: Any, pattern: Any, criterion: str) -> None:
    if criterion not in STRUCTURED_CRITERIA:
        raise PruneError(f"unknown structured criterion '{criterion}'; known: {', '.join(STRUCTURED_CRITERIA)}")
    require_in_memory(bundle, f"structured pruning ({pattern.kind})")
    check_structured(bundle, pattern)


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

    _check(bundle, pattern, criterion)
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


# --------------------------------------------------------------------------- in waves: masks, then compaction


def _all_masks(bundle: Any, prior: MaskSet | None) -> MaskSet:
    """Keep-masks of every block Linear: ``prior``'s, all-True where it has none."""
    masks = MaskSet()
    for name, linear in bundle.adapter.linears(bundle.model).items():
        full = f"{name}.weight"
        masks[full] = (
            prior[full] if prior is not None and full in prior else torch.ones(linear.weight.shape, dtype=torch.bool)
        )
    return masks


def removed_blocks(masks: MaskSet, bundle: Any) -> list[int]:
    """Blocks whose every Linear weight is masked (they pass their input through)."""
    out = []
    for index in range(len(bundle.adapter.blocks(bundle.model))):
        prefix = f"{bundle.adapter.blocks_path}.{index}."
        names = [n for n in masks if n.startswith(prefix)]
        if names and all(masks.kept(n) == 0 for n in names):
            out.append(index)
    return out


def mask_structure_(
    bundle: Any,
    pattern: Any,
    calibration: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    criterion: str = "wanda",
    prior: MaskSet | None = None,
) -> tuple[MaskSet, dict[str, Any]]:
    """Structured pruning by masks, for decay waves: the units ``prune_structure_`` would
    remove are zeroed (rows and columns of whole channels and heads, every weight of whole
    blocks) and masked, the shapes stay, so a wave can be undone from its delta like any
    other. Units ``prior`` removed stay removed and count towards the target; ``compact_``
    removes the masked units physically at the end. A zeroed unit contributes exactly zero,
    so the masked model computes what the compacted one does.

    Returns:
        Keep-masks of every block Linear and a report (units removed per layer, sparsity
        of the block Linears, seconds).
    """
    _check(bundle, pattern, criterion)
    start = time.perf_counter()
    masks = _all_masks(bundle, prior)
    if pattern.kind == "blocks":
        gone = removed_blocks(masks, bundle)
        influence = block_influence(bundle, calibration, batch_size, device, compute_dtype)
        candidates = sorted((i for i in influence if i not in gone), key=influence.__getitem__)
        drop = sorted(gone + candidates[: max(pattern.count - len(gone), 0)])
        with torch.no_grad():
            for name, linear in bundle.adapter.linears(bundle.model).items():
                index = int(name.removeprefix(bundle.adapter.blocks_path + ".").split(".")[0])
                if index in drop:
                    linear.weight.zero_()
                    masks[f"{name}.weight"] = torch.zeros(linear.weight.shape, dtype=torch.bool)
        removed: dict[str, Any] = {"blocks": drop, "influence": influence}
    else:
        method = _StructuredPruner(pattern, bundle.adapter, bundle.model.config, criterion, prior=masks)
        calibration_walk(bundle, calibration, method, batch_size, device, f"{pattern.kind} pruning", compute_dtype)
        assert method.masks is not None
        masks.update(method.masks)
        removed = {"per_layer": method.removed}
    return masks, {
        "pattern": describe(pattern),
        "criterion": criterion if pattern.kind != "blocks" else "block_influence",
        "sparsity": masks.overall_sparsity(),
        "removed": removed,
        "seconds": time.perf_counter() - start,
    }


def wave_pattern(pattern: Any, bundle: Any, fraction: float, last: bool) -> Any:
    """The pattern after a wave that reaches ``fraction`` of the final ``pattern``'s units:
    MLP channels rounded so no wave removes more than its share (widths stay multiples of
    ``multiple``), heads up to the next whole step (one head per group or one KV group:
    the smallest unit attention has), blocks one by one. The last wave is ``pattern``."""
    if last:
        return pattern
    if pattern.kind == "mlp_channels":
        gate = bundle.adapter.mlp_linears[0]
        width = next(m.out_features for n, m in bundle.adapter.linears(bundle.model).items() if n.endswith(gate))
        final = kept_width(width, pattern.ratio, pattern.multiple)
        keep = width - int(fraction * pattern.ratio * width + 1e-9)
        keep = min(width, -(-keep // pattern.multiple) * pattern.multiple)
        return pattern.model_copy(update={"ratio": (width - max(keep, final)) / width})
    if pattern.kind == "heads":
        heads, kv_heads, _ = bundle.adapter.attention_shape(bundle.model.config)
        units = kv_heads if pattern.mode == "kv_groups" else heads // kv_heads
        final = round(pattern.ratio * units)
        steps = min(final, math.ceil(fraction * final - 1e-9))
        return pattern.model_copy(update={"ratio": steps / units})
    return pattern.model_copy(update={"count": min(pattern.count, math.ceil(fraction * pattern.count - 1e-9))})


def unit_ids(pattern: Any, bundle: Any) -> Any:
    """``unit_of(name, flat_index)`` for ``WaveDelta.group_units_``: the unit a removed weight
    belongs to (an MLP channel, a query head or KV group, or a block), one id space for
    the model."""
    a = bundle.adapter
    heads, kv_heads, head_dim = a.attention_shape(bundle.model.config)
    shapes = {f"{n}.weight": tuple(m.weight.shape) for n, m in a.linears(bundle.model).items()}
    per_group = heads // kv_heads
    span = 1 << 32

    def unit_of(name: str, index: torch.Tensor) -> torch.Tensor:
        rest = name.removeprefix(a.blocks_path + ".")
        layer, local = int(rest.split(".")[0]), rest.split(".", 1)[1].removesuffix(".weight")
        rows, cols = shapes[name]
        row, col = index // cols, index % cols
        if pattern.kind == "blocks":
            unit = torch.zeros_like(index)
        elif pattern.kind == "mlp_channels":
            unit = col if local.endswith(a.mlp_linears[2]) else row
        else:
            q, k, v, o = (f"{a.attention_path}.{n}" for n in a.attention_linears)
            head = {q: row // head_dim, o: col // head_dim}.get(local)
            if pattern.mode == "query":
                # the heads of one layer go together: every group loses the same number
                unit = torch.zeros_like(index)
            elif head is not None:
                unit = head // per_group
            else:  # k / v rows of a KV group
                unit = row // head_dim
        return layer * span + unit

    return unit_of


def plan_from_masks(bundle: Any, masks: MaskSet) -> list[dict[str, torch.Tensor] | None]:
    """What ``compact_`` would keep of each block: None for a block whose every Linear is
    masked, else the kept MLP channels, query heads and KV heads (a unit goes only when
    every weight of it, in every Linear it spans, is masked; query heads come back where a
    group would otherwise keep fewer than the others, as grouped attention needs)."""
    a = bundle.adapter
    heads, kv_heads, head_dim = a.attention_shape(bundle.model.config)
    per_group = heads // kv_heads
    gone = set(removed_blocks(masks, bundle))
    plan: list[dict[str, torch.Tensor] | None] = []
    for index in range(len(a.blocks(bundle.model))):
        if index in gone:
            plan.append(None)
            continue

        block = a.blocks(bundle.model)[index]

        def mask(path: str, name: str, block: nn.Module = block, index: int = index) -> torch.Tensor:
            full = f"{a.blocks_path}.{index}.{path}.{name}.weight"
            shape = block.get_submodule(f"{path}.{name}").weight.shape
            return masks[full] if full in masks else torch.ones(shape, dtype=torch.bool)

        gate, up, down = (mask(a.mlp_path, n) for n in a.mlp_linears)
        channels = gate.any(1) | up.any(1) | down.any(0)
        q, k, v, o = (mask(a.attention_path, n) for n in a.attention_linears)
        query = (q.reshape(heads, -1).any(1) | o.reshape(-1, heads, head_dim).any(-1).any(0)).reshape(
            kv_heads, per_group
        )
        kv = k.reshape(kv_heads, -1).any(1) | v.reshape(kv_heads, -1).any(1) | query.any(1)
        # every kept KV group keeps the same number of query heads: top up with masked ones
        count = int(query[kv].sum(1).max()) if bool(kv.any()) else 0
        for g in kv.nonzero().reshape(-1).tolist():
            missing = count - int(query[g].sum())
            if missing:
                query[g, (~query[g]).nonzero().reshape(-1)[:missing]] = True
        plan.append(
            {
                "channels": channels.nonzero().reshape(-1),
                "query": (query & kv[:, None]).reshape(-1).nonzero().reshape(-1),
                "kv": kv.nonzero().reshape(-1),
            }
        )
    return plan


def compact_param_count(bundle: Any, masks: MaskSet) -> int:
    """The parameter count the model has once ``compact_`` removes its masked units."""
    from birdbone.core.evaluate import parameter_count

    a = bundle.adapter
    _, _, head_dim = a.attention_shape(bundle.model.config)
    total = parameter_count(bundle.model)
    for block, keep in zip(a.blocks(bundle.model), plan_from_masks(bundle, masks), strict=True):
        if keep is None:
            total -= sum(p.numel() for p in block.parameters())
            continue
        gate, up, down = (block.get_submodule(f"{a.mlp_path}.{n}") for n in a.mlp_linears)
        q, k, v, o = (block.get_submodule(f"{a.attention_path}.{n}") for n in a.attention_linears)
        # a removed unit takes its rows of the Linears it feeds (and their biases) and its
        # columns of the Linear it feeds into
        total -= (gate.out_features - keep["channels"].numel()) * (_row(gate) + _row(up) + down.out_features)
        total -= (q.out_features - keep["query"].numel() * head_dim) * (_row(q) + o.out_features)
        total -= (k.out_features - keep["kv"].numel() * head_dim) * (_row(k) + _row(v))
    return total


def _row(linear: nn.Linear) -> int:
    """Parameters in one output row: its weights and its bias."""
    return linear.in_features + (linear.bias is not None)


@torch.no_grad()
def compact_(bundle: Any, masks: MaskSet) -> tuple[MaskSet, dict[str, Any]]:
    """Removes the masked units physically (what ``mask_structure_`` zeroed, or any unit
    every weight of which is masked), records the new sizes in the config, and returns
    the masks of the smaller model (what stays of any unstructured masking) and a report."""
    from birdbone.core.evaluate import parameter_count

    require_in_memory(bundle, "compaction")
    a = bundle.adapter
    _, _, head_dim = a.attention_shape(bundle.model.config)
    before = parameter_count(bundle.model)
    plan = plan_from_masks(bundle, masks)
    full = {f"{n}.weight": masks[f"{n}.weight"] for n in a.linears(bundle.model) if f"{n}.weight" in masks}

    def dims(heads: torch.Tensor) -> torch.Tensor:
        return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)

    kept_masks: list[dict[str, torch.Tensor]] = []
    for index, keep in enumerate(plan):
        if keep is None:
            continue
        block = a.blocks(bundle.model)[index]
        prefix = f"{a.blocks_path}.{index}."
        local = {n.removeprefix(prefix): m for n, m in full.items() if n.startswith(prefix)}
        gate, up, down = (f"{a.mlp_path}.{n}.weight" for n in a.mlp_linears)
        q, k, v, o = (f"{a.attention_path}.{n}.weight" for n in a.attention_linears)
        sliced = {
            gate: (keep["channels"], None),
            up: (keep["channels"], None),
            down: (None, keep["channels"]),
            q: (dims(keep["query"]), None),
            k: (dims(keep["kv"]), None),
            v: (dims(keep["kv"]), None),
            o: (None, dims(keep["query"])),
        }
        new = {}
        for name, mask in local.items():
            rows, cols = sliced.get(name, (None, None))
            if rows is not None:
                mask = mask[rows]
            if cols is not None:
                mask = mask[:, cols]
            new[name] = mask
        kept_masks.append(new)
        structure.keep_mlp_channels_(block.get_submodule(a.mlp_path), keep["channels"], a)
        structure.keep_heads_(block.get_submodule(a.attention_path), keep["query"], keep["kv"], head_dim, a)
    dropped = [i for i, keep in enumerate(plan) if keep is None]
    if dropped:
        structure.remove_blocks_(bundle.model, dropped, a)
    structure.record_shapes(bundle.model, a)
    out = MaskSet()
    for index, new in enumerate(kept_masks):
        for name, mask in new.items():
            out[f"{a.blocks_path}.{index}.{name}"] = mask
    out.apply_(bundle.model)
    return out, {
        "params_before": before,
        "params_after": parameter_count(bundle.model),
        "blocks_removed": dropped,
        "shapes": structure.layer_shapes(bundle.model, a),
    }
