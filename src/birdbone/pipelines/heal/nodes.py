"""Healing nodes: thin adapters from Kedro datasets and parameters to ``birdbone.core.heal``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from birdbone.config import DecayConfig, HealConfig, validate_recipe
from birdbone.core import evaluate, modeling, plots, waves
from birdbone.core.heal import HealReport, heal_, healing_view
from birdbone.core.quantize import QuantTable, keeps_source
from birdbone.datasets import ModelRef, WaveHandle
from birdbone.errors import HealError
from birdbone.pipelines import runtime
from birdbone.pipelines.quantize.nodes import plan

log = logging.getLogger(__name__)


def heal_series(prefix: str, heal: dict[str, Any] | None) -> dict[str, list[tuple[int, float]]]:
    """A healing curve as MLflow series: ``<prefix>.loss`` and ``<prefix>.val_ppl`` by step."""
    if not heal:
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for point in heal["curve"]:
        for key in ("loss", "val_ppl"):
            if point.get(key) is not None:
                out.setdefault(f"{prefix}.{key}", []).append((int(point["step"]), float(point[key])))
    return out


def heal_teacher_for(
    config: HealConfig, heal_teacher: dict[str, torch.Tensor], dense: ModelRef | None
) -> dict[str, torch.Tensor] | torch.nn.Module | None:
    """What healing distills from: the cached top-k (``cache_heal_teacher``), or with
    ``heal.distill_top_k: null`` the dense model itself (loaded here, run on every batch)."""
    if config.distill <= 0:
        return None
    if config.distill_top_k is None:
        if dense is None:
            raise HealError("heal.distill_top_k: null distills from the dense model, and none was given")
        return dense.load().model
    return heal_teacher or None


def cache_heal_teacher(
    bundle: modeling.ModelBundle, blocks: dict[str, torch.Tensor], heal: dict[str, Any], run: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The dense model's top-k log-probabilities on the healing blocks (as healing crops
    them), for distillation; empty when distillation is off or live (the whole vocabulary)."""
    config = HealConfig.model_validate(heal)
    if not config.enabled or config.distill <= 0 or config.distill_top_k is None:
        return {}
    device = runtime(run)
    healing = healing_view(blocks["healing"], config)
    return evaluate.teacher_topk(bundle.model.to(device), healing, config.distill_top_k, config.batch_size, device)


def heal_wave(
    state: waves.WaveState | WaveHandle,
    blocks: dict[str, torch.Tensor],
    heal_teacher: dict[str, torch.Tensor],
    dense: ModelRef,
    heal: dict[str, Any],
    decay: dict[str, Any],
    run: dict[str, Any],
) -> waves.WaveState | WaveHandle:
    """LoRA healing of a wave that pruned, before the gate judges it (masks kept)."""
    if isinstance(state, WaveHandle):
        return state
    config = HealConfig.model_validate(heal)
    total = len(DecayConfig.model_validate(decay).wave_targets())
    validation = blocks["validation"]
    return waves.heal(
        state, config, total, blocks["healing"], heal_teacher_for(config, heal_teacher, dense), validation, runtime(run)
    )


def heal_dense(
    baseline: modeling.ModelBundle,
    quality: dict[str, Any],
    blocks: dict[str, torch.Tensor],
    heal_teacher: dict[str, torch.Tensor],
    dense: ModelRef,
    general: dict[str, torch.Tensor],
    parameters: dict[str, Any],
) -> tuple[modeling.ModelBundle, dict[str, Any], Figure, dict[str, Any], dict[str, Any]]:
    """The final heal of the dense model, for a recipe without decay waves (with
    ``heal.final.fake_quant``: quantization-aware training against the quantize grids).
    Its before-figures are the baseline's (``baseline_quality``), measured once."""
    key = evaluate.quality_key(blocks, general or None)
    baseline.origin = {**baseline.origin, "quality": {"key": key, "figures": evaluate.baseline_figures(quality)}}
    return heal_final(baseline, None, blocks, heal_teacher, dense, general, parameters)


