"""Pruning: criteria (one file each, registered by name) x patterns, applied through the
calibration walk. ``prune_`` is the one verb."""

from __future__ import annotations

import time
from typing import Any

import torch

from birdbone.core.masks import MaskSet
from birdbone.core.prune import gradient, magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from birdbone.core.prune.base import PRUNERS, LayerPruner, register
from birdbone.core.prune.owl import block_sparsities, outlier_ratios
from birdbone.core.prune.patterns import check_fits, describe
from birdbone.core.walk import calibration_walk
from birdbone.errors import PruneError

__all__ = ["PRUNERS", "LayerPruner", "prune_", "register"]


def prune_(
    bundle: Any,
    method: str,
    pattern: Any,
    calibration: torch.Tensor | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    options: Any = None,
    compute_dtype: torch.dtype | None = None,
    layer_ratios: Any = None,
    prior: MaskSet | None = None,
    cluster_quotas: dict[str, Any] | None = None,
) -> tuple[MaskSet, dict[str, Any]]:
    """Prunes every decoder-block Linear of ``bundle.model`` in place.

    Args:
        method: a registered criterion (``PRUNERS``): magnitude, wanda, sparsegpt, gradient.
        pattern: ``{kind: unstructured, sparsity}`` or ``{kind: nm, n, m}`` (config object),
            or a ``patterns.NMRamp`` (a wave on the way to N:M).
        calibration: token blocks ``[n, length]`` for methods that look at activations.
        compute_dtype: autocast type of the calibration forward passes (see the walk).
        layer_ratios: ``None`` for the same target in every block; an ``OWLOptions`` for
            outlier-weighted block sparsities (unstructured only; one extra read-only walk);
            or a list of per-block sparsities.
        prior: keep-masks of earlier waves; what they removed stays removed and counts
            towards the target (which must not be below the sparsity already reached).
        cluster_quotas: ``{'<linear>.weight': (labels, axis, sparsities)}``: those Linears
            remove each cluster's own share (``core.cluster_decay.plan``); unstructured only.

    Returns:
        The keep-masks, and a report (method, pattern, achieved sparsity, seconds).

    Raises:
        PruneError: unknown method, a pattern a layer cannot take, missing calibration
            data (all before any compute), or a target not reached.
    """
    if method not in PRUNERS:
        raise PruneError(f"unknown pruning method '{method}'; known: {', '.join(sorted(PRUNERS))}")
    for name, linear in bundle.adapter.linears(bundle.model).items():
        check_fits(name, tuple(linear.weight.shape), pattern)
    pruner = PRUNERS[method](pattern, bundle.adapter.blocks_path, options)
    needs_calibration = pruner.needs_calibration or hasattr(layer_ratios, "threshold")
    if needs_calibration and (calibration is None or calibration.shape[0] == 0):
        raise PruneError(f"{method} needs calibration blocks (data.splits.calibration > 0)")
    blocks = len(bundle.adapter.blocks(bundle.model))
    if layer_ratios is not None and pattern.kind != "unstructured":
        raise PruneError(f"per-block sparsities need an unstructured pattern, not {pattern.kind}")
    if isinstance(layer_ratios, list | tuple) and (
        len(layer_ratios) != blocks or not all(0 <= s < 1 for s in layer_ratios)
    ):
        raise PruneError(f"layer_ratios needs {blocks} sparsities in [0, 1), one a block; got {layer_ratios}")
    start = time.perf_counter()
    report: dict[str, Any] = {}
    if hasattr(layer_ratios, "threshold"):  # OWL
        ratios = outlier_ratios(bundle, calibration, layer_ratios.threshold, batch_size, device, compute_dtype)
        layer_ratios = block_sparsities(ratios, pattern.sparsity, layer_ratios.spread)
        report["outlier_ratio"] = ratios
    if layer_ratios is not None:
        pruner.block_patterns = {
            i: pattern.model_copy(update={"sparsity": float(s)}) for i, s in enumerate(layer_ratios)
        }
        report["block_sparsity"] = [float(s) for s in layer_ratios]
    if cluster_quotas and (pattern.kind != "unstructured" or not pruner.ranks_scores):
        raise PruneError(f"per-cluster shares need an unstructured pattern and a score-ranking method, not {method}")
    pruner.prior = prior
    pruner.cluster_quotas = cluster_quotas or {}
    pruner.prepare(bundle, calibration, device)
    calibration_walk(bundle, calibration, pruner, batch_size, device, f"{method} pruning", compute_dtype)  # type: ignore[arg-type]
    report = {
        **report,
        "method": method,
        "pattern": describe(pattern),
        "compute_dtype": str(compute_dtype or "model dtype"),
        "sparsity": pruner.masks.overall_sparsity(),
        "layers": pruner.masks.sparsity(),
        "seconds": time.perf_counter() - start,
    }
    return pruner.masks, report
