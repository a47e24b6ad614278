"""``decompress_model``: a pack back into its model directory, read as hostile.

A pack may come from anyone: its names never leave the output folder, every size it
declares is checked against the parts before anything is allocated from it, and the whole
of what it inflates to is bounded before the first byte is written. Every problem is one
``PackError`` that names it.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from birdbone.core.export.pack import DTYPES, READABLE, STRATEGIES, Parts, _scale_dtype
from birdbone.core.io import atomic_dir
from birdbone.core.quantize import Grid
from birdbone.errors import PackError

MAX_METADATA = 64 << 20  # bytes of the pack's JSON table: a model's is a few hundred KB
# What a pack may inflate to, at most: this many times its own size, or MIN_LIMIT if that
# is more. A pruned, quantized model packs 2-8x; 64x is a bomb, unless you pass max_bytes.
MAX_RATIO = 64
MIN_LIMIT = 256 << 20


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
    width = dtype.itemsize
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
        scale = _scale_dtype(grid).itemsize
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
    ``MIN_LIMIT``), all checked before anything is written; gzip data is inflated while
    writing, capped at its declared size.

    Raises:
        PackError: a missing, malformed, crafted or too large pack; ``target`` exists and
            not ``overwrite``.
    """
    pack, target = Path(pack), Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise PackError(f"{target} exists. Fix: choose another path, or pass overwrite (birdbone unpack --overwrite).")
    meta, stored = _read_table(pack)
    limit = max_bytes if max_bytes is not None else max(MAX_RATIO * pack.stat().st_size, MIN_LIMIT)
    parts: dict[str, Parts] = {}  # "file/tensor" -> its parts, each as numpy bytes
    for key, value in stored.items():
        if "::" in key:  # the rest are the other files' blobs
            owner, _, part = key.rpartition("::")
            parts.setdefault(owner, {})[part] = value.numpy()
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
            total += math.prod(plan[2]) * plan[1].itemsize
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
    for file, tensors_plan in plans.items():  # within the limit: the parts against their shapes
        for name, (strategy, dtype, shape, grid) in tensors_plan.items():
            problem = _check_parts(strategy, parts.get(f"{file}/{name}", {}), dtype, shape, grid)
            if problem is not None:
                raise _malformed(pack, f"tensor {name} of {file}: {problem}")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for file, tensors_plan in plans.items():
            tensors = {}
            for name, (strategy, dtype, shape, grid) in tensors_plan.items():
                own = parts[f"{file}/{name}"]
                if strategy == "gzip":  # inflated here, one tensor at a time, capped at its size
                    inflated = _inflate(own["data"], math.prod(shape) * dtype.itemsize)
                    if inflated is None:
                        raise _malformed(
                            pack, f"tensor {name} of {file}: its gzip data does not inflate to the declared size"
                        )
                    own, strategy = {"data": np.frombuffer(inflated, dtype=np.uint8)}, "raw"
                tensors[name] = STRATEGIES[strategy][1](own, dtype, shape, grid)
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
