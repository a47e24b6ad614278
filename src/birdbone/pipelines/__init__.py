"""Kedro pipelines, one folder per stage."""

from __future__ import annotations

from typing import Any


def runtime(run: dict[str, Any]) -> Any:
    """Applies the ``run`` parameters (threads, seed) and returns the device to compute on."""
    from birdbone.config import RunConfig
    from birdbone.core import modeling

    return modeling.prepare_runtime(RunConfig.model_validate(run))
