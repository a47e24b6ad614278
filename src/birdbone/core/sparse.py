"""Pruned Linears as sparse kernels: CSR on the CPU, 2:4 semi-structured on CUDA.

Zeros in a dense matrix cost as much as any other number: dense kernels (torch's, and
llama.cpp's) run unstructured and N:M sparsity at dense speed. A sparse format skips them,
at the price of indexing; ``bench/speed.py`` measures where, if anywhere, that pays off.
The conversion keeps the values exactly (the outputs agree up to summation order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from birdbone.errors import BirdboneError


class SparseLinear(nn.Module):
    """A Linear whose weight is stored in CSR (``torch.sparse_csr``); inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().to_sparse_csr(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.T.to(self.weight.dtype)).T.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def density(self) -> float:
        return self.weight.values().numel() / (self.in_features * self.out_features)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def to_csr_(bundle: Any, min_sparsity: float = 0.0) -> dict[str, float]:
    """Replaces every block Linear with at least ``min_sparsity`` zeros by a ``SparseLinear``
    (in place); returns each converted Linear's sparsity."""
    converted = {}
    for name, linear in bundle.adapter.linears(bundle.model).items():
        sparsity = float((linear.weight == 0).float().mean())
        if sparsity >= min_sparsity and sparsity > 0:
            _replace(bundle.model, name, SparseLinear.from_linear(linear))
            converted[name] = sparsity
    return converted


def to_semi_structured_(bundle: Any) -> list[str]:
    """Turns every block Linear whose weight is 2:4 sparse into torch's semi-structured
    sparse format (CUDA, compute capability 8.0 or newer: the sparse tensor cores); returns
    the converted names.

    Raises:
        BirdboneError: no CUDA device with 2:4 support, or no weight is 2:4 sparse.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise BirdboneError(
            "2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx+). "
            "Fix: run on such a GPU, or keep the dense weights (the zeros then bring no speed)."
        )
    from torch.sparse import to_sparse_semi_structured

    names = []
    for name, linear in bundle.adapter.linears(bundle.model).items():
        w = linear.weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        if w.shape[1] % 4 == 0 and bool((groups <= 2).all()):
            linear.weight = nn.Parameter(to_sparse_semi_structured(w.half().cuda()), requires_grad=False)
            names.append(name)
    if not names:
        raise BirdboneError("no block Linear is 2:4 sparse. Fix: prune with decay.pattern {kind: nm, n: 2, m: 4}.")
    return names