def heal_final(
    decayed: modeling.ModelBundle,
    last: WaveHandle | None,
    blocks: dict[str, torch.Tensor],
    heal_teacher: dict[str, torch.Tensor],
    dense: ModelRef,
    general: dict[str, torch.Tensor],
    parameters: dict[str, Any],
) -> tuple[modeling.ModelBundle, dict[str, Any], Figure, dict[str, Any], dict[str, Any]]:
    """The longer heal of the decayed (compacted) model, its masks kept; the healed model,
    the healing report (every wave's healing and this one), its curves, ``summary.json``'s
    ``heal``, and the final numbers and curve for MLflow. In-domain and general quality are
    measured before and after."""
    recipe = validate_recipe(parameters, Path.cwd())
    config = recipe.heal
    device = modeling.prepare_runtime(recipe.run)
    bundle = decayed
    bundle.model.to(device)
    batch = config.batch_size
    key = evaluate.quality_key(blocks, general or None)
    before = evaluate.carried_quality(bundle, key)
    if before is None:
        before = evaluate.stage_quality(bundle.model, blocks, general, batch, device, "before final heal")
    grids, skipped = None, None
    if config.final.fake_quant:  # the grids the quantize stage will plan (mixed: allocated on this model)
        grids, source, _ = plan(bundle, recipe.quantize, blocks, device)
        if keeps_source(grids, source):
            # the weights lie on a grid the quantize stage keeps losslessly (a GGUF's Q4_1):
            # a fake-quant heal could only move them off it onto a coarser one
            skipped = (
                f"the block weights lie on their source grid ({source.describe()}), which the quantize stage "
                "keeps as it is (quantize.keep_source_grid): nothing to learn around, and healing would move "
                "them off it"
            )
        else:
            log.info("final heal against the quantize grids (%s, fake-quant)", recipe.quantize.label)
    if skipped is not None:
        log.info("final heal skipped: %s", skipped)
        report, after = HealReport(steps=0, lr=config.final.lr), before
    else:
        report = heal_(
            bundle,
            bundle.masks,
            blocks["healing"],
            config,
            config.final.steps,
            config.final.lr,
            heal_teacher_for(config, heal_teacher, dense),
            blocks["validation"],
            device,
            desc="final heal (fake-quant)" if grids is not None else "final heal",
            fake_quant=grids,
        )
        after = evaluate.stage_quality(bundle.model, blocks, general, batch, device, "after final heal")
    if grids is not None and skipped is None and not report.stopped:  # the quantize stage keeps to these grids
        bundle.quant = QuantTable(grids)
    bundle.origin = {
        **bundle.origin,
        "heal": "final skipped" if skipped else "final, fake-quant" if grids is not None else "final",
        "heal_steps": report.steps,
        # the next stage's "before": the same model on the same text needs no second pass
        "quality": {"key": key, "figures": after},
    }
    rows = last.info["rows"] if last is not None else []
    curves = {f"wave {r['wave']}": r["heal"]["curve"] for r in rows if r.get("heal")}
    curves["final"] = report.curve
    waves_heal = [
        {"wave": r["wave"], **{k: r["heal"][k] for k in ("steps", "lr", "seconds", "samples_trained", "stopped")}}
        for r in rows
        if r.get("heal")
    ]
    final = {
        **{f"{k}_before": v for k, v in before.items()},
        **after,
        **{k: v for k, v in report.to_json().items() if k != "curve"},
        **({"skipped": skipped} if skipped else {}),
    }
    log.info(
        "final heal: %d steps in %.0f s, test perplexity %.3f -> %.3f%s%s",
        report.steps,
        report.seconds,
        before["ppl_test"],
        after["ppl_test"],
        evaluate.general_change(before, after),
        f" (stopped and undone: {report.stopped})" if report.stopped else "",
    )
    metrics = {f"heal.final.{k}": v for k, v in final.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics["series"] = heal_series("heal.final", report.to_json())
    return (
        bundle,
        {
            "recipe_hash": recipe.hash(),
            "config": config.model_dump(mode="json"),
            "waves": waves_heal,
            "final": {**final, "curve": report.curve},
        },
        plots.heal_figure(curves),
        {"recipe_hash": recipe.hash(), "heal": {"waves": waves_heal, "final": final}},
        metrics,
    )
