"""Spectral scan: the top singular values of every weight matrix and how much of its
energy (squared Frobenius norm) the top ranks explain.

The explained-variance curve at rank r is sum_{i<=r} s_i^2 / ||W||_F^2; the denominator
is exact and cheap, so a randomized SVD of the top ``k`` values (Halko et al., 2011, as
``torch.svd_lowrank``) gives the exact start of the curve without a full SVD.
"""

from __future__ import annotations

from typing import Any

import torch

from birdbone.core.progress import bar


def top_singular_values(weight: torch.Tensor, k: int, method: str = "lowrank", niter: int = 2) -> torch.Tensor:
    """The ``k`` largest singular values of a 2-D tensor (fewer if it is smaller)."""
    w = weight.detach().float()
    k = min(k, *w.shape)
    if method == "full" or k >= min(w.shape) // 2:
        return torch.linalg.svdvals(w)[:k]
    return torch.svd_lowrank(w, q=min(k + 8, min(w.shape)), niter=niter)[1][:k]


def spectrum(weight: torch.Tensor, k: int, method: str, niter: int, energy_levels: list[float]) -> dict[str, Any]:
    """Top singular values, explained-variance curve, and the rank reaching each energy level
    (``None`` when the top ``k`` do not reach it)."""
    values = top_singular_values(weight, k, method, niter)
    energy = float(weight.detach().float().pow(2).sum())
    curve = (values.pow(2).cumsum(0) / energy).clamp(max=1.0) if energy > 0 else torch.zeros_like(values)
    ranks = {}
    for level in energy_levels:
        hit = (curve >= level).nonzero()
        ranks[f"{level:g}"] = int(hit[0]) + 1 if hit.numel() else None
    return {
        "shape": list(weight.shape),
        "frobenius_sq": energy,
        "singular_values": values.tolist(),
        "explained": curve.tolist(),
        "rank_at": ranks,
    }


def spectral_scan(named_weights: dict[str, torch.Tensor], config: Any, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Scans every named matrix (seeded, so the randomized SVD repeats exactly).

    Args:
        named_weights: matrix name -> 2-D weight.
        config: a ``SpectraConfig`` (top_k, method, niter, energy_levels).
    """
    torch.manual_seed(seed)
    return {
        name: spectrum(w, config.top_k, config.method, config.niter, config.energy_levels)
        for name, w in bar(named_weights.items(), desc="spectral scan", unit="matrix")
    }
