"""Packs crafted as an attacker would, built here byte by byte: each is refused with a
named PackError before anything is written, nothing lands outside the target, and no
decoder allocates what a crafted size says (peak memory measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from birdbone.core.export.pack import FORMAT, compress_model
from birdbone.core.export.unpack import decompress_model
from birdbone.errors import PackError


def craft(path: Path, meta: object, parts: dict[str, np.ndarray] | None = None, raw_meta: str | None = None) -> Path:
    """A pack file: ``parts`` as uint8 tensors, ``meta`` as its table (or ``raw_meta`` verbatim)."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.uint8)) for k, v in (parts or {}).items()}
    if not tensors:
        tensors = {"pad": torch.zeros(1, dtype=torch.uint8)}
    save_file(tensors, str(path), metadata={"birdbone_pack": raw_meta if raw_meta is not None else json.dumps(meta)})
    return path


def blob(data: bytes) -> np.ndarray:
    return np.frombuffer(zlib.compress(data), dtype=np.uint8)


def tensor_pack(path: Path, entry: dict, parts: dict[str, np.ndarray], file: str = "model.safetensors") -> Path:
    meta = {"format": FORMAT, "files": {file: {"metadata": {}, "tensors": {"w": entry}}}, "blobs": {}}
    return craft(path, meta, {f"{file}/w::{k}": v for k, v in parts.items()})


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def hook_pack(tmp_path: Path, name: str) -> Path:
    script = b"#!/bin/sh\necho pwned > /tmp/birdbone-pwned\n"
    meta = {"format": FORMAT, "files": {}, "blobs": {name: len(script)}}
    return craft(tmp_path / "evil.pack", meta, {f"blob/{name}": blob(script)})


@pytest.mark.parametrize(
    "name",
    [
        "../.git/hooks/post-commit",
        "../../escape.sh",
        "a/../../escape.sh",
        "/tmp/birdbone-absolute.sh",
        "./a",
        "a//b",
        "",
        "a\\..\\b",
        "a\x00b",
    ],
)
def test_names_that_leave_the_target_are_refused_before_anything_is_written(tmp_path, name):
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    pack = hook_pack(tmp_path, name)
    before = listing(tmp_path)
    with pytest.raises(PackError, match="not a plain relative path inside the output folder.*Fix: do not unpack"):
        decompress_model(pack, tmp_path / "out" / "model")
    assert listing(tmp_path) == before  # nothing written, not even the target's parent
    assert not Path("/tmp/birdbone-absolute.sh").exists()


def test_a_weight_file_named_out_of_the_folder_is_refused(tmp_path):
    entry = {"strategy": "raw", "dtype": "uint8", "shape": [4], "grid": None}
    pack = tensor_pack(tmp_path / "evil.pack", entry, {"data": np.arange(4)}, file="../evil.safetensors")
    with pytest.raises(PackError, match="not a plain relative path"):
        decompress_model(pack, tmp_path / "out")
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "out").exists()


