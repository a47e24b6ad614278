"""Magnitude pruning: remove the weights of smallest |W| in each layer (Han et al., 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from birdbone.core.prune.base import LayerPruner, register


@register("magnitude")
class MagnitudePruner(LayerPruner):
    """Score |W_ij|, compared across the whole layer (the classic baseline)."""

    needs_inputs = False
    needs_gram = False
    group = "layer"

    def scores(self, linear: nn.Linear, stats: Any) -> torch.Tensor:
        return linear.weight.detach().abs().float()
