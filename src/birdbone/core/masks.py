"""``MaskSet``: per-parameter boolean keep-masks, the first-class record of what was pruned.

Every stage after decay keeps them: ``apply_`` zeroes what a mask removes. Masks are held
as bitmaps (one bit a weight, numpy ``packbits``), in memory and on disk alike, so the masks
of a billion-weight model cost 125 MB, not 1 GB; indexing returns the bool tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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

    def copy(self) -> MaskSet:
        """An independent copy."""
        out = MaskSet()
        out._bits = {name: bits.copy() for name, bits in self._bits.items()}
        out._shapes = dict(self._shapes)
        return out

    def update(self, other: MaskSet) -> None:
        """Adds (or replaces) the masks of ``other``."""
        self._bits.update(other._bits)
        self._shapes.update(other._shapes)

    def keep_(self, positions: Mapping[str, torch.Tensor]) -> None:
        """Marks the given flat positions of each parameter as kept again (after a restore)."""
        for name, index in positions.items():
            if name in self and index.numel():
                mask = self[name]
                mask.view(-1)[index.long()] = True
                self[name] = mask

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
            zero_masked_(param.data, mask)

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


def zero_masked_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sets the weights ``mask`` removes to +0.0 in place. Not ``weight * mask``: that makes a
    negative weight -0.0, and a later +0.0 at the same place would read as a change."""
    return weight.masked_fill_(~mask.to(weight.device, torch.bool), 0.0)


# --------------------------------------------------------------------------- deltas


@dataclass
class ParamDelta:
    """One parameter's change in one wave: the flat indices of the weights the wave
    removed (most important first) and their values before; and, for methods that also
    move kept weights (SparseGPT), those weights' values before."""

    removed_index: torch.Tensor  # int64 [r], sorted by importance, descending
    removed_value: torch.Tensor  # [r]
    updated_index: torch.Tensor  # int64 [u]
    updated_value: torch.Tensor  # [u]
    # with units (structured pruning): the rank of each removed weight's unit, ascending;
    # a share of a rollback then restores whole units, not a share of each parameter
    unit_rank: torch.Tensor | None = None  # int64 [r]

    @property
    def removed(self) -> int:
        return int(self.removed_index.numel())

    @property
    def dense(self) -> bool:
        """Whether ``updated_value`` holds every old value of the parameter (flat), which
        is how a delta that moved most weights (healing) is stored: 4 bytes a weight
        instead of 12 for index and value."""
        return self.updated_index.numel() == 1 and int(self.updated_index[0]) == -1

    def span(self, part: int, parts: int, units: int) -> tuple[int, int]:
        """The slice of removed weights in ``part`` of ``parts``: equal shares of this
        parameter's weights, or of the delta's ``units`` when it has unit ranks."""
        if self.unit_rank is None:
            return (self.removed * part) // parts, (self.removed * (part + 1)) // parts
        lo, hi = (units * part) // parts, (units * (part + 1)) // parts
        bounds = torch.searchsorted(self.unit_rank, torch.tensor([lo, hi], dtype=self.unit_rank.dtype))
        return int(bounds[0]), int(bounds[1])