def test_a_name_through_a_link_in_the_target_is_not_followed(tmp_path):
    # the target already holds a link pointing out; with --overwrite it is replaced, never written through
    (tmp_path / "outside").mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "out" / "adapter")
    script = b"data"
    meta = {"format": FORMAT, "files": {}, "blobs": {"adapter/x": len(script)}}
    pack = craft(tmp_path / "p.pack", meta, {"blob/adapter/x": blob(script)})
    decompress_model(pack, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "adapter" / "x").read_bytes() == script
    assert not (tmp_path / "out" / "adapter").is_symlink() and list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize(
    ("meta", "raw", "message"),
    [
        (None, "{not json", "its table is not JSON"),
        ([1, 2], None, "its table is not a JSON object"),
        ({"format": "birdbone-pack/99", "files": {}, "blobs": {}}, None, r"format 'birdbone-pack/99'.*reads"),
        ({"files": {}, "blobs": {}}, None, "format None"),
        ({"format": FORMAT, "files": [], "blobs": {}}, None, "'files' and 'blobs' must be objects"),
        ({"format": FORMAT, "files": {"m.safetensors": {"metadata": {}}}, "blobs": {}}, None, "lacks its tensors"),
        ({"format": FORMAT, "files": {}, "blobs": {"config.json": "12"}}, None, "has size '12'"),
        ({"format": FORMAT, "files": {}, "blobs": {"config.json": 12}}, None, "missing from its parts"),
        (
            {"format": FORMAT, "files": {"m.safetensors": {"metadata": {"a": 1}, "tensors": {}}}, "blobs": {}},
            None,
            "metadata is not text to text",
        ),
    ],
)
def test_malformed_tables_are_one_named_error(tmp_path, meta, raw, message):
    pack = craft(tmp_path / "bad.pack", meta, raw_meta=raw)
    with pytest.raises(PackError, match=message):
        decompress_model(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entry", "parts", "message"),
    [
        ({"strategy": "lzma", "dtype": "float32", "shape": [2]}, {}, "unknown strategy 'lzma'"),
        ({"strategy": "raw", "dtype": "float128", "shape": [2]}, {}, "unknown dtype 'float128'"),
        ({"strategy": "raw", "dtype": "float32"}, {}, "lacks strategy, dtype or shape"),
        ({"strategy": "raw", "dtype": "float32", "shape": "2x2"}, {}, "not a list of sizes"),
        ({"strategy": "raw", "dtype": "float32", "shape": [-1, 2]}, {}, "not a list of sizes"),
        ({"strategy": "raw", "dtype": "float32", "shape": [3]}, {"data": np.zeros(8)}, "8 bytes for 12"),
        ({"strategy": "raw", "dtype": "float32", "shape": [2]}, {"values": np.zeros(8)}, "parts"),
        (
            {"strategy": "quantized", "dtype": "float32", "shape": [2, 32], "grid": ["x", 32, True]},
            {},
            "quantized with grid",
        ),
    ],
)
def test_malformed_tensor_entries_are_one_named_error(tmp_path, entry, parts, message):
    pack = tensor_pack(tmp_path / "bad.pack", entry, parts)
    with pytest.raises(PackError, match=message):
        decompress_model(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rle_giant(tmp_path: Path) -> Path:
    # one run of 2**32 zeros: 16 GiB of float32 declared in 8 bytes of parts
    lengths = np.array([2**32 - 1], dtype=np.uint32).view(np.uint8)
    entry = {"strategy": "rle", "dtype": "float32", "shape": [2**32 - 1], "grid": None}
    return tensor_pack(tmp_path / "rle.pack", entry, {"values": np.zeros(4), "lengths": lengths})


def _sparse_giant(tmp_path: Path) -> Path:
    entry = {"strategy": "sparse", "dtype": "float32", "shape": [2**34], "grid": None}
    return tensor_pack(tmp_path / "sparse.pack", entry, {"mask": np.zeros(16), "values": np.zeros(0)})


def _lying_rle(tmp_path: Path) -> Path:
    # a small declared shape whose run lengths say 2**32: decoding them would allocate 16 GiB
    lengths = np.array([2**32 - 1, 1], dtype=np.uint32).view(np.uint8)
    entry = {"strategy": "rle", "dtype": "float32", "shape": [16], "grid": None}
    return tensor_pack(tmp_path / "lie.pack", entry, {"values": np.zeros(8), "lengths": lengths})


def _gzip_bomb(tmp_path: Path) -> Path:
    # 512 MB of zeros in ~500 KB, declared as a small tensor
    data = np.frombuffer(zlib.compress(bytes(512 << 20), 9), dtype=np.uint8)
    entry = {"strategy": "gzip", "dtype": "uint8", "shape": [1024], "grid": None}
    return tensor_pack(tmp_path / "gzip.pack", entry, {"data": data})


def _blob_bomb(tmp_path: Path) -> Path:
    meta = {"format": FORMAT, "files": {}, "blobs": {"config.json": 16}}
    return craft(tmp_path / "blob.pack", meta, {"blob/config.json": blob(bytes(512 << 20))})


def _honest_bomb(tmp_path: Path) -> Path:
    # declares and holds 300 MiB of zeros: consistent, but 1000x its size
    data = np.frombuffer(zlib.compress(bytes(300 << 20), 9), dtype=np.uint8)
    entry = {"strategy": "gzip", "dtype": "uint8", "shape": [300 << 20], "grid": None}
    return tensor_pack(tmp_path / "honest.pack", entry, {"data": data})


BOMBS = {
    "rle-2^32": (_rle_giant, "would inflate to 16384 MiB.*--max-bytes"),
    "sparse-2^34": (_sparse_giant, "would inflate to 65536 MiB"),
    "rle-lying-lengths": (_lying_rle, "runs of 4294967296 elements for 16"),
    "gzip-bomb": (_gzip_bomb, "does not inflate to the declared size"),
    "blob-bomb": (_blob_bomb, "does not inflate to its declared 16 bytes"),
    "honest-bomb": (_honest_bomb, "would inflate to 300 MiB, more than the 256 MiB allowed"),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_bombs_are_refused_with_bounded_memory(tmp_path, kind):
    make, message = BOMBS[kind]
    pack = make(tmp_path)
    with pytest.raises(PackError, match=message):
        decompress_model(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the same in a fresh process, its peak memory measured: no decoder allocated the bomb
    code = (
        "import re\n"
        "from birdbone.core.export.unpack import decompress_model\n"
        "from birdbone.errors import PackError\n"
        "try:\n"
        f"    decompress_model({str(pack)!r}, {str(tmp_path / 'out2')!r})\n"
        "except PackError:\n"
        "    pass\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking pytest's peak across exec
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    peak_mb = int(done.stdout.split()[-1]) / 1024
    assert peak_mb < 900, f"peak RSS {peak_mb:.0f} MB"  # torch's import alone is ~400 MB; a bomb is 512+


def test_a_trusted_big_pack_unpacks_with_a_raised_limit(tmp_path):
    pack = _honest_bomb(tmp_path)
    decompress_model(pack, tmp_path / "out", max_bytes=400 << 20)
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 300 << 20


def test_missing_and_non_pack_files_are_named(tmp_path):
    with pytest.raises(PackError, match="does not exist. Fix"):
        decompress_model(tmp_path / "nope.pack", tmp_path / "out")
    (tmp_path / "text.pack").write_text("hello, I am text\n")
    with pytest.raises(PackError, match="not a bird-bone pack \\(not a safetensors file"):
        decompress_model(tmp_path / "text.pack", tmp_path / "out")
    with pytest.raises(PackError, match="is not a regular file"):
        decompress_model(tmp_path, tmp_path / "out")


def test_a_link_in_the_model_folder_is_refused_not_followed(tmp_path, tiny_bundle):
    from birdbone.datasets import ModelDataset

    ModelDataset(str(tmp_path / "model")).save(tiny_bundle)
    (tmp_path / "secret.txt").write_text("the user's ssh key")
    os.symlink(tmp_path / "secret.txt", tmp_path / "model" / "notes.txt")
    with pytest.raises(PackError, match=r"notes.txt is a symbolic link \(to .*secret.txt\).*Fix: replace the link"):
        compress_model(tmp_path / "model", tmp_path / "m.pack")
    assert not (tmp_path / "m.pack").exists()
    (tmp_path / "model" / "notes.txt").unlink()
    os.mkfifo(tmp_path / "model" / "fifo")
    with pytest.raises(PackError, match="not a regular file"):
        compress_model(tmp_path / "model", tmp_path / "m.pack")


def test_pack_of_a_text_file_or_to_a_folder_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(PackError, match="neither a model directory nor a .safetensors file"):
        compress_model(tmp_path / "notes.txt", tmp_path / "m.pack")
    (tmp_path / "fake.safetensors").write_text("text")
    with pytest.raises(PackError, match="not a readable safetensors file"):
        compress_model(tmp_path / "fake.safetensors", tmp_path / "m.pack")


def test_a_name_used_twice_is_refused(tmp_path):
    meta = {"format": FORMAT, "files": {}, "blobs": {"a": 1, "a/b": 1}}
    pack = craft(tmp_path / "twice.pack", meta, {"blob/a": blob(b"x"), "blob/a/b": blob(b"y")})
    with pytest.raises(PackError, match="a is named twice"):
        decompress_model(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()
