"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv:2306.11695)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from birdbone.core.prune.base import LayerPruner, register


@register("wanda")
class WandaPruner(LayerPruner):
    """Score S_ij = |W_ij| * ||X_j||_2 (eq. 1 of the paper), compared within each output
    row; ||X_j|| is the norm of input channel j over all calibration tokens."""

    needs_inputs = True
    needs_gram = False
    group = "row"

    def scores(self, linear: nn.Linear, stats: Any) -> torch.Tensor:
        return linear.weight.detach().abs().float() * stats.norm().to(linear.weight.device)[None, :]
