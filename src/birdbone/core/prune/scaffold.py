"""The seed's scaffold as a pruning criterion: W ~ L + S, a low-rank scaffold L plus a
sparse residual S, within the same count of numbers as unstructured pruning.

The seed grows the scaffold rank by rank (W_k = sum_{i<=k} s_i u_i v_i^T) and zeroes the
residual below a threshold tied to the top singular value (tau = 0.1 s_1). A fixed
threshold leaves the count of numbers to chance, so for a comparison at equal size this
follows the budgeted form of the same idea, OATS (Zhang & Papyan, 2024, arXiv:2409.13652):
in the input-scaled space W D (D = diag ||X_j||, the input norms Wanda uses, so that
columns that see large inputs count more), alternate

    L <- the best rank-r approximation of (W - S) D,     S <- the k largest of (W D - L),

each row keeping the same count, then scale back by D^-1. With sparsity s and rank share
kappa, a ``[out, in]`` matrix keeps (1 - s) out in numbers: r = kappa (1 - s) out in /
(out + in) of them in the factors, the rest in S.

The result is a sparse layer (S, its zeros kept by a mask like any pruning) plus rank-r
factors (B, A) with B A = L: a LoRA adapter on the pruned model, which peft, vLLM and
llama.cpp load as it is (``lowrank.save_adapter``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from birdbone.core.masks import MaskSet, zero_masked_
from birdbone.core.walk import calibration_walk
from birdbone.errors import PruneError


def budget(rows: int, cols: int, sparsity: float, rank_share: float) -> tuple[int, int]:
    """(rank, numbers kept per row of S) for a ``[rows, cols]`` matrix: r (rows + cols) +
    rows * k <= (1 - sparsity) rows cols."""
    total = (1.0 - sparsity) * rows * cols
    rank = int(rank_share * total // (rows + cols))
    per_row = int((total - rank * (rows + cols)) // rows)
    return rank, max(min(per_row, cols), 0)


def _top_per_row(x: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(x, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(1, x.abs().topk(keep, dim=1).indices, True)
    return mask


@torch.no_grad()
def scaffold_split(
    weight: torch.Tensor, input_norms: torch.Tensor | None, sparsity: float, rank_share: float, iterations: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W ~ B A + S under the budget; returns (S, keep-mask of S, B ``[out, r]``, A ``[r, in]``)."""
    rows, cols = weight.shape
    rank, per_row = budget(rows, cols, sparsity, rank_share)
    w = weight.detach().float()
    scale = torch.ones(cols, device=w.device) if input_norms is None else input_norms.float().to(w.device)
    scale = scale.clamp_min(1e-8 * float(scale.max().clamp_min(1e-30)))
    scaled = w * scale[None]
    sparse = torch.zeros_like(scaled)
    low = torch.zeros_like(scaled)
    u = s = v = None
    for _ in range(max(iterations, 1)):
        if rank > 0:
            u, s, v = torch.svd_lowrank(scaled - sparse, q=min(rank + 8, rows, cols), niter=4)
            low = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
        residual = scaled - low
        keep = _top_per_row(residual, per_row)
        sparse = residual * keep
    keep = _top_per_row(scaled - low, per_row)
    if rank > 0:
        root = s[:rank].sqrt()
        b = u[:, :rank] * root[None]
        a = (root[:, None] * v[:, :rank].T) / scale[None]
    else:
        b, a = torch.zeros(rows, 0, device=w.device), torch.zeros(0, cols, device=w.device)
    out = torch.where(keep, (scaled - low) / scale[None], torch.zeros_like(w))
    return out, keep, b, a


class _Scaffold:
    """A calibration-walk method: every block Linear becomes S (masked) with its factors
    kept aside, block by block, so later blocks see the scaffolded earlier ones."""

    needs_inputs = True
    needs_gram = False
    needs_frequency = False

    def __init__(self, prefix: str, sparsity: float, rank_share: float, iterations: int):
        self.prefix, self.sparsity, self.rank_share, self.iterations = prefix, sparsity, rank_share, iterations
        self.masks = MaskSet()
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sparse: dict[str, torch.Tensor] = {}  # S itself, put back once the walk is over

    def process(self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, Any]) -> None:
        for name, linear in linears.items():
            full = f"{self.prefix}.{index}.{name}.weight"
            sparse, keep, b, a = scaffold_split(
                linear.weight, stats[name].norm(), self.sparsity, self.rank_share, self.iterations
            )
            sparse = sparse.to(linear.weight.dtype)
            zero_masked_(sparse, keep)
            self.sparse[full], self.masks[full], self.factors[full] = sparse.cpu(), keep.cpu(), (b.cpu(), a.cpu())
            # the layer computes x S^T + (x A^T) B^T: the later blocks' inputs come from that
            linear.weight.data.copy_((sparse.float() + b @ a).to(linear.weight.dtype))


def scaffold_(
    bundle: Any,
    sparsity: float,
    calibration: torch.Tensor,
    rank_share: float = 0.25,
    iterations: int = 20,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[MaskSet, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Splits every decoder-block Linear of ``bundle.model`` into a sparse residual (left
    in the weights, zeros where the mask says) and low-rank factors (returned), so that
    the layer keeps (1 - ``sparsity``) of its numbers in all.

    The randomized SVDs draw from a generator seeded with ``seed`` (the global one is left
    as it was), so the same inputs give the same split.

    Returns:
        (keep-masks of the sparse parts, factors by weight name, report).

    Raises:
        PruneError: sparsity outside [0, 1), a rank share outside [0, 1], or no calibration.
    """
    if not 0.0 <= sparsity < 1.0:
        raise PruneError(f"scaffold sparsity {sparsity} is outside [0, 1). Fix: e.g. 0.5")
    if not 0.0 <= rank_share <= 1.0:
        raise PruneError(
            f"scaffold rank_share {rank_share} is outside [0, 1]: it is the share of the kept numbers "
            "that go to the low-rank factors. Fix: e.g. 0.25"
        )
    if calibration is None or calibration.shape[0] == 0:
        raise PruneError("scaffold needs calibration blocks (data.splits.calibration > 0)")
    start = time.perf_counter()
    method = _Scaffold(bundle.adapter.blocks_path, sparsity, rank_share, iterations)
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        torch.manual_seed(seed)
        calibration_walk(bundle, calibration, method, batch_size, device, "scaffold pruning", compute_dtype)  # type: ignore[arg-type]
    for name, linear in bundle.adapter.linears(bundle.model).items():  # the weights hold S alone
        linear.weight.data.copy_(method.sparse[f"{name}.weight"].to(linear.weight.device))
    kept = sum(int(m.sum()) for _, m in method.masks.items())
    factor_numbers = sum(b.numel() + a.numel() for b, a in method.factors.values())
    total = sum(m.numel() for _, m in method.masks.items())
    report = {
        "method": "scaffold",
        "sparsity": 1.0 - (kept + factor_numbers) / total,  # counting the factors' numbers as kept
        "sparse_part_sparsity": method.masks.overall_sparsity(),
        "rank_share": rank_share,
        "ranks": {name: int(b.shape[1]) for name, (b, _) in method.factors.items()},
        "iterations": iterations,
        "seconds": time.perf_counter() - start,
    }
    return method.masks, method.factors, report
