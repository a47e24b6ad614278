"""Sparsity patterns: which entries of a score matrix to remove, and the post-conditions
that say the pattern was met exactly.

Patterns are duck-typed configs: ``kind == "unstructured"`` with ``sparsity``, or
``kind == "nm"`` with ``n`` kept out of every ``m`` consecutive input weights of a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from birdbone.errors import PruneError


@dataclass(frozen=True)
class NMRamp:
    """On the way to N:M: remove ``sparsity`` of each row (at most 1 - N/M) without any
    group of M losing more than M - N, so that the last wave can reach N:M exactly."""

    n: int
    m: int
    sparsity: float
    kind: str = "nm_ramp"


def describe(pattern: Any) -> dict[str, Any]:
    """A pattern config as a plain dict, for reports."""
    return pattern.model_dump() if hasattr(pattern, "model_dump") else dict(vars(pattern))


def prune_count(width: int, sparsity: float) -> int:
    """How many of ``width`` weights a sparsity removes (rounded to nearest)."""
    return int(round(sparsity * width))


def check_fits(name: str, shape: tuple[int, ...], pattern: Any) -> None:
    """Raises before any compute if a layer cannot take the pattern."""
    if pattern.kind in ("nm", "nm_ramp") and shape[1] % pattern.m:
        raise PruneError(
            f"{name} has {shape[1]} input features, not a multiple of M={pattern.m}, so {pattern.n}:{pattern.m} "
            "cannot tile its rows. Fix: choose an M that divides every layer's input width."
        )


def keep_mask(scores: torch.Tensor, pattern: Any, group: str = "row") -> torch.Tensor:
    """The keep-mask (True = keep) that removes the lowest scores under ``pattern``.

    Args:
        scores: ``[out, in]`` importance, higher is more important.
        group: for unstructured sparsity, compare within each output row (``row``, as
            Wanda does) or across the whole layer (``layer``, classic magnitude pruning).
    """
    rows, cols = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pattern.kind == "nm_ramp":
        return mask.scatter_(1, ramp_drop(scores, pattern, prune_count(cols, pattern.sparsity)), False)
    if pattern.kind == "nm":
        grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = grouped.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        return mask.reshape(rows, -1, pattern.m).scatter_(-1, drop, False).reshape(rows, cols)
    if group == "row":
        drop = scores.topk(prune_count(cols, pattern.sparsity), dim=1, largest=False).indices
        return mask.scatter_(1, drop, False)
    drop = scores.reshape(-1).topk(prune_count(scores.numel(), pattern.sparsity), largest=False).indices
    return mask.reshape(-1).scatter_(0, drop, False).reshape(rows, cols)


def ramp_drop(scores: torch.Tensor, pattern: Any, count: int) -> torch.Tensor:
    """Column indices ``[rows, count]`` of the lowest scores of each row, taken only among
    each group's M - N lowest (the N:M candidates)."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
    order = grouped.argsort(dim=-1, stable=True)
    candidate = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order[..., : pattern.m - pattern.n], True)
    limited = torch.where(candidate.reshape(rows, cols), scores, torch.full_like(scores, float("inf")))
    return limited.topk(count, dim=1, largest=False).indices


def check_mask(name: str, mask: torch.Tensor, weight: torch.Tensor, pattern: Any) -> None:
    """Post-conditions: removed weights are exactly zero; the sparsity equals the target
    (within one weight per row) or every N:M group keeps exactly N."""
    if bool((weight[~mask.to(weight.device)] != 0).any()):
        raise PruneError(f"{name}: weights outside the mask are not zero after pruning")
    rows, cols = mask.shape
    if pattern.kind == "nm":
        kept = mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        if not bool((kept == pattern.n).all()):
            raise PruneError(f"{name}: some {pattern.m}-groups do not keep exactly {pattern.n} weights")
        return
    if pattern.kind == "nm_ramp":
        kept = mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        if not bool((kept >= pattern.n).all()):
            raise PruneError(f"{name}: some {pattern.m}-groups keep fewer than {pattern.n} weights before the N:M wave")
    removed = int((~mask).sum())
    target = pattern.sparsity * mask.numel()
    if abs(removed - target) > rows:
        raise PruneError(
            f"{name}: removed {removed} weights, target {target:.0f} (sparsity {pattern.sparsity}); "
            "the method did not reach its target"
        )
