"""Gradient (first-order Taylor) pruning: the loss change from removing W_ij is about
|W_ij * dL/dW_ij| (Molchanov et al., 2019, "Importance Estimation for Neural Network
Pruning"); E|dL/dW| comes from backward passes over calibration blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from birdbone.core.masks import zero_masked_
from birdbone.core.profile import gradient_magnitude
from birdbone.core.prune.base import LayerPruner, register


@register("gradient")
class GradientPruner(LayerPruner):
    """Score |W_ij| * E|dL/dW_ij|, compared within each output row; options:
    ``gradient_blocks`` (a ``GradientOptions``)."""

    needs_inputs = False
    needs_gram = False
    group = "row"
    gradients: dict[str, torch.Tensor]

    @property
    def needs_calibration(self) -> bool:
        return True

    def prepare(self, bundle: Any, calibration: torch.Tensor | None, device: Any) -> None:
        """E|dL/dW| on the model before any weight is removed (``gradient_blocks`` blocks)."""
        blocks = getattr(self.options, "gradient_blocks", 8)
        assert calibration is not None  # prune_ checked needs_calibration
        self.gradients = gradient_magnitude(bundle, calibration[:blocks], device)

    @torch.no_grad()
    def prune_linear(
        self, linear: nn.Linear, stats: Any, name: str, pattern: Any, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        grad = self.gradients[name].to(linear.weight.device)
        mask = self.mask_from(linear.weight.detach().abs().float() * grad, pattern, prior, name)
        zero_masked_(linear.weight.data, mask)
        return mask
