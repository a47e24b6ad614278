"""Cluster-aware decay: each wave's removal in a block's MLP is shared among the
profile's channel clusters by their health (``core.clusters`` has the arithmetic).

A cluster is a set of MLP channels: rows of gate_proj and up_proj, columns of down_proj.
Before a wave, ``plan`` gives each cluster a sparsity for each of those Linears (the
layer's target times the cluster's health factor, water-filled so the layer still reaches
its target, never below what earlier waves removed). After the wave, ``measure`` prices
what it removed from each cluster (first-order loss sensitivity E|dL/dW| |W| per weight;
Wanda's |W| ||X|| without profile gradients), which the next wave's factors follow.
No model, no Kedro: tensors keyed by parameter name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from birdbone.core import clusters
from birdbone.errors import PruneError


@dataclass
class ClusterProfile:
    """What the profile says about each block's MLP clusters."""

    labels: dict[int, torch.Tensor]  # block -> cluster of each channel
    usage: dict[int, torch.Tensor]  # block -> mean activation norm of each cluster's channels
    axes: dict[str, tuple[int, int]]  # '<linear>.weight' -> (block, axis the channels run along)
    costs: dict[str, torch.Tensor]  # '<linear>.weight' -> per-weight price factor (E|dL/dW|, or ||X|| per column)
    gradients: bool  # whether ``costs`` are gradients (else input norms)
    count: int


def from_profile(profile: dict[str, torch.Tensor], adapter: Any, blocks: int) -> ClusterProfile:
    """The clusters, usage and prices of ``blocks`` blocks from the profile's tensors.

    Raises:
        PruneError: the profile holds no clusters (it ran with ``profile.clusters`` off).
    """
    labels, usage, axes, costs = {}, {}, {}, {}
    last = adapter.last_linear
    for i in range(blocks):
        prefix = f"{adapter.blocks_path}.{i}"
        key = f"{prefix}.{adapter.mlp_path}.clusters"
        if key not in profile:
            raise PruneError(
                f"decay.clusters and heal.bundles need the profile's MLP-channel clusters, but the profile "
                f"has no {key}. "
                "Fix: profile.clusters.enabled: true (and rerun the profile stage)"
            )
        labels[i] = profile[key].long()
        count = int(labels[i].max()) + 1
        norms = profile[f"{prefix}.{last}.input_norm"].double()
        sizes = torch.bincount(labels[i], minlength=count).double()
        usage[i] = torch.zeros(count, dtype=torch.float64).index_add_(0, labels[i], norms) / sizes.clamp_min(1)
        for name in adapter.mlp_linears:
            full = f"{prefix}.{adapter.mlp_path}.{name}.weight"
            axes[full] = (i, 1 if f"{adapter.mlp_path}.{name}" == last else 0)
            grad = profile.get(f"{full}.grad_abs")
            costs[full] = (
                grad if grad is not None else profile[f"{prefix}.{adapter.mlp_path}.{name}.input_norm"][None, :]
            )
    gradients = all(f"{name}.grad_abs" in profile for name in axes)
    count = max(int(v.max()) + 1 for v in labels.values())
    return ClusterProfile(labels, usage, axes, costs, gradients, count)


def plan(
    profile: ClusterProfile,
    masks: Any,
    config: Any,
    block_targets: list[float],
    sensitivity: dict[int, list[float]] | None,
) -> tuple[dict[str, tuple[torch.Tensor, int, torch.Tensor]], dict[int, list[float]]]:
    """Per MLP Linear, the sparsity of each cluster for this wave.

    Args:
        masks: the keep-masks so far (a ``MaskSet``): each cluster's floor.
        config: ``DecayClustersConfig`` (bounds, strength).
        block_targets: each block's sparsity this wave.
        sensitivity: each block's relative cluster sensitivities from the previous wave.

    Returns:
        ``{'<linear>.weight': (labels, axis, sparsities)}`` for ``prune_``'s ``cluster_quotas``,
        and each block's health factors.
    """
    quotas, factors = {}, {}
    for i, labels in profile.labels.items():
        sizes = torch.bincount(labels, minlength=profile.count)
        measured = torch.tensor(sensitivity[i], dtype=torch.float64) if sensitivity and i in sensitivity else None
        factors[i] = clusters.health_factors(profile.usage[i], measured, sizes, tuple(config.bounds), config.strength)
    for name, (i, axis) in profile.axes.items():
        labels = profile.labels[i]
        sizes = torch.bincount(labels, minlength=profile.count)
        floors = clusters.cluster_sparsity(masks[name], labels, axis, profile.count)
        sparsities = clusters.water_fill(block_targets[i], sizes, factors[i], floors, ceiling=0.99)
        quotas[name] = (labels, axis, sparsities.float())
    return quotas, {i: [round(float(v), 4) for v in f] for i, f in factors.items()}


