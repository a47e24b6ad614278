"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise
Sparsity", arXiv:2310.05175).

Blocks differ in how many outlier weights they hold, and outliers matter: a block whose
Wanda scores |W_ij| * ||X_j|| exceed ``threshold`` times the block's mean more often keeps
more of its weights. Each block's outlier ratio D_l is min-max scaled to [0, 2 * spread],
centred on the target keep ratio, so the block sparsities lie within target +- spread and
average exactly to the target (all blocks of a model have the same size).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from birdbone.core.walk import InputStats, ReadOnlyMethod, calibration_walk, resident_block

log = logging.getLogger(__name__)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of the scores (all of a block's Linears together) above ``threshold`` x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).double().mean())


def block_sparsities(ratios: Sequence[float], target: float, spread: float) -> list[float]:
    """OWL's allocation: sparsity_l = target - (scaled D_l - mean scaled D), scaled to
    [0, 2 * spread]. The spread shrinks where target +- spread would leave [0, 1)."""
    spread = max(0.0, min(spread, target, 1.0 - target - 1e-3))
    d = torch.tensor(ratios, dtype=torch.float64)
    if len(ratios) == 0 or float(d.max() - d.min()) == 0.0 or spread == 0.0:
        return [target] * len(ratios)
    scaled = (d - d.min()) / (d.max() - d.min()) * 2 * spread
    sparsity = target - (scaled - scaled.mean())
    return [float(s) for s in sparsity.clamp(0.0, 1.0 - 1e-3)]


def _wanda_scores(linears: dict[str, nn.Linear], norms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [
        linear.weight.detach().abs().float() * norms[name].to(linear.weight.device)[None, :]
        for name, linear in linears.items()
    ]


class _OutlierWalk(ReadOnlyMethod):
    """A read-only walk method: each block's outlier ratio on the unchanged model."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.ratios: dict[int, float] = {}

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        norms = {name: stat.norm() for name, stat in stats.items()}
        self.ratios[index] = outlier_ratio(_wanda_scores(linears, norms), self.threshold)


def outlier_ratios(
    bundle: Any,
    calibration: torch.Tensor,
    threshold: float = 5.0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    input_norms: dict[str, torch.Tensor] | None = None,
) -> list[float]:
    """Each block's outlier ratio: from a profile's ``<linear>.input_norm`` tensors when
    given (no forward pass), else from a read-only calibration walk."""
    adapter = bundle.adapter
    layers = adapter.blocks(bundle.model)
    if input_norms is not None:
        ratios, resident = [], resident_block(bundle)
        for index in range(len(layers)):
            with resident(index) as block:
                linears = adapter.block_linears(block)
                prefix = f"{adapter.blocks_path}.{index}"
                norms = {name: input_norms[f"{prefix}.{name}.input_norm"] for name in linears}
                ratios.append(outlier_ratio(_wanda_scores(linears, norms), threshold))
        return ratios
    method = _OutlierWalk(threshold)
    calibration_walk(bundle, calibration, method, batch_size, device, "OWL outliers", compute_dtype)
    return [method.ratios[i] for i in range(len(layers))]
