"""Project pipelines."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from kedro.pipeline import Pipeline

from birdbone.pipelines import baseline, decay, export, profile, quantize

log = logging.getLogger(__name__)


def _parameters() -> dict[str, Any]:
    """The run's parameters (env and --params included) from the context being created, or,
    outside a run (``kedro registry``), from conf/ with ``KEDRO_ENV``."""
    from birdbone.configloader import active_config_loader

    loader = active_config_loader()
    if loader is None:
        from kedro.config import OmegaConfigLoader

        loader = OmegaConfigLoader(
            str(Path.cwd() / "conf"), base_env="base", default_run_env=os.environ.get("KEDRO_ENV", "local")
        )
    try:
        return dict(loader["parameters"])
    except Exception as exc:  # noqa: BLE001  (the recipe check reports config errors properly)
        log.debug("no parameters to size the decay pipeline: %s", exc)
        return {}


def _section(key: str, config_class: str) -> Any:
    """The recipe's ``key`` section validated as ``birdbone.config.<config_class>``, or None
    when it is missing or invalid (the recipe check names the problem before anything runs)."""
    from pydantic import ValidationError

    from birdbone import config

    section = _parameters().get(key)
    if not section:
        return None
    try:
        return getattr(config, config_class).model_validate(section)
    except (ValidationError, ValueError, TypeError):
        return None


def decay_waves() -> int:
    """How many wave namespaces the recipe needs: the schedule's waves under the per-wave
    cap, plus room for a gradual rollback (0 without a valid ``decay`` section)."""
    decay = _section("decay", "DecayConfig")
    try:
        return decay.wave_count() if decay is not None else 0
    except (ValueError, TypeError):
        return 0  # the recipe check names the problem before anything runs


def final_heal() -> bool:
    """Whether the recipe heals the decayed model once more at the end."""
    heal = _section("heal", "HealConfig")
    return heal is not None and heal.enabled and heal.final.steps > 0


def unquantized_model() -> str:
    """The recipe's last model before quantization: healed (after the waves, or the dense
    model when there are none), decayed or the baseline."""
    if final_heal():
        return "healed_model"
    return "decayed_model" if decay_waves() > 0 else "baseline_model"


def quantize_source() -> str | None:
    """The model dataset the quantize stage reads (the recipe's last model), or None when
    quantization is off."""
    quantize = _section("quantize", "QuantizeConfig")
    return unquantized_model() if quantize is not None and quantize.enabled else None


def export_source() -> str | None:
    """The model dataset the export stage reads (the recipe's last model), or None when
    export is off."""
    export = _section("export", "ExportConfig")
    if export is None or not export.enabled:
        return None
    return "quantized_model" if quantize_source() is not None else unquantized_model()


def register_pipelines() -> dict[str, Pipeline]:
    """``kedro run`` runs ``__default__``; ``kedro run --pipelines NAME`` one stage."""
    with warnings.catch_warnings():
        # Kedro warns about dotted dataset names; ours are exactly its namespaced names
        # (``wave_<k>.state``), referred to across namespaces on purpose.
        warnings.filterwarnings("ignore", message=r"One or more dataset names contain '\.'", category=UserWarning)
        waves = decay.create_pipeline(decay_waves(), final_heal())
    pipelines = {
        "baseline": baseline.create_pipeline(),
        "profile": profile.create_pipeline(),
        "decay": waves,
        "quantize": quantize.create_pipeline(quantize_source()),
        "export": export.create_pipeline(export_source()),
    }
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
