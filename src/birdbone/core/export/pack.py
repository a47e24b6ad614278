"""Compact storage of a model directory: each tensor in the encoding that stores it in the
fewest bytes, chosen per tensor, lossless.

Strategies (``STRATEGIES``), each a pair of functions array -> parts -> array:

- ``raw``: the bytes as they are;
- ``gzip``: the bytes through zlib (level 9);
- ``rle``: runs of equal values as (value, length) pairs, for tensors with long runs;
- ``sparse``: a bitmask of the non-zero positions (1 bit per weight) and the non-zero
  values: unstructured or N:M pruning stored at its real size;
- ``quantized``: the integer codes packed at their grid's bits, with the float16 scales
  (and offsets) of each group and, where weights were pruned, the bitmask. Only for
  weights a quantize stage left on a grid (``quant.safetensors``); decoding computes
  ``d q + m`` exactly as the quantize stage did, so the floats come back bit for bit.

``compress_model(IN, OUT)`` writes one file (a safetensors container: the encoded parts as
uint8 tensors, what each tensor was and how it was encoded in the metadata; the
directory's other files zlib-compressed) and returns per-tensor and total statistics:
bytes before and after, ratio, encoding and decoding milliseconds. ``unpack.decompress_model``
rebuilds the directory, reading the pack as hostile; every tensor round-trips bit-exact
(checked on write).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from birdbone.core.io import atomic_path
from birdbone.core.quantize import QUANT_FILE, Grid, QuantTable, codes, grid_list
from birdbone.errors import PackError

FORMAT = "birdbone-pack/2"  # 2: files in subfolders (adapter/) too
READABLE = ("birdbone-pack/1", FORMAT)
Parts = dict[str, np.ndarray]


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().reshape(-1)


def _tensor(raw: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


# --------------------------------------------------------------------------- strategies


def _enc_raw(t: torch.Tensor, info: Any) -> Parts:
    return {"data": _bytes(t)}


def _dec_raw(parts: Parts, dtype: torch.dtype, shape: list[int], info: Any) -> torch.Tensor:
    return _tensor(parts["data"], dtype, shape)


GZIP_LEVEL = 6  # level 9 takes several times longer for a percent or two on float weights


def _enc_gzip(t: torch.Tensor, info: Any) -> Parts:
    return {"data": np.frombuffer(zlib.compress(_bytes(t).tobytes(), GZIP_LEVEL), dtype=np.uint8)}


def _gzip_estimate(t: torch.Tensor, sample: int = 1 << 20) -> float:
    """gzip's size on the tensor, estimated from its first ``sample`` bytes."""
    raw = _bytes(t)
    if raw.size <= sample:
        return float(len(zlib.compress(raw.tobytes(), GZIP_LEVEL)))
    return len(zlib.compress(raw[:sample].tobytes(), GZIP_LEVEL)) * raw.size / sample


def _dec_gzip(parts: Parts, dtype: torch.dtype, shape: list[int], info: Any) -> torch.Tensor:
    return _tensor(np.frombuffer(zlib.decompress(parts["data"].tobytes()), dtype=np.uint8), dtype, shape)


def _word(dtype: torch.dtype) -> type:
    """The unsigned integer type as wide as one element of ``dtype``."""
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]


