"""``MaskSet``: per-parameter boolean keep-masks, the first-class record of what was pruned.

Every stage after decay keeps them: ``apply_`` zeroes what a mask removes, and the set
is saved compactly as bitmaps (one bit a weight, numpy ``packbits``) in a safetensors file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from birdbone.core.io import atomic_path


@dataclass
class MaskSet:
    """Parameter name -> bool tensor of the parameter's shape; True keeps the weight."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask.detach().to(device="cpu", dtype=torch.bool)

    @classmethod
    def from_weights(cls, named: dict[str, torch.Tensor]) -> MaskSet:
        """Masks that keep exactly the nonzero entries of each tensor."""
        return cls({name: (w != 0).cpu() for name, w in named.items()})

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zeroes every weight a mask removes (in place)."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            param = params[name]
            if param.shape != mask.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(param.shape)}")
            param.mul_(mask.to(param.device, param.dtype))

    def sparsity(self) -> dict[str, float]:
        """Share of removed weights per parameter."""
        return {name: 1.0 - float(m.float().mean()) for name, m in self.masks.items()}

    def overall_sparsity(self) -> float:
        """Share of removed weights over all masked parameters together."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def equals(self, other: MaskSet) -> bool:
        """Same names, same bits."""
        return self.masks.keys() == other.masks.keys() and all(
            torch.equal(m, other.masks[n]) for n, m in self.masks.items()
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the set as bitmaps (atomically)."""
        packed, shapes = {}, {}
        for name, mask in self.masks.items():
            packed[name] = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
            shapes[name] = list(mask.shape)
        with atomic_path(path) as tmp:
            save_file(packed, tmp, metadata={"birdbone.maskset": json.dumps(shapes)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskSet:
        """Reads a set written by ``save``."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            shapes = json.loads((handle.metadata() or {})["birdbone.maskset"])
        packed = load_file(Path(path))
        masks = {}
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            bits = np.unpackbits(packed[name].numpy(), count=count).astype(bool)
            masks[name] = torch.from_numpy(bits.reshape(shape))
        return cls(masks)
