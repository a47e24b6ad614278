"""Pruned Linears as sparse kernels: CSR on the CPU, 2:4 semi-structured on CUDA.

Zeros in a dense matrix cost as much as any other number: dense kernels (torch's, and
llama.cpp's) run unstructured and N:M sparsity at dense speed. A sparse format skips them,
at the price of indexing; ``bench/speed.py`` measures where, if anywhere, that pays off.
The conversion keeps the values exactly (the outputs agree up to summation order).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from birdbone.errors import BirdboneError

log = logging.getLogger(__name__)


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


def _semi_structured_backends(dtype: torch.dtype) -> list[Any]:
    """torch's 2:4 backends that run ``dtype`` on this GPU: cuSPARSELt (float16, bfloat16,
    int8) where it is built in, and CUTLASS (also float32), whose kernels exist for compute
    capability 8.x only (an H100 / H200 is 9.0)."""
    from torch.sparse import semi_structured as ss

    backends = []
    if torch.backends.cusparselt.is_available() and not ss.SparseSemiStructuredTensor._FORCE_CUTLASS:
        backends.append(ss.SparseSemiStructuredTensorCUSPARSELT)
    if torch.cuda.get_device_capability()[0] == 8:
        backends.append(ss.SparseSemiStructuredTensorCUTLASS)
    return [b for b in backends if dtype in b._DTYPE_SHAPE_CONSTRAINTS]


def _semi_structured(weight: torch.Tensor, backends: list[Any]) -> Any:
    """The semi-structured sparse tensor of a 2:4 ``weight`` in its own dtype, on its own
    device, from the first backend whose tiles its shape fits; None if none fits."""
    rows, cols = weight.shape
    for backend in backends:
        limits = backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
        if rows % limits.sparse_min_rows == 0 and cols % limits.sparse_min_cols == 0:
            return backend.from_dense(weight)
    return None


def to_semi_structured_(bundle: Any) -> list[str]:
    """Turns every block Linear whose weight is 2:4 sparse into torch's semi-structured
    sparse format (CUDA, compute capability 8.0 or newer: the sparse tensor cores), in the
    model's own dtype and on its device; returns the converted names.

    Raises:
        BirdboneError: no CUDA device with 2:4 support, the model not on it, a dtype no
            backend takes on this GPU (float32 on 9.0: convert to bfloat16), or no weight is
            2:4 sparse; nothing is converted then.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise BirdboneError(
            "2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx+). "
            "Fix: run on such a GPU, or keep the dense weights (the zeros then bring no speed)."
        )
    linears = bundle.adapter.linears(bundle.model)
    if any(lin.weight.device.type != "cuda" for lin in linears.values()):
        raise BirdboneError("the model is not on the GPU. Fix: bundle.model.to('cuda') before to_semi_structured_.")
    dtype = next(iter(linears.values())).weight.dtype
    backends = _semi_structured_backends(dtype)
    if not backends:
        major, minor = torch.cuda.get_device_capability()
        raise BirdboneError(
            f"no 2:4 kernel takes {dtype} on this GPU (compute capability {major}.{minor}): cuSPARSELt runs float16, "
            "bfloat16 and int8, and CUTLASS's float32 kernels exist for 8.x only. Nothing was converted. "
            "Fix: bundle.model.to(torch.bfloat16) first (and time the dense model in the same dtype)."
        )
    names, unfit = [], []
    for name, linear in linears.items():
        w = linear.weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1) if w.shape[1] % 4 == 0 else None
        if groups is None or not bool((groups <= 2).all()):
            continue
        sparse = _semi_structured(w, backends)
        if sparse is None:
            unfit.append(f"{name} {tuple(w.shape)}")
            continue
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        names.append(name)
    if unfit:
        log.warning("left dense (their shape fits no 2:4 kernel's tiles for %s): %s", dtype, ", ".join(unfit))
    if not names and unfit:
        raise BirdboneError(
            f"no 2:4 sparse Linear fits a semi-structured kernel in {dtype} (e.g. {unfit[0]}). "
            "Fix: float16 or bfloat16 weights (model.half()), or widths that are multiples of 64."
        )
    if not names:
        raise BirdboneError("no block Linear is 2:4 sparse. Fix: prune with decay.pattern {kind: nm, n: 2, m: 4}.")
    return names
