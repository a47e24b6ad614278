"""SparseGPT: one-shot pruning with Hessian-based reconstruction (Frantar & Alistarh,
2023, arXiv:2301.00774).

Columns are processed left to right in blocks. Inside a block the mask is chosen by the
OBS saliency w^2 / [H^-1]_cc^2 (adaptive mask selection), each pruned weight's error is
spread over the row's later columns through the upper Cholesky factor of H^-1 (eq. 3),
and the block's accumulated error updates all later blocks at once (lazy batch update).
H = 2 X^T X / n from the calibration walk, damped by ``damp * mean(diag H)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from birdbone.core.prune.base import LayerPruner, register
from birdbone.core.prune.patterns import prune_count
from birdbone.errors import PruneError


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = hessian.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise PruneError(
            f"{name}: the calibration Hessian is not positive definite even with damping {damp}. "
            "Fix: raise prune.sparsegpt.damp (e.g. 0.1) or use more calibration blocks."
        ) from exc


@torch.no_grad()
def sparsegpt_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Any,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> torch.Tensor:
    """Prunes ``weight`` ``[out, in]`` in place under ``pattern`` and returns the keep-mask.

    For unstructured sparsity each row removes exactly round(sparsity * in) weights,
    spread over the column blocks by cumulative rounding; for N:M every group of M
    consecutive columns keeps N (block_size is rounded up to a multiple of M).
    """
    rows, cols = weight.shape
    w = weight.float().clone()
    h = hessian.to(w.device).float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp, name)
    nm = pattern.kind == "nm"
    if nm:
        block_size = -(-block_size // pattern.m) * pattern.m
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        drop = torch.zeros_like(w1, dtype=torch.bool)
        if not nm:
            count = prune_count(i2, pattern.sparsity) - prune_count(i1, pattern.sparsity)
            saliency = w1.pow(2) / diag.pow(2)[None, :]
            drop.scatter_(1, saliency.topk(count, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                saliency = w1[:, i : i + pattern.m].pow(2) / diag[i : i + pattern.m].pow(2)[None, :]
                idx = saliency.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                drop.scatter_(1, i + idx, True)
            col = w1[:, i]
            q = torch.where(drop[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~drop
    if not torch.isfinite(w).all():
        raise PruneError(f"{name}: SparseGPT produced non-finite weights. Fix: raise prune.sparsegpt.damp.")
    weight.copy_(w.to(weight.dtype))
    return keep


@register("sparsegpt")
class SparseGPTPruner(LayerPruner):
    """SparseGPT with the walk's Hessians; options: ``block_size``, ``damp``."""

    needs_inputs = True
    needs_gram = True

    @torch.no_grad()
    def prune_linear(self, linear: nn.Linear, stats: Any, name: str, pattern: Any) -> torch.Tensor:
        block_size = getattr(self.options, "block_size", 128)
        damp = getattr(self.options, "damp", 0.01)
        return sparsegpt_(linear.weight.data, stats.hessian(), pattern, block_size, damp, name)
