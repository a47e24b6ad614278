"""Quantize node: a thin adapter from Kedro datasets and parameters to ``birdbone.core.quantize``
and ``birdbone.core.bits``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from birdbone.config import LowRankConfig, QuantizeConfig, validate_recipe
from birdbone.core import evaluate, modeling, plots
from birdbone.core.bits import allocate, usage_norms
from birdbone.core.lowrank import (
    Factor,
    add_factors_,
    correction_bits,
    error_correction,
    plan_factors,
    plan_report,
    summarize,
)
from birdbone.core.lowrank import summary_line as lowrank_line
from birdbone.core.quantize import (
    Grid,
    QuantTable,
    average_bits,
    bytes_at_bits,
    check_quantize,
    head_weights,
    linear_sizes,
    plan_grids,
    quantize_model_,
    weight_budget,
)
from birdbone.core.walk import autocast_dtype

log = logging.getLogger(__name__)


def plan(
    bundle: modeling.ModelBundle, config: QuantizeConfig, blocks: dict[str, torch.Tensor], device: Any
) -> tuple[dict[str, Grid | None], Grid | None, dict[str, Any] | None]:
    """Each weight's grid: the config's (or the source grid, kept), or a mixed allocation."""
    if not config.mixed.enabled:
        grids, source = plan_grids(bundle, config.grid(), config.keep_source_grid)
        return grids, source, None
    mixed = config.mixed
    stress_blocks = blocks["validation"][: mixed.stress.blocks] if mixed.stress.blocks else None
    allocation = allocate(
        bundle,
        mixed.levels,
        mixed.group,
        config.sym,
        weight_budget(config, linear_sizes(bundle)),  # the corrections' bits come out of the budget
        blocks["calibration"][: config.calibration_blocks],
        stress_blocks,
        config.batch_size,
        device,
        mixed.stress.loss_spike,
        mixed.stress.grad_spike,
        mixed.stress.rounds,
        autocast_dtype(config.compute_dtype),
    )
    return dict(allocation.grids), None, allocation.to_json()


def planned_grids(bundle: modeling.ModelBundle, config: QuantizeConfig) -> dict[str, Grid | None] | None:
    """The grids a fake-quant final heal trained ``bundle`` against (``bundle.quant`` with
    grids and no scales yet), when they still fit ``config``; None otherwise."""
    table = bundle.quant
    if table is None or table.scales or not table.grids:
        return None
    levels = config.mixed.levels if config.mixed.enabled else [config.bits]
    group = config.mixed.group if config.mixed.enabled else config.group
    superblock = None if config.mixed.enabled else config.superblock
    fits = all(
        g is None or (g.bits in levels and g.group == group and g.sym == config.sym and g.superblock == superblock)
        for g in table.grids.values()
    )
    if not fits:
        log.warning("the grids the final heal trained against do not fit quantize's settings; planning again")
        return None
    return dict(table.grids)


def quantize_with(
    bundle: modeling.ModelBundle,
    config: QuantizeConfig,
    blocks: dict[str, torch.Tensor],
    device: Any,
    grids: dict[str, Grid | None] | None = None,
) -> tuple[dict[str, Grid | None], Grid | None, dict[str, Any] | None, dict[str, Any]]:
    """Plans the grids (unless ``grids`` are given: those a fake-quant heal trained
    against) and quantizes ``bundle`` in place: (grids, source grid, mixed allocation or
    None, scales). The node and ``bench/quantize.py`` both run this."""
    if grids is not None:
        source, allocation = None, None
    else:
        grids, source, allocation = plan(bundle, config, blocks, device)
    scales = quantize_model_(
        bundle,
        grids,
        config.method,
        blocks["calibration"][: config.calibration_blocks],
        config.batch_size,
        device,
        config.gptq,
        autocast_dtype(config.compute_dtype),
        (config.head.grid(), config.head.method) if config.head.enabled else None,
    )
    return grids, source, allocation, scales


def layer_rows(
    bundle: modeling.ModelBundle, grids: dict[str, Grid | None], source: Grid | None, allocation: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per block Linear: its grid and bits per weight (for the report and the plot)."""
    prefix = bundle.adapter.blocks_path
    rises = {}
    if allocation and allocation["stress"]:
        rises = {b["block"]: b["loss_rise"] for b in allocation["stress"][-1]["blocks"]}
    rows = []
    for name, linear in bundle.adapter.linears(bundle.model).items():
        grid = grids[f"{name}.weight"] or source
        block = int(name.removeprefix(prefix + ".").split(".")[0])
        rows.append(
            {
                "name": f"{name}.weight",
                "block": block,
                "module": name.rsplit(".", 1)[-1],
                "params": linear.weight.numel(),
                "grid": grid.describe() if grid else "float",
                "bits": grid.bits if grid else 16,
                "bits_per_weight": grid.bits_per_weight(linear.weight.shape[1]) if grid else 16.0,
                "kept_source_grid": grids[f"{name}.weight"] is None,
                "gguf_type": grid.gguf_type() if grid else None,
                "loss_rise": rises.get(block),
            }
        )
    return rows


