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
bytes before and after, ratio, encoding and decoding milliseconds. ``decompress_model``
rebuilds the directory; every tensor round-trips bit-exact (checked on write).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from birdbone.core.io import atomic_dir, atomic_path
from birdbone.core.quantize import QUANT_FILE, Grid, QuantTable, codes, grid_list
from birdbone.errors import PackError

FORMAT = "birdbone-pack/2"  # 2: files in subfolders (adapter/) too
READABLE = ("birdbone-pack/1", FORMAT)
MAX_METADATA = 64 << 20  # bytes of the pack's JSON table: a model's is a few hundred KB
# What a pack may inflate to, at most: this many times its own size, or MIN_LIMIT if that
# is more. A pruned, quantized model packs 2-8x; 64x is a bomb, unless you pass max_bytes.
MAX_RATIO = 64
MIN_LIMIT = 256 << 20
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
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[torch.empty(0, dtype=dtype).element_size()]


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


# --------------------------------------------------------------------------- unpack
# A pack is read as hostile: its names never leave the output folder, every size it
# declares is checked against the parts before anything is allocated from it, and the
# whole of what it inflates to is bounded before the first byte is written.


def safe_relative(name: Any, what: str) -> PurePosixPath:
    """``name`` as a plain relative path (no ``..``, not absolute, no empty part), or PackError."""
    bad = (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise PackError(
            f"the pack names a {what} {name!r} that is not a plain relative path inside the output folder "
            "(an absolute path, '..', or an empty part): a crafted or corrupt pack. "
            "Fix: do not unpack it; pack the model again with birdbone pack."
        )
    return PurePosixPath(name)


def _inside(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative``, checked on the resolved path to stay inside ``root``."""
    path = root / relative
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise PackError(f"the pack's name {relative} leaves the output folder. Fix: do not unpack it.")
    return path


def _malformed(pack: Path, what: str) -> PackError:
    return PackError(
        f"{pack} is a malformed bird-bone pack: {what}. Fix: pack the model again with birdbone pack "
        "(the file is corrupt, truncated, or was not written by bird-bone)."
    )


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _read_table(pack: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The pack's JSON table (its format checked) and its stored parts (uint8, 1-D)."""
    if not pack.exists():
        raise PackError(f"{pack} does not exist. Fix: the path of a file written by birdbone pack.")
    if not pack.is_file():
        raise PackError(f"{pack} is not a regular file. Fix: the path of a file written by birdbone pack.")
    try:
        with safe_open(str(pack), "pt") as handle:
            raw = (handle.metadata() or {}).get("birdbone_pack")
    except Exception as exc:  # SafetensorError, or OSError on a broken file
        raise PackError(
            f"{pack} is not a bird-bone pack (not a safetensors file: {exc}). Fix: pack it with birdbone pack."
        ) from exc
    if raw is None:
        raise PackError(f"{pack} is not a bird-bone pack (no birdbone_pack metadata). Fix: pack it with birdbone pack.")
    if len(raw) > MAX_METADATA:
        raise _malformed(pack, f"its table is {len(raw) / 2**20:.0f} MiB, more than {MAX_METADATA >> 20} MiB")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _malformed(pack, f"its table is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _malformed(pack, "its table is not a JSON object")
    version = meta.get("format")
    if version not in READABLE:
        raise PackError(
            f"{pack} has pack format {version!r}; this bird-bone reads {', '.join(READABLE)}. "
            "Fix: unpack it with the bird-bone that wrote it, or pack the model again with this one."
        )
    if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("blobs", {}), dict):
        raise _malformed(pack, "'files' and 'blobs' must be objects")
    try:
        stored = load_file(pack)
    except Exception as exc:
        raise _malformed(pack, f"its tensors do not read ({exc})") from exc
    for key, value in stored.items():
        if value.dtype != torch.uint8 or value.ndim != 1:
            raise _malformed(pack, f"part {key} is {value.dtype} of {value.ndim} dimensions, not bytes")
    return meta, stored


def _tensor_plan(pack: Path, file: str, name: str, entry: Any) -> tuple[str, torch.dtype, list[int], Grid | None]:
    """(strategy, dtype, shape, grid) of one tensor's entry, each checked."""
    where = f"tensor {name} of {file}"
    if not isinstance(entry, dict) or not {"strategy", "dtype", "shape"} <= entry.keys():
        raise _malformed(pack, f"{where} lacks strategy, dtype or shape")
    strategy, dtype, shape = entry["strategy"], entry["dtype"], entry["shape"]
    if strategy not in STRATEGIES:
        raise _malformed(pack, f"{where} has unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if dtype not in DTYPES:
        raise _malformed(pack, f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _malformed(pack, f"{where} has shape {shape!r}, not a list of sizes")
    if len(shape) > 8:
        raise _malformed(pack, f"{where} has {len(shape)} dimensions")
    grid = None
    if strategy == "quantized":
        raw = entry.get("grid")
        ok = isinstance(raw, list) and 3 <= len(raw) <= 4 and all(isinstance(v, int | bool | None) for v in raw)
        if not ok or raw[0] not in range(2, 9) or not isinstance(raw[2], bool) or len(shape) != 2:
            raise _malformed(pack, f"{where} is quantized with grid {raw!r} and shape {shape}")
        grid = Grid(*raw)
    return strategy, DTYPES[dtype], shape, grid


def _check_parts(strategy: str, parts: Parts, dtype: torch.dtype, shape: list[int], grid: Grid | None) -> str | None:
    """What is wrong with the parts of one tensor (sizes against its declared shape), or None.
    Checked before decoding, so no decoder allocates what a crafted size says."""
    n = math.prod(shape)
    width = _element_size(dtype)
    bitmap = (n + 7) // 8
    expected = {
        "raw": {"data"},
        "gzip": {"data"},
        "rle": {"values", "lengths"},
        "sparse": {"mask", "values"},
        "quantized": {"codes", "d", "m"} | ({"mask"} & parts.keys()),
    }[strategy]
    if set(parts) != expected:
        return f"parts {sorted(parts)}, expected {sorted(expected)}"
    size = {k: v.size for k, v in parts.items()}
    if strategy == "raw" and size["data"] != n * width:
        return f"{size['data']} bytes for {n * width}"
    if strategy == "rle":
        if size["values"] % width or size["lengths"] % 4 or size["values"] // width != size["lengths"] // 4:
            return f"{size['values']} bytes of values against {size['lengths']} bytes of run lengths"
        total = int(parts["lengths"].view(np.uint32).sum(dtype=np.uint64))
        if total != n:
            return f"runs of {total} elements for {n}"
    if strategy == "sparse":
        if size["mask"] != bitmap:
            return f"a bitmask of {size['mask']} bytes for {bitmap}"
        kept = int(np.unpackbits(parts["mask"], count=n).sum(dtype=np.int64))
        if size["values"] != kept * width:
            return f"{size['values']} bytes of values for {kept} set bits"
    if strategy == "quantized":
        assert grid is not None
        rows, cols = shape
        per = 8 // grid.bits if grid.bits in (4, 2) and n % (8 // grid.bits) == 0 else None
        codes_size = n if grid.bits == 8 else n // per if per else (n * grid.bits + 7) // 8
        scale = _element_size(_scale_dtype(grid))
        groups = size["d"] // scale // rows if rows and size["d"] % (scale * rows) == 0 else 0
        if size["codes"] != codes_size:
            return f"{size['codes']} bytes of codes for {codes_size}"
        if rows and (not groups or cols % groups):
            return f"{size['d']} bytes of scales for {rows} x {cols}"
        if size["m"] != (0 if grid.sym else size["d"]) or size.get("mask", bitmap) != bitmap:
            return "offsets or bitmask of the wrong size"
    return None


def _inflate(data: np.ndarray, size: int) -> bytes | None:
    """zlib's output of ``data`` if it is exactly ``size`` bytes (never more is allocated)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data.tobytes(), size + 1)
    except zlib.error:
        return None
    return out if len(out) == size and inflater.eof and not inflater.unconsumed_tail else None


def decompress_model(
    pack: str | os.PathLike[str],
    target: str | os.PathLike[str],
    overwrite: bool = False,
    max_bytes: int | None = None,
) -> Path:
    """Rebuilds the directory ``compress_model`` packed (written whole, atomically).

    The pack is read as hostile: names must be plain relative paths inside ``target``,
    every part's size must match its tensor's declared shape, and the whole must inflate
    to at most ``max_bytes`` (default: ``MAX_RATIO`` times the pack's size, at least
    ``MIN_LIMIT``), all checked before anything is written.

    Raises:
        PackError: a missing, malformed, crafted or too large pack; ``target`` exists and
            not ``overwrite``.
    """
    pack, target = Path(pack), Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise PackError(f"{target} exists. Fix: choose another path, or pass overwrite (birdbone unpack --overwrite).")
    meta, stored = _read_table(pack)
    limit = max_bytes if max_bytes is not None else max(MAX_RATIO * pack.stat().st_size, MIN_LIMIT)
    plans: dict[str, dict[str, tuple[str, torch.dtype, list[int], Grid | None]]] = {}
    names: set[PurePosixPath] = set()
    total = 0
    for file, entry in meta["files"].items():
        names.add(safe_relative(file, "file"))
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise _malformed(pack, f"file {file} lacks its tensors")
        if not isinstance(entry.get("metadata", {}), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in (entry.get("metadata") or {}).items()
        ):
            raise _malformed(pack, f"file {file}'s metadata is not text to text")
        plans[file] = {}
        for name, t in entry["tensors"].items():
            plan = _tensor_plan(pack, file, name, t)
            plans[file][name] = plan
            total += math.prod(plan[2]) * _element_size(plan[1])
    for name, size in meta["blobs"].items():
        names.add(safe_relative(name, "file"))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _malformed(pack, f"file {name} has size {size!r}")
        if f"blob/{name}" not in stored:
            raise _malformed(pack, f"file {name} is missing from its parts")
        total += size
    clashes = sorted(str(n) for n in names if any(n in other.parents for other in names))
    clashes += sorted(set(meta["files"]) & set(meta["blobs"]))
    if clashes:
        raise _malformed(pack, f"{clashes[0]} is named twice (as a file and a folder, or as weights and a file)")
    if total > limit:
        raise PackError(
            f"{pack} would inflate to {total / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB allowed "
            f"({MAX_RATIO}x its size, at least {MIN_LIMIT >> 20} MiB): a pack bomb, or a model far more "
            "compressible than any bird-bone writes. Fix: if you trust the file, raise the limit "
            "(birdbone unpack --max-bytes N)."
        )
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for file, tensors_plan in plans.items():
            tensors = {}
            for name, (strategy, dtype, shape, grid) in tensors_plan.items():
                prefix = f"{file}/{name}::"
                parts = {k[len(prefix) :]: v.numpy() for k, v in stored.items() if k.startswith(prefix)}
                problem = _check_parts(strategy, parts, dtype, shape, grid)
                if strategy == "gzip" and problem is None:
                    inflated = _inflate(parts["data"], math.prod(shape) * _element_size(dtype))
                    if inflated is None:
                        problem = "its gzip data does not inflate to the declared size"
                    parts = {"data": np.frombuffer(inflated or b"", dtype=np.uint8)}
                    strategy = "raw"
                if problem is not None:
                    raise _malformed(pack, f"tensor {name} of {file}: {problem}")
                tensors[name] = STRATEGIES[strategy][1](parts, dtype, shape, grid)
            path = _inside(tmp, safe_relative(file, "file"))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata=meta["files"][file].get("metadata") or None)
        for name, size in meta["blobs"].items():
            data = _inflate(stored[f"blob/{name}"].numpy(), size)
            if data is None:
                raise _malformed(pack, f"file {name} does not inflate to its declared {size} bytes")
            path = _inside(tmp, safe_relative(name, "file"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return target