class WaveDelta:
    """What one wave changed, enough to undo it exactly and nothing more (no snapshots)."""

    def __init__(self, params: dict[str, ParamDelta] | None = None, units: int = 0):
        self.params: dict[str, ParamDelta] = dict(params or {})
        self.units = units  # ranked units (0: none; shares are per parameter)

    @classmethod
    @torch.no_grad()
    def between(
        cls,
        before: Mapping[str, torch.Tensor],
        after: Mapping[str, torch.Tensor],
        importance: Mapping[str, torch.Tensor] | None = None,
    ) -> WaveDelta:
        """The delta from ``before`` to ``after`` (same names and shapes). Removed weights are
        ordered most important first: by ``importance`` (a tensor of the parameter's shape,
        or a vector of per-input-column scales multiplying |W|), else by |W| before."""
        params = {}
        for name, old in before.items():
            new = after[name]
            old_flat, new_flat = old.detach().reshape(-1).cpu(), new.detach().reshape(-1).cpu()
            changed = old_flat.view(_bits_of(old)) != new_flat.view(_bits_of(new))  # bitwise: -0.0 and NaN count
            removed = changed & (new_flat == 0) & (old_flat != 0)  # a zero whose sign flipped was not removed
            updated = changed & ~removed
            idx = removed.nonzero().reshape(-1)
            score = removal_scores(name, old_flat[idx], idx, importance)
            idx = idx[torch.argsort(-score, stable=True)]
            up = updated.nonzero().reshape(-1)
            if up.numel() * 3 > old_flat.numel():  # most weights moved (healing): every old value, no index
                params[name] = ParamDelta(idx, old_flat[idx].clone(), _DENSE.clone(), old_flat.clone())
            else:
                params[name] = ParamDelta(idx, old_flat[idx].clone(), up, old_flat[up].clone())
        return cls(params)

    def removed(self) -> int:
        return sum(p.removed for p in self.params.values())

    @torch.no_grad()
    def group_units_(
        self,
        unit_of: Callable[[str, torch.Tensor], torch.Tensor],
        importance: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Orders the removed weights by whole units, so that a share of a rollback restores
        whole MLP channels, heads or blocks. ``unit_of(name, flat_index)`` gives each removed
        weight's unit id (the same id in every parameter the unit spans). A unit scores the
        sum of its weights' |W| (times ``importance`` as in ``between``); the highest first,
        ties by id."""
        ids, scores = {}, {}
        for name, delta in self.params.items():
            ids[name] = unit_of(name, delta.removed_index).long()
            scores[name] = removal_scores(name, delta.removed_value, delta.removed_index, importance).double()
        if not ids or not sum(i.numel() for i in ids.values()):
            self.units = 0
            return
        units, inverse = torch.unique(torch.cat(list(ids.values())), return_inverse=True)
        total = torch.zeros(units.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(list(scores.values())))
        order = sorted(range(units.numel()), key=lambda u: (-float(total[u]), int(units[u])))
        rank_of = torch.empty(units.numel(), dtype=torch.long)
        rank_of[torch.tensor(order)] = torch.arange(units.numel())
        offset = 0
        for name, delta in self.params.items():
            count = ids[name].numel()
            rank = rank_of[inverse[offset : offset + count]]
            offset += count
            perm = torch.argsort(rank, stable=True)
            delta.removed_index, delta.removed_value = delta.removed_index[perm], delta.removed_value[perm]
            delta.unit_rank = rank[perm]
        self.units = int(units.numel())

    def part_index(self, part: int, parts: int) -> dict[str, torch.Tensor]:
        """Flat indices of each parameter's removed weights in slice ``part`` of ``parts``."""
        out = {}
        for name, delta in self.params.items():
            lo, hi = delta.span(part, parts, self.units)
            out[name] = delta.removed_index[lo:hi]
        return out

    @torch.no_grad()
    def restore_(self, target: nn.Module | Mapping[str, torch.Tensor], part: int = 0, parts: int = 1) -> int:
        """Writes back the ``part``-th of ``parts`` equal slices of each parameter's removed
        weights (most important first) into a model, or a dict of tensors by parameter
        name; the last part also restores updated weights, so restoring parts
        0..parts-1 undoes the wave exactly. Returns the weights restored."""
        named = dict(target.named_parameters()) if isinstance(target, nn.Module) else target
        restored = 0
        for name, delta in self.params.items():
            flat = named[name].data.view(-1)
            lo, hi = delta.span(part, parts, self.units)
            index = delta.removed_index[lo:hi].to(flat.device)
            flat[index] = delta.removed_value[lo:hi].to(flat.device, flat.dtype)
            restored += hi - lo
            if part == parts - 1 and delta.dense:
                flat.copy_(delta.updated_value.to(flat.device, flat.dtype))
            elif part == parts - 1 and delta.updated_index.numel():
                flat[delta.updated_index.to(flat.device)] = delta.updated_value.to(flat.device, flat.dtype)
        return restored

    def invert_(self, target: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Undoes the wave exactly (waves after it must be undone first)."""
        self.restore_(target, 0, 1)

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {}
        for name, d in self.params.items():
            tensors.update(
                {
                    f"{name}::removed_index": d.removed_index,
                    f"{name}::removed_value": d.removed_value,
                    f"{name}::updated_index": d.updated_index,
                    f"{name}::updated_value": d.updated_value,
                }
            )
            if d.unit_rank is not None:
                tensors[f"{name}::unit_rank"] = d.unit_rank
        with atomic_path(path) as tmp:
            # one metadata key: safetensors writes several in a random (hash map) order
            metadata = {"birdbone.delta": json.dumps({"version": 1, "units": self.units})}
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WaveDelta:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if "birdbone.units" in meta:  # written before the one-key form
            units = int(meta["birdbone.units"])
        else:
            units = int(json.loads(meta.get("birdbone.delta", "{}") or "{}").get("units", 0))
        tensors = load_file(Path(path))
        names = sorted({key.split("::")[0] for key in tensors})
        params = {
            n: ParamDelta(*(tensors[f"{n}::{part}"] for part in _DELTA_PARTS), tensors.get(f"{n}::unit_rank"))
            for n in names
        }
        return cls(params, units)


class DeltaHistory:
    """The deltas of successive waves, oldest first. Undoing them newest first walks the
    model back wave by wave, bit for bit; only what each wave changed is stored."""

    def __init__(self, waves: Mapping[int, WaveDelta] | None = None):
        self.waves: dict[int, WaveDelta] = dict(sorted((waves or {}).items()))

    def record(self, wave: int, delta: WaveDelta) -> None:
        if self.waves and wave <= max(self.waves):
            raise ValueError(f"wave {wave} recorded after wave {max(self.waves)}")
        self.waves[wave] = delta

    def undo_(self, model: nn.Module, wave: int) -> None:
        """Undoes every wave from the newest back to ``wave`` (inclusive) and forgets them."""
        for index in sorted((w for w in self.waves if w >= wave), reverse=True):
            self.waves.pop(index).invert_(model)

    @torch.no_grad()
    def since(self, model: nn.Module, wave: int, importance: Mapping[str, torch.Tensor] | None = None) -> WaveDelta:
        """One delta from the state before ``wave`` to the model now (built on a copy of
        the changed parameters; the model is not touched)."""
        later = [self.waves[w] for w in sorted(self.waves) if w >= wave]
        names = sorted({name for delta in later for name in delta.params})
        named = dict(model.named_parameters())
        now = {name: named[name].detach().clone() for name in names}
        before = {name: t.clone() for name, t in now.items()}
        for delta in reversed(later):
            delta.invert_(before)
        return WaveDelta.between(before, now, importance)


def removal_scores(
    name: str, values: torch.Tensor, index: torch.Tensor, importance: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """Importance of removed weights (their values before, at flat ``index``): |W|, times
    a per-input-column vector (|W| * ||X||, Wanda's score), or a full tensor of scores."""
    score = values.abs().float()
    if importance is None or name not in importance:
        return score
    weight = importance[name].cpu().float()
    return score * weight[index % weight.numel()] if weight.ndim == 1 else weight.reshape(-1)[index]


_DENSE = torch.tensor([-1], dtype=torch.long)  # updated_index of a dense delta
_DELTA_PARTS = ("removed_index", "removed_value", "updated_index", "updated_value")


def _bits_of(tensor: torch.Tensor) -> torch.dtype:
    """An integer type of the tensor's width, to compare values bit for bit."""
    return {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()]
