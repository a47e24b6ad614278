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

from birdbone.core.linalg import inverse_cholesky, invertible_hessian
from birdbone.core.prune.base import LayerPruner, register
from birdbone.core.prune.patterns import prune_count
from birdbone.errors import PruneError


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    try:
        return inverse_cholesky(hessian, damp)
    except torch.linalg.LinAlgError as exc:
        raise PruneError(
            f"{name}: the calibration Hessian is not positive definite even with damping {damp}. "
            "Fix: raise prune.sparsegpt.damp (e.g. 0.1) or use more calibration blocks."
        ) from exc


def _candidates_only(saliency: torch.Tensor, pattern: Any) -> torch.Tensor:
    """+inf everywhere but each M-group's M - N least salient (an N:M ramp's candidates)."""
    rows, cols = saliency.shape
    grouped = saliency.reshape(rows, cols // pattern.m, pattern.m)
    order = grouped.argsort(dim=-1, stable=True)[..., : pattern.m - pattern.n]
    candidate = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    return torch.where(candidate, saliency, torch.full_like(saliency, float("inf")))


@torch.no_grad()
def sparsegpt_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Any,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prunes ``weight`` ``[out, in]`` in place under ``pattern`` and returns the keep-mask.

    For unstructured sparsity each row removes exactly round(sparsity * in) weights,
    spread over the column blocks by cumulative rounding; for N:M every group of M
    consecutive columns keeps N (block_size is rounded up to a multiple of M); an N:M ramp
    removes like unstructured, only among each group's M - N least salient. Weights that
    ``prior`` (a keep-mask of earlier waves) removed are removed again first, and each row's
    later blocks make up for what they added.
    """
    rows, cols = weight.shape
    w = weight.float().clone()
    h, dead = invertible_hessian(hessian, w.device)
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp, name)
    nm, ramp = pattern.kind == "nm", pattern.kind == "nm_ramp"
    if nm or ramp:
        block_size = -(-block_size // pattern.m) * pattern.m
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    removed_before = prior is not None and not bool(prior.all())
    dropped = torch.zeros(rows, dtype=torch.long, device=w.device)  # per row, so far
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        drop = torch.zeros_like(w1, dtype=torch.bool)
        forced = None if prior is None else ~prior[:, i1:i2].to(w.device)
        if not nm:
            saliency = w1.pow(2) / diag.pow(2)[None, :]
            if forced is not None:
                saliency = saliency.masked_fill(forced, float("-inf"))
            if ramp:
                saliency = _candidates_only(saliency, pattern)
            if not removed_before and not ramp:
                count = prune_count(i2, pattern.sparsity) - prune_count(i1, pattern.sparsity)
                drop.scatter_(1, saliency.topk(count, dim=1, largest=False).indices, True)
            else:  # per-row counts: catch up on the target, and never fewer than the forced
                need = (prune_count(i2, pattern.sparsity) - dropped).clamp(min=0)
                if forced is not None:
                    need = torch.maximum(need, forced.sum(1))
                if ramp:
                    need = need.clamp(max=(i2 - i1) // pattern.m * (pattern.m - pattern.n))
                ranks = saliency.argsort(dim=1, stable=True).argsort(dim=1)
                drop = ranks < need[:, None]
            dropped += drop.sum(1)
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                saliency = w1[:, i : i + pattern.m].pow(2) / diag[i : i + pattern.m].pow(2)[None, :]
                if forced is not None:
                    saliency = saliency.masked_fill(forced[:, i : i + pattern.m], float("-inf"))
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
    ranks_scores = False

    @torch.no_grad()
    def prune_linear(
        self, linear: nn.Linear, stats: Any, name: str, pattern: Any, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        block_size = getattr(self.options, "block_size", 128)
        damp = getattr(self.options, "damp", 0.01)
        return sparsegpt_(linear.weight.data, stats.hessian(), pattern, block_size, damp, name, prior)
