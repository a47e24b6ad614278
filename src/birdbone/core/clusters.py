"""Clusters of prunable units: MLP channels that work together.

Two ways to group the channels of a block's MLP (the inputs of its last Linear):

- ``coactivation``: by how alike their activations are on calibration data. The walk's
  Gram matrix G = X^T X / n holds every pair's co-activation; its cosine form
  C_jk = G_jk / sqrt(G_jj G_kk) is the similarity of the channels' activation profiles
  over the tokens. The top ``dims`` eigenvectors of C (scaled by the roots of their
  eigenvalues) embed each channel so that inner products approximate C, and spherical
  k-means on the embedding groups channels that fire together.
- ``spectral``: by structure, the seed's "synergy bundles": each channel joins the top
  singular vector of the Linear's weight its column loads on most (|V_jk| sigma_k), so a
  cluster is the channels that write along the same principal direction.

Both are seeded and deterministic. Plain functions on tensors: no model, no Kedro.
"""

from __future__ import annotations

from typing import Any

import torch


def kmeans(points: torch.Tensor, count: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Spherical k-means (cosine) of the rows of ``points``; k-means++ start from ``seed``.

    Returns each row's cluster id, 0..count-1, every cluster non-empty (an emptied cluster
    takes the row farthest from its centroid). Ids are renumbered by first appearance, so
    the same grouping always gets the same ids.
    """
    rows = points.shape[0]
    if not 1 <= count <= rows:
        raise ValueError(f"cannot make {count} clusters of {rows} units")
    x = torch.nn.functional.normalize(points.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centers = [int(torch.randint(rows, (1,), generator=generator))]
    distance = 1 - x @ x[centers[0]]
    for _ in range(1, count):
        weights = distance.clamp_min(0) + 1e-12
        centers.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, 1 - x @ x[centers[-1]])
    centroids = x[centers].clone()
    labels = torch.full((rows,), -1, dtype=torch.int64)
    for _ in range(iterations):
        similarity = x @ centroids.T
        new = similarity.argmax(dim=1)
        for empty in sorted(set(range(count)) - set(new.tolist())):
            far = int((similarity.gather(1, new[:, None]).squeeze(1)).argmin())
            new[far] = empty
            similarity[far] = -2.0  # not chosen again for the next empty cluster
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(count):
            centroids[c] = torch.nn.functional.normalize(x[labels == c].sum(0), dim=0)
    return _renumber(labels)


def _renumber(labels: torch.Tensor) -> torch.Tensor:
    order: dict[int, int] = {}
    for value in labels.tolist():
        order.setdefault(value, len(order))
    return torch.tensor([order[v] for v in labels.tolist()], dtype=torch.int64)


def coactivation_clusters(gram: torch.Tensor, count: int, seed: int = 0, dims: int = 32) -> torch.Tensor:
    """Clusters of units whose activations rise and fall together (see the module docstring).

    Args:
        gram: the units' input Gram matrix (units x units), any positive scale.
    """
    g = gram.double()
    scale = g.diagonal().clamp_min(1e-30).sqrt()
    cosine = g / scale[:, None] / scale[None, :]
    values, vectors = torch.linalg.eigh(cosine)
    dims = min(dims, g.shape[0])
    embedding = vectors[:, -dims:] * values[-dims:].clamp_min(0).sqrt()
    return kmeans(embedding, count, seed)


def spectral_clusters(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Each unit (a column of ``weight``, out x units) joins the top-``count`` singular
    direction it loads on most: the synergy bundles."""
    _, sigma, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    loadings = (vh[:count].T * sigma[:count]).abs()  # units x count
    labels = loadings.argmax(dim=1)
    missing = sorted(set(range(count)) - set(labels.tolist()))
    for c in missing:  # a direction nobody loads on most: its strongest unit among the large clusters
        sizes = torch.bincount(labels, minlength=count)
        candidates = (sizes[labels] > 1).nonzero().squeeze(1)
        labels[candidates[loadings[candidates, c].argmax()]] = c
    return _renumber(labels)


def cluster(method: str, count: int, seed: int, dims: int, gram: torch.Tensor | None, weight: torch.Tensor) -> Any:
    """One block's MLP-channel clusters by ``method`` (``coactivation`` needs ``gram``)."""
    if method == "coactivation":
        if gram is None:
            raise ValueError("co-activation clusters need the channels' Gram matrix")
        return coactivation_clusters(gram, count, seed, dims)
    if method == "spectral":
        return spectral_clusters(weight, count)
    raise ValueError(f"unknown clustering method '{method}'")


def describe(labels: torch.Tensor, usage: torch.Tensor) -> dict[str, list[float]]:
    """Each cluster's size and mean usage (e.g. the channels' activation norms)."""
    count = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=count)
    total = torch.zeros(count, dtype=torch.float64).index_add_(0, labels, usage.double().cpu())
    return {"sizes": sizes.tolist(), "usage": (total / sizes.clamp_min(1)).tolist()}


# --------------------------------------------------------------------------- cluster-aware decay


