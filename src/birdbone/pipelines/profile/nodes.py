"""Profile nodes: thin adapters from Kedro parameters to ``birdbone.core.profile``."""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure

from birdbone.config import ProfileConfig
from birdbone.core import modeling, plots
from birdbone.core.profile import profile_usage
from birdbone.pipelines import runtime


def profile_model(
    bundle: modeling.ModelBundle, blocks: dict[str, torch.Tensor], profile: dict[str, Any], run: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Walks the calibration split through the model, block by block, recording usage."""
    device = runtime(run)
    bundle.model.to(device)
    return profile_usage(bundle, blocks["calibration"], ProfileConfig.model_validate(profile), device)


def plot_profile(summary: dict[str, Any]) -> tuple[Figure, dict[str, float]]:
    """The profile's heat-map, and its headline numbers for tracking."""
    metrics = {f"profile.block_influence.{i}": v for i, v in enumerate(summary["block_influence"])}
    metrics["profile.seconds"] = summary["seconds"]["total"]
    return plots.profile_figure(summary), metrics
