"""Linear algebra the Hessian-based methods (SparseGPT, GPTQ) share."""

from __future__ import annotations

import torch


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1.

    Raises:
        torch.linalg.LinAlgError: H is not positive definite even with the damping (the
            caller names the layer and the setting to change).
    """
    h = hessian.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def invertible_hessian(hessian: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """H in float32 on ``device`` with the columns no calibration token reached (diag 0) set
    to identity, so it can be inverted; returns (H, dead columns)."""
    h = hessian.to(device).float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead
