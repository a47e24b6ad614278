"""The pruner registry and the base class that turns per-layer scores into masks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from birdbone.core import clusters
from birdbone.core.masks import MaskSet, zero_masked_
from birdbone.core.prune.patterns import check_mask, keep_mask
from birdbone.core.walk import InputStats

PRUNERS: dict[str, type[LayerPruner]] = {}


def register(name: str) -> Callable[[type[LayerPruner]], type[LayerPruner]]:
    """Registers a pruner class under ``name``."""

    def wrap(cls: type[LayerPruner]) -> type[LayerPruner]:
        cls.name = name
        PRUNERS[name] = cls
        return cls

    return wrap


class LayerPruner:
    """A ``BlockMethod`` that prunes every Linear of each block as it is walked.

    Subclasses give ``scores`` (higher = keep); those needing more than a mask (SparseGPT's
    weight update) override ``prune_linear``.
    """

    name: ClassVar[str] = ""
    needs_inputs: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = False
    needs_frequency: ClassVar[bool] = False
    group: ClassVar[str] = "row"
    ranks_scores: ClassVar[bool] = True  # masks come from ``scores`` (SparseGPT's come with a weight update)

    def __init__(self, pattern: Any, prefix: str, options: Any = None):
        self.pattern = pattern
        self.prefix = prefix
        self.options = options
        self.masks = MaskSet()
        self.block_patterns: dict[int, Any] = {}  # per-block targets (OWL); default: ``pattern``
        self.prior: MaskSet | None = None  # masks of earlier waves: what they removed stays removed
        # per-cluster shares of some Linears (``core.cluster_decay``): name -> (labels, axis, sparsities)
        self.cluster_quotas: dict[str, Any] = {}

    @property
    def needs_calibration(self) -> bool:
        """Whether the method needs calibration blocks at all."""
        return self.needs_inputs

    def prepare(self, bundle: Any, calibration: torch.Tensor | None, device: Any) -> None:
        """Runs once before the walk, on the model as it is (e.g. to measure gradients)."""

    def scores(self, linear: nn.Linear, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def mask_from(
        self, scores: torch.Tensor, pattern: Any, prior: torch.Tensor | None, name: str | None = None
    ) -> torch.Tensor:
        """The keep-mask for ``scores``; weights ``prior`` already removed are removed first.
        A Linear with cluster quotas removes each cluster's own share instead."""
        if name in self.cluster_quotas:
            labels, axis, sparsities = self.cluster_quotas[name]
            return clusters.keep_mask(scores, labels, axis, sparsities, prior)
        if prior is not None:
            scores = scores.masked_fill(~prior.to(scores.device), float("-inf"))
        mask = keep_mask(scores, pattern, self.group)
        return mask if prior is None else mask & prior.to(mask.device)

    @torch.no_grad()
    def prune_linear(
        self, linear: nn.Linear, stats: InputStats | None, name: str, pattern: Any, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masks the layer in place under ``pattern`` (keeping ``prior``'s removals) and
        returns its keep-mask."""
        mask = self.mask_from(self.scores(linear, stats), pattern, prior, name)
        zero_masked_(linear.weight.data, mask)
        return mask

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        pattern = self.block_patterns.get(index, self.pattern)
        for name, linear in linears.items():
            full = f"{self.prefix}.{index}.{name}.weight"
            prior = self.prior[full] if self.prior is not None and full in self.prior else None
            mask = self.prune_linear(linear, stats.get(name), full, pattern, prior)
            check_mask(full, mask, linear.weight, pattern)
            self.masks[full] = mask