def factor_plan(bundle: modeling.ModelBundle, config: LowRankConfig) -> list[Factor]:
    """Which block matrices U V would replace at the explained-variance target (none when
    the report is off)."""
    if not config.report:
        return []
    weights = {f"{name}.weight": linear.weight for name, linear in bundle.adapter.linears(bundle.model).items()}
    return plan_factors(weights, config.explained_variance, config.min_saving, bundle.masks)


def factor_summary(factors: list[Factor], config: LowRankConfig) -> dict[str, Any] | None:
    """What factorizing at the target would save, in block-Linear numbers (= multiply-adds)."""
    return {"explained_variance": config.explained_variance, **summarize(factors)} if factors else None


def corrected_weights(bundle: modeling.ModelBundle) -> dict[str, torch.Tensor]:
    """A copy of every block Linear's weight before quantizing (what a correction restores)."""
    linears = bundle.adapter.linears(bundle.model)
    return {f"{n}.weight": m.weight.detach().float().cpu().clone() for n, m in linears.items()}


def corrections_for(
    bundle: modeling.ModelBundle,
    originals: dict[str, torch.Tensor],
    config: QuantizeConfig,
    blocks: dict[str, torch.Tensor],
    device: Any,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-k corrections of every layer's quantization error, weighted by its input norms."""
    norms = usage_norms(
        bundle,
        blocks["calibration"][: config.calibration_blocks],
        config.batch_size,
        device,
        autocast_dtype(config.compute_dtype),
    )
    out = {}
    for name, linear in bundle.adapter.linears(bundle.model).items():
        key = f"{name}.weight"
        out[key] = error_correction(
            originals[key], linear.weight.detach().float().cpu(), config.lowrank.correction_rank, norms[key].sqrt()
        )
    return out


@contextmanager
def corrected(bundle: modeling.ModelBundle) -> Iterator[None]:
    """The quantized model with its corrections added (what the base plus adapter computes);
    the quantized weights exactly as they were afterwards."""
    corrections = bundle.quant.corrections if bundle.quant is not None else {}
    if not corrections:
        yield
        return
    linears = bundle.adapter.linears(bundle.model)
    saved = {key: linears[key.removesuffix(".weight")].weight.detach().clone() for key in corrections}
    add_factors_(bundle, corrections)
    try:
        yield
    finally:
        with torch.no_grad():
            for key, weight in saved.items():
                linears[key.removesuffix(".weight")].weight.copy_(weight)


def quantize_model(
    model: modeling.ModelBundle,
    blocks: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor],
    parameters: dict[str, Any],
) -> tuple[modeling.ModelBundle, dict[str, Any], Figure, dict[str, Any], dict[str, Any]]:
    """Quantizes the last model of the recipe (healed, decayed or baseline) to its grids,
    masks kept; the quantized model (with its grids and scales), the report (per-layer bits,
    in-domain and general quality before and after), the bits-per-layer plot,
    ``summary.json``'s ``quantize`` and its MLflow metrics."""
    recipe = validate_recipe(parameters, Path.cwd())
    config = recipe.quantize
    device = modeling.prepare_runtime(recipe.run)
    bundle = model
    bundle.model.to(device)
    check_quantize(bundle, config)
    batch = recipe.baseline.batch_size
    key = evaluate.quality_key(blocks, general or None)
    before = evaluate.carried_quality(bundle, key)
    if before is None:
        before = evaluate.stage_quality(bundle.model, blocks, general, batch, device, "before quantizing")
    factors = factor_plan(bundle, config.lowrank)
    originals = corrected_weights(bundle) if config.lowrank.correction_rank else {}
    start = time.perf_counter()
    grids, source, allocation, scales = quantize_with(bundle, config, blocks, device, planned_grids(bundle, config))
    seconds = time.perf_counter() - start
    heads = {name: config.head.grid() for name in head_weights(bundle)} if config.head.enabled else {}
    bundle.quant = QuantTable({**grids, **heads}, scales, source)
    plain = {}
    if originals:
        plain = {
            k: evaluate.perplexity(bundle.model, blocks[k], batch, device, f"quantized, no correction ({k})")["ppl"]
            for k in ("validation", "test")
        }
        bundle.quant.corrections = corrections_for(bundle, originals, config, blocks, device)
    with corrected(bundle):
        after = evaluate.stage_quality(bundle.model, blocks, general, batch, device, "after quantizing")
    avg = average_bits(bundle, grids, source)
    correction = correction_bits(linear_sizes(bundle), config.lowrank.correction_rank)
    layers = layer_rows(bundle, grids, source, allocation)
    kept = all(g is None for g in grids.values())
    final = {
        "method": config.label,
        "rounding": config.method,
        "bits": config.bits,
        "group": config.mixed.group if config.mixed.enabled else config.group,
        "sym": config.sym,
        "avg_bits": avg,
        "source_grid": source.describe() if source else None,
        "kept_source_grid": kept,
        **{f"{k}_before": v for k, v in before.items()},
        **after,
        "seconds": seconds,
        "correction_rank": config.lowrank.correction_rank,
        "correction_bits": correction,
        "avg_bits_with_correction": avg + correction,
        "bytes": bytes_at_bits(bundle, {**{n: g or source for n, g in grids.items()}, **heads}, correction),
        "ppl_val_without_correction": plain.get("validation"),
        "ppl_test_without_correction": plain.get("test"),
        "factorizable": factor_summary(factors, config.lowrank),
        "head": (
            {"grid": config.head.grid().describe(), "method": config.head.method, "weights": sorted(heads)}
            if heads
            else None
        ),
    }
    log.info(
        "quantized (%s%s): %.3f bits per weight, test perplexity %.3f -> %.3f (%+.1f %%)%s in %.0f s",
        config.label,
        f"; weights already on {source.describe()}, kept on it" if kept and source else "",
        avg,
        before["ppl_test"],
        after["ppl_test"],
        100 * (after["ppl_test"] / before["ppl_test"] - 1),
        evaluate.general_change(before, after),
        seconds,
    )
    bundle.origin = {
        **bundle.origin,
        "quantize": config.label,
        "avg_bits": avg,
        "quality": {"key": key, "figures": after},
    }
    title = f"Bits per layer: {config.label}, {avg:.3f} average"
    report = {
        "recipe_hash": recipe.hash(),
        "config": config.model_dump(mode="json"),
        "final": final,
        "allocation": allocation,
        "layers": layers,
        "factors": plan_report(factors),
    }
    if factors:
        log.info("low rank: %s", lowrank_line(final["factorizable"]))
    metrics = {f"quantize.{k}": v for k, v in final.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return (
        bundle,
        report,
        plots.quantize_figure(layers, title),
        {"recipe_hash": recipe.hash(), "quantize": final},
        metrics,
    )