def health_factors(
    usage: torch.Tensor,
    sensitivity: torch.Tensor | None,
    sizes: torch.Tensor,
    bounds: tuple[float, float],
    strength: float,
) -> torch.Tensor:
    """Each cluster's removal share as a multiple of its layer's: ``(u_c s_c)^-strength``
    clipped to ``bounds``, where u_c and s_c are the cluster's usage and sensitivity over
    their size-weighted means in the block (a busier or more sensitive cluster loses less).
    ``sensitivity`` None (no wave measured yet): usage alone."""
    weights = sizes.double() / sizes.sum()
    health = usage.double() / (usage.double() * weights).sum().clamp_min(1e-30)
    if sensitivity is not None:
        health = health * sensitivity.double() / (sensitivity.double() * weights).sum().clamp_min(1e-30)
    return health.clamp_min(1e-12).pow(-strength).clamp(*bounds)


def water_fill(
    target: float, sizes: torch.Tensor, factors: torch.Tensor, floors: torch.Tensor, ceiling: float = 1.0
) -> torch.Tensor:
    """Per-cluster sparsities ``clip(lam f_c, floor_c, ceiling)`` whose size-weighted mean is
    ``target``, ``lam`` found by bisection (the clipped sum is monotone in it). Floors whose
    mean already passes the target are returned as they are."""
    sizes, factors, floors = sizes.double(), factors.double(), floors.double()
    total = float(sizes.sum())

    def mean(lam: float) -> float:
        return (
            float(
                (
                    sizes * (lam * factors).clamp(min=0.0).minimum(torch.full_like(factors, ceiling)).maximum(floors)
                ).sum()
            )
            / total
        )

    if mean(0.0) >= target:
        return floors.clamp(max=ceiling)
    low, high = 0.0, 1.0
    while mean(high) < target and high < 1e6:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < target else (low, mid)
    return (high * factors).clamp(max=ceiling).maximum(floors)


def _apportion(amounts: torch.Tensor, total: int) -> torch.Tensor:
    """Integers summing to ``total`` closest to ``amounts`` (largest remainder)."""
    base = amounts.floor().long()
    short = total - int(base.sum())
    if short > 0:
        base[(amounts - base).argsort(descending=True, stable=True)[:short]] += 1
    elif short < 0:
        base[(amounts - base).argsort(stable=True)[:-short]] -= 1
    return base.clamp_min(0)


def _drop_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask removing the ``counts[r]`` lowest scores of each row r."""
    rows, cols = scores.shape
    order = scores.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    return rank >= counts.to(scores.device)[:, None]


def keep_mask(
    scores: torch.Tensor, labels: torch.Tensor, axis: int, sparsities: torch.Tensor, prior: torch.Tensor | None
) -> torch.Tensor:
    """Keep-mask that removes ``sparsities[c]`` of cluster c's weights, the lowest scores first.

    Args:
        scores: ``[out, in]``, higher = keep.
        labels: the cluster of each row (``axis`` 0: gate/up, a row per channel) or of each
            column (``axis`` 1: down_proj, a column per channel).
        prior: what earlier waves removed, removed first and never brought back (a group's
            count is at least its prior removals).
    """
    if prior is not None:
        scores = scores.masked_fill(~prior.to(scores.device), float("-inf"))
    rows, cols = scores.shape
    labels = labels.to(scores.device)
    if axis == 0:
        counts = (sparsities.to(scores.device)[labels] * cols).round().long()
        if prior is not None:
            counts = counts.maximum((~prior.to(scores.device)).sum(1))
        mask = _drop_lowest(scores, counts)
    else:
        sizes = torch.bincount(labels, minlength=len(sparsities))
        amounts = sparsities.double().cpu() * sizes.cpu()
        per_cluster = _apportion(amounts, int(round(float(amounts.sum()))))
        mask = torch.ones_like(scores, dtype=torch.bool)
        for c in range(len(sparsities)):
            columns = (labels == c).nonzero().squeeze(1)
            counts = torch.full((rows,), int(per_cluster[c]), dtype=torch.long, device=scores.device)
            if prior is not None:
                counts = counts.maximum((~prior.to(scores.device)[:, columns]).sum(1))
            mask[:, columns] = _drop_lowest(scores[:, columns], counts)
    return mask if prior is None else mask & prior.to(mask.device)


def cluster_sparsity(mask: torch.Tensor, labels: torch.Tensor, axis: int, count: int) -> torch.Tensor:
    """The share of each cluster's weights ``mask`` removes (rows or columns by ``axis``)."""
    removed = (~mask).sum(1 - axis).double().cpu()
    width = mask.shape[1 - axis]
    sizes = torch.bincount(labels.cpu(), minlength=count).double() * width
    return torch.zeros(count, dtype=torch.float64).index_add_(0, labels.cpu(), removed) / sizes.clamp_min(1)


def removal_cost(
    removed: torch.Tensor, cost: torch.Tensor, labels: torch.Tensor, axis: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster: the summed ``cost`` of the weights ``removed`` (bool) and how many."""
    selected = (cost.double() * removed).sum(1 - axis).cpu()
    number = removed.sum(1 - axis).double().cpu()
    labels = labels.cpu()
    per_cluster = torch.zeros(count, dtype=torch.float64)
    return per_cluster.index_add(0, labels, selected), per_cluster.index_add(0, labels, number)
