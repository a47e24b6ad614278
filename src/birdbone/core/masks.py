"""``MaskSet``: per-parameter boolean keep-masks, the first-class record of what was pruned.

Every stage after decay keeps them: ``apply_`` zeroes what a mask removes. Masks are held
as bitmaps (one bit a weight, numpy ``packbits``), in memory and on disk alike, so the masks
of a billion-weight model cost 125 MB, not 1 GB; indexing returns the bool tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from birdbone.core.io import atomic_path

_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def _pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.detach().to(device="cpu", dtype=torch.bool).numpy().reshape(-1))


def _unpack(bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits, count=count).astype(bool).reshape(shape))


class MaskSet:
    """Parameter name -> bool keep-mask of the parameter's shape (True keeps the weight)."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self._bits: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, mask in (masks or {}).items():
            self[name] = mask

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __contains__(self, name: object) -> bool:
        return name in self._bits

    def __getitem__(self, name: str) -> torch.Tensor:
        return _unpack(self._bits[name], self._shapes[name])

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._bits[name] = _pack(mask)
        self._shapes[name] = tuple(mask.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, bool mask) pairs, unpacked one at a time."""
        for name in self._bits:
            yield name, self[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def update(self, other: MaskSet) -> None:
        """Adds (or replaces) the masks of ``other``."""
        self._bits.update(other._bits)
        self._shapes.update(other._shapes)

    @classmethod
    def from_weights(cls, named: Mapping[str, torch.Tensor]) -> MaskSet:
        """Masks that keep exactly the nonzero entries of each tensor."""
        return cls({name: w != 0 for name, w in named.items()})

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zeroes every weight a mask removes (in place)."""
        params = dict(model.named_parameters())
        for name, mask in self.items():
            param = params[name]
            if param.shape != mask.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(param.shape)}")
            param.mul_(mask.to(param.device, param.dtype))

    def kept(self, name: str) -> int:
        """Number of weights the mask keeps (a popcount of the bitmap; padding bits are 0)."""
        return int(_POPCOUNT[self._bits[name]].sum())

    def numel(self, name: str) -> int:
        return int(np.prod(self._shapes[name]))

    def sparsity(self) -> dict[str, float]:
        """Share of removed weights per parameter."""
        return {name: 1.0 - self.kept(name) / max(self.numel(name), 1) for name in self._bits}

    def overall_sparsity(self) -> float:
        """Share of removed weights over all masked parameters together."""
        total = sum(self.numel(name) for name in self._bits)
        kept = sum(self.kept(name) for name in self._bits)
        return 1.0 - kept / total if total else 0.0

    def equals(self, other: MaskSet) -> bool:
        """Same names, same shapes, same bits."""
        return (
            self._shapes == other._shapes
            and self._bits.keys() == other._bits.keys()
            and all(np.array_equal(bits, other._bits[name]) for name, bits in self._bits.items())
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the set as bitmaps (atomically)."""
        packed = {name: torch.from_numpy(bits.copy()) for name, bits in self._bits.items()}
        shapes = {name: list(shape) for name, shape in self._shapes.items()}
        with atomic_path(path) as tmp:
            save_file(packed, tmp, metadata={"birdbone.maskset": json.dumps(shapes)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskSet:
        """Reads a set written by ``save``."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            shapes = json.loads((handle.metadata() or {})["birdbone.maskset"])
        packed = load_file(Path(path))
        masks = cls()
        for name, shape in shapes.items():
            masks._bits[name] = packed[name].numpy()
            masks._shapes[name] = tuple(shape)
        return masks