def measure(profile: ClusterProfile, before: dict[str, torch.Tensor], prior: Any, masks: Any) -> dict[int, list[float]]:
    """Each cluster's price per removed weight in this wave over its block's mean (1.0 for
    a cluster the wave took nothing from): the sensitivity the next wave's factors follow."""
    totals, numbers = _removed(profile, prior, masks, before)
    result = {}
    for i, total in totals.items():
        mean = float(total.sum()) / max(float(numbers[i].sum()), 1.0)
        per = total / numbers[i].clamp_min(1)
        relative = torch.where(numbers[i] > 0, per / max(mean, 1e-30), torch.ones_like(per))
        result[i] = [round(float(v), 4) for v in relative]
    return result


def _removed(
    profile: ClusterProfile, prior: Any, masks: Any, before: dict[str, torch.Tensor] | None = None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per block, over its MLP Linears: each cluster's summed price of the weights this
    wave removed (``prior`` -> ``masks``; priced |W| x the profile's cost with ``before``,
    the weights before the wave, else 1 each) and how many it removed."""
    totals: dict[int, torch.Tensor] = {}
    numbers: dict[int, torch.Tensor] = {}
    for name, (i, axis) in profile.axes.items():
        removed = prior[name].cpu() & ~masks[name].cpu()
        cost = (
            before[name].detach().abs().float().cpu() * profile.costs[name].float().cpu()
            if before is not None
            else torch.ones(1, 1)
        )
        total, number = clusters.removal_cost(removed, cost, profile.labels[i], axis, profile.count)
        totals[i] = totals.get(i, 0) + total
        numbers[i] = numbers.get(i, 0) + number
    return totals, numbers


def spiked(sensitivity: dict[int, list[float]], threshold: float) -> dict[int, list[int]]:
    """The clusters of each block whose sensitivity passed ``threshold`` (x the block's mean)."""
    out = {i: [c for c, v in enumerate(values) if v > threshold] for i, values in sensitivity.items()}
    return {i: c for i, c in out.items() if c}


@dataclass
class Bundle:
    """One healing bundle: a cluster of MLP channels in each of some blocks."""

    clusters: dict[int, int]  # block -> cluster
    removed: dict[int, int]  # block -> weights this wave removed from that cluster
    confine: dict[str, torch.Tensor]  # Linear's full name -> 0/1 mask broadcast over its weight


def bundles(profile: ClusterProfile, prior: Any, masks: Any, count: int) -> list[Bundle]:
    """The ``count`` bundles a wave heals, one at a time: bundle j holds each block's
    cluster with the j-th most weights removed by this wave (``prior`` -> ``masks``; blocks
    with fewer pruned clusters sit out). A bundle confines LoRA to its channels: rows of the
    Linears whose outputs are the channels, columns of the one that reads them."""
    _, removed = _removed(profile, prior, masks)
    ranked = {i: [c for c in v.argsort(descending=True, stable=True).tolist() if v[c] > 0] for i, v in removed.items()}
    out = []
    for j in range(count):
        chosen = {i: order[j] for i, order in ranked.items() if j < len(order)}
        if not chosen:
            break
        confine = {}
        for name, (i, axis) in profile.axes.items():
            if i in chosen:
                members = (profile.labels[i] == chosen[i]).float()
                confine[name.removesuffix(".weight")] = members[:, None] if axis == 0 else members[None, :]
        out.append(Bundle(chosen, {i: int(removed[i][c]) for i, c in chosen.items()}, confine))
    return out