def _words(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of their width (equal bits, equal words)."""
    return _bytes(t).view(_word(t.dtype))


def _enc_rle(t: torch.Tensor, info: Any) -> Parts:
    words = _words(t)
    if words.size == 0:
        return {"values": words.view(np.uint8), "lengths": np.zeros(0, np.uint8)}
    starts = np.flatnonzero(np.concatenate(([True], words[1:] != words[:-1])))
    lengths = np.diff(np.concatenate((starts, [words.size]))).astype(np.uint32)
    return {"values": words[starts].view(np.uint8), "lengths": lengths.view(np.uint8)}


def _dec_rle(parts: Parts, dtype: torch.dtype, shape: list[int], info: Any) -> torch.Tensor:
    width = _word(dtype)
    words = np.repeat(parts["values"].view(width), parts["lengths"].view(np.uint32))
    return _tensor(words.view(np.uint8), dtype, shape)


def _enc_sparse(t: torch.Tensor, info: Any) -> Parts:
    words = _words(t)
    nonzero = words != 0  # bit pattern zero: +0.0 only, so -0.0 survives as a value
    return {"mask": np.packbits(nonzero), "values": words[nonzero].view(np.uint8)}


def _dec_sparse(parts: Parts, dtype: torch.dtype, shape: list[int], info: Any) -> torch.Tensor:
    n = int(np.prod(shape))
    width = _word(dtype)
    nonzero = np.unpackbits(parts["mask"], count=n).astype(bool)
    words = np.zeros(n, dtype=width)
    words[nonzero] = parts["values"].view(width)
    return _tensor(words.view(np.uint8), dtype, shape)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``values`` (each < 2**bits) as a little-endian bit stream (whole bytes per
    code at 8 bits, two per byte at 4, four at 2; bit by bit otherwise)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    if bits in (4, 2) and v.size % (8 // bits) == 0:
        per = 8 // bits
        lanes = v.reshape(-1, per)
        out = np.zeros(lanes.shape[0], dtype=np.uint8)
        for i in range(per):
            out |= lanes[:, i] << (bits * i)
        return out
    expanded = ((v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(expanded.reshape(-1), bitorder="little")


def _unpack_bits(stream: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return stream[:n].astype(np.int16)
    if bits in (4, 2) and n % (8 // bits) == 0:
        per = 8 // bits
        mask = np.uint8(2**bits - 1)
        lanes = np.stack([(stream >> (bits * i)) & mask for i in range(per)], axis=1)
        return lanes.reshape(-1)[:n].astype(np.int16)
    flat = np.unpackbits(stream, count=n * bits, bitorder="little").reshape(n, bits)
    return (flat.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(1, dtype=np.int16)


def _scale_dtype(grid: Grid) -> torch.dtype:
    """Group scales are float16 numbers, except K-quant ones (a float16 times a 6-bit level)."""
    return torch.float32 if grid.superblock else torch.float16


def _enc_quantized(t: torch.Tensor, info: Any) -> Parts:
    grid, (d, m), keep = info
    low, _ = grid.levels()
    q = (codes(t, (d, m), grid, keep).to(torch.int64).numpy().reshape(-1) - low).astype(np.int64)
    scale = _scale_dtype(grid)
    parts = {
        "codes": _pack_bits(q, grid.bits),
        "d": _bytes(d.to(scale)),
        "m": _bytes(m.to(scale)) if not grid.sym else np.zeros(0, np.uint8),
    }
    if keep is not None:
        parts["mask"] = np.packbits(keep.numpy().reshape(-1))
    return parts


def _dec_quantized(parts: Parts, dtype: torch.dtype, shape: list[int], info: Any) -> torch.Tensor:
    grid: Grid = info
    rows, cols = shape
    low, _ = grid.levels()
    q = torch.from_numpy(_unpack_bits(parts["codes"], grid.bits, rows * cols) + low).float().reshape(rows, cols)
    scale = _scale_dtype(grid)
    d = torch.from_numpy(parts["d"].copy()).view(scale).float().reshape(rows, -1)
    m = torch.zeros_like(d) if grid.sym else torch.from_numpy(parts["m"].copy()).view(scale).float().reshape(rows, -1)
    g = cols // d.shape[1]
    d, m = d.repeat_interleave(g, 1), m.repeat_interleave(g, 1)
    values = torch.where(d == 0, m, q * d + m)  # what quantize.round_to_grid computes
    if "mask" in parts:
        keep = torch.from_numpy(np.unpackbits(parts["mask"], count=rows * cols).astype(bool)).reshape(rows, cols)
        values = values.masked_fill(~keep, 0.0)
    return values.to(dtype)


def _size(parts: Parts) -> int:
    return sum(a.nbytes for a in parts.values())


Encoder = Callable[[torch.Tensor, Any], Parts]
Decoder = Callable[[Parts, torch.dtype, list[int], Any], torch.Tensor]
STRATEGIES: dict[str, tuple[Encoder, Decoder]] = {
    "raw": (_enc_raw, _dec_raw),
    "gzip": (_enc_gzip, _dec_gzip),
    "rle": (_enc_rle, _dec_rle),
    "sparse": (_enc_sparse, _dec_sparse),
    "quantized": (_enc_quantized, _dec_quantized),
}
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# --------------------------------------------------------------------------- model


def _found_grid(tensor: torch.Tensor) -> Any:
    """(grid, scales, None) when a float 2-D tensor lies on a GGUF grid already (the
    embedding of a model read from a GGUF file), else None."""
    from birdbone.core.quantize import detect_grid, rtn

    if tensor.dtype != torch.float32 or tensor.ndim != 2 or tensor.shape[1] % 32:
        return None
    grid = detect_grid({"tensor": tensor})
    return None if grid is None else (grid, rtn(tensor, grid)[1], None)


def _quant_info(directory: Path, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Weight name -> (grid, scales, keep) for the weights a quantize stage left on a grid."""
    path = directory / QUANT_FILE
    if not path.is_file():
        return {}
    table = QuantTable.load(path)
    return {
        name: (table.grids[name], table.scales[name], masks.get(name))
        for name in table.scales
        if table.grids.get(name) is not None
    }


def _masks(directory: Path) -> dict[str, torch.Tensor]:
    from birdbone.core.masks import MaskSet

    path = directory / "masks.safetensors"
    if not path.is_file():
        return {}
    masks = MaskSet.load(path)
    return {name: masks[name] for name in masks}


def _files_of(source: Path) -> list[Path]:
    """Every file under the model directory ``source``, sorted, subfolders included
    (``adapter/``: the low-rank corrections). A link or anything that is not a regular file
    is refused by name: packing it would follow it out of the folder, or block."""
    out = []
    for path in sorted(source.rglob("*")):
        if path.is_symlink():
            raise PackError(
                f"{path} is a symbolic link (to {os.readlink(path)}); a pack holds only the folder's own files. "
                "Fix: replace the link with a copy of its file (cp --remove-destination TARGET LINK), or remove it."
            )
        if path.is_dir():
            continue
        if not path.is_file():
            raise PackError(
                f"{path} is not a regular file (a FIFO, socket or device). Fix: remove it from the model folder."
            )
        out.append(path)
    return out


def _check_source(source: Path) -> None:
    if not source.exists():
        raise PackError(f"{source} does not exist. Fix: point at a model directory or a .safetensors file.")
    if source.is_dir():
        return
    if not source.is_file() or source.suffix != ".safetensors":
        raise PackError(
            f"{source} is neither a model directory nor a .safetensors file. "
            "Fix: point at a model directory written by bird-bone (models/quantized) or one of its .safetensors."
        )


def _open_weights(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a file that is not one is a named error."""
    try:
        with safe_open(str(file), "pt") as handle:
            file_meta = handle.metadata() or {}
        return file_meta, load_file(file)
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise PackError(
            f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}). "
            "Fix: rewrite it (the stage that made it), or remove it from the folder."
        ) from exc


def compress_model(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    strategy: str | dict[str, str] = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Packs a model directory (every file in it, subfolders included) or one
    ``.safetensors`` file into ``target``.

    Args:
        strategy: ``auto`` (per tensor, the smallest of the strategies that apply), a
            strategy name for every tensor, or a dict tensor name -> strategy (``auto``
            for the ones it leaves out).

    Returns:
        ``{"tensors": {name: {strategy, bytes, packed_bytes, ratio, encode_ms, decode_ms}},
        "bytes", "packed_bytes", "ratio", "file_bytes", "encode_ms", "decode_ms", "files"}``.

    Raises:
        PackError: ``target`` exists and not ``overwrite``, an unknown strategy,
            ``quantized`` asked of a tensor with no grid, a link or special file in the
            folder, a file that is not a model directory or safetensors.
    """
    source, target = Path(source), Path(target)
    if target.exists() and not overwrite:
        raise PackError(f"{target} exists. Fix: choose another path, or pass overwrite (birdbone pack --overwrite).")
    if target.is_dir():
        raise PackError(f"{target} is a folder; a pack is one file. Fix: name a file, such as {target}.pack.")
    _check_source(source)
    names = [strategy] if isinstance(strategy, str) else list(strategy.values())
    unknown = [s for s in names if s != "auto" and s not in STRATEGIES]
    if unknown:
        raise PackError(f"unknown pack strategy {unknown[0]}. Fix: one of auto, {', '.join(STRATEGIES)}.")
    directory = source if source.is_dir() else source.parent
    everything = _files_of(source) if source.is_dir() else [source]
    files = [p for p in everything if p.suffix == ".safetensors"]
    if not files:
        raise PackError(f"{source} holds no .safetensors file. Fix: point at a model directory written by bird-bone.")
    masks = _masks(directory) if source.is_dir() else {}
    quant = _quant_info(directory, masks) if source.is_dir() else {}

    stored: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT, "files": {}, "blobs": {}}
    stats: dict[str, Any] = {}
    for file in files:
        relative = file.name if not source.is_dir() else file.relative_to(source).as_posix()
        file_meta, tensors = _open_weights(file)
        entries = {}
        for name, tensor in tensors.items():
            wanted = strategy if isinstance(strategy, str) else strategy.get(name, "auto")
            grid = None
            if relative.startswith("model"):  # not masks / quant tables / adapters
                grid = quant.get(name) or (_found_grid(tensor) if wanted in ("auto", "quantized") else None)
            key = f"{relative}/{name}"
            choice, parts, encode_ms, decode_ms, info = _encode(key, tensor, wanted, grid)
            for part, array in parts.items():
                stored[f"{key}::{part}"] = torch.from_numpy(np.ascontiguousarray(array).copy())
            entries[name] = {
                "strategy": choice,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "grid": grid_list(info) if isinstance(info, Grid) else None,
            }
            size = tensor.numel() * tensor.element_size()
            packed = sum(a.nbytes for a in parts.values())
            stats[key] = {
                "strategy": choice,
                "bytes": size,
                "packed_bytes": packed,
                "ratio": size / max(packed, 1),
                "encode_ms": encode_ms,
                "decode_ms": decode_ms,
            }
        meta["files"][relative] = {"metadata": file_meta, "tensors": entries}
    for other in (p for p in everything if p.suffix != ".safetensors"):
        relative = other.relative_to(source).as_posix()
        blob = np.frombuffer(zlib.compress(other.read_bytes(), 9), dtype=np.uint8)
        stored[f"blob/{relative}"] = torch.from_numpy(blob.copy())
        meta["blobs"][relative] = other.stat().st_size
    with atomic_path(target) as tmp:
        # sorted: a file's own metadata comes back from safetensors in a random order
        save_file(stored, str(tmp), metadata={"birdbone_pack": json.dumps(meta, sort_keys=True)})
    total = sum(s["bytes"] for s in stats.values())
    packed = sum(s["packed_bytes"] for s in stats.values())
    return {
        "source": str(source),
        "target": str(target),
        "tensors": stats,
        "bytes": total,
        "packed_bytes": packed,
        "ratio": total / max(packed, 1),
        "file_bytes": target.stat().st_size,
        "encode_ms": sum(s["encode_ms"] for s in stats.values()),
        "decode_ms": sum(s["decode_ms"] for s in stats.values()),
        "strategies": {k: sum(1 for s in stats.values() if s["strategy"] == k) for k in STRATEGIES},
        "files": sorted([*meta["files"], *meta["blobs"]]),
    }


def _encode(name: str, tensor: torch.Tensor, wanted: str, quant: Any) -> tuple[str, Parts, float, float, Any]:
    """(strategy, parts, encode ms, decode ms, decode info) for one tensor: ``wanted``, or
    with ``auto`` the smallest of the strategies that apply. Every choice is decoded and
    compared bit for bit before it is taken."""
    if wanted == "quantized" and quant is None:
        raise PackError(
            f"{name} has no quantization grid, so the quantized strategy cannot store it. "
            "Fix: strategy auto (or sparse / gzip) for it, or pack a directory the quantize stage wrote."
        )
    candidates = [wanted] if wanted != "auto" else ["raw", "sparse", "rle"]
    if wanted == "auto" and quant is not None and tensor.dtype == torch.float32 and tensor.ndim == 2:
        candidates.append("quantized")
    encoded = []
    if wanted == "auto":  # gzip is the slow one: only when a sample says it could win
        best = min(_size(STRATEGIES[c][0](tensor, quant if c == "quantized" else None)) for c in candidates)
        if _gzip_estimate(tensor) < 0.98 * best:
            candidates.append("gzip")
    for choice in candidates:
        start = time.perf_counter()
        parts = STRATEGIES[choice][0](tensor, quant if choice == "quantized" else None)
        encoded.append((sum(a.nbytes for a in parts.values()), choice, parts, 1000 * (time.perf_counter() - start)))
    original = _bytes(tensor)
    for _, choice, parts, encode_ms in sorted(encoded, key=lambda e: e[0]):
        info = quant[0] if choice == "quantized" else None
        start = time.perf_counter()
        back = STRATEGIES[choice][1](parts, tensor.dtype, list(tensor.shape), info)
        decode_ms = 1000 * (time.perf_counter() - start)
        if np.array_equal(_bytes(back), original):
            return choice, parts, encode_ms, decode_ms, info
    raise PackError(f"{name}: the {wanted} encoding did not round-trip bit for bit. Fix: pack it with strategy auto.")
