"""Streaming decoder blocks from disk, so a model larger than memory can be walked.

``stream_blocks(source, out)`` opens a model directory (safetensors, one file or
sharded) as a skeleton: every decoder block and the LM head stay on the ``meta`` device,
only the embeddings, final norm and rotary tables are real. The calibration walk asks for
one block at a time (``resident``): its tensors are read from disk (the file is opened for
that block and closed after, so no mapping outlives it), the method acts on it, and it is
written back as its own safetensors shard in ``out`` before its memory is dropped. When
the walk is done the remaining tensors are copied, the shard index is written, and ``out``
appears at once (written in a temporary directory, then renamed). The source is never
changed. ``out=None`` walks read-only (profiling).

Resident memory is the skeleton, one block, and the calibration hidden states; the
masks of a pruning walk are bitmaps (one bit a weight).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from birdbone.core import structure
from birdbone.core.io import atomic_dir
from birdbone.core.modeling import ArchitectureAdapter, _check_hf_dir, adapter_for
from birdbone.errors import ModelSourceError, StreamingError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", INDEX, "pytorch_model.bin.index.json")


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(handle: Any) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    size = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Reads ``names`` from a safetensors file into fresh memory with ``readinto``: no
    memory map outlives the call, so nothing but the tensors themselves stays resident
    (a mapped file's touched pages count as resident, and writing to a privately mapped
    tensor copies each page once more)."""
    tensors = {}
    with open(path, "rb", buffering=0) as handle:
        header, start = _header(handle)
        for name in names:
            entry = header[name]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            view = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else None
            if view is not None:
                if view.nbytes != end - begin:
                    raise ModelSourceError(f"{path}: tensor {name} has {end - begin} bytes, expected {view.nbytes}")
                handle.seek(start + begin)
                if handle.readinto(memoryview(view)) != view.nbytes:
                    raise ModelSourceError(f"{path}: file ends inside tensor {name}")
            tensors[name] = tensor
    return tensors


def _release_free_memory() -> None:
    """Hands freed heap memory back to the system (glibc keeps large freed blocks for reuse,
    which shows up as resident memory growing block after block)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the shard index or the single safetensors file."""
    index = path / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(
            f"{path} has no safetensors weights; streaming reads safetensors only. "
            "Fix: load the model once and save it with save_pretrained (safetensors is the default)."
        )
    mapping: dict[str, str] = {}
    for file in files:
        with open(file, "rb") as handle:
            mapping.update(dict.fromkeys(_header(handle)[0], file.name))
    return mapping


@dataclass
class StreamedBundle:
    """A model whose decoder blocks live on disk; used like a ``ModelBundle`` by the walk."""

    model: nn.Module
    tokenizer: Any
    adapter: ArchitectureAdapter
    source: Path
    out: Path | None
    weight_map: dict[str, str]
    dtype: torch.dtype | None = None
    written: dict[str, str] = field(default_factory=dict)  # tensor name -> shard in out
    total_bytes: int = 0
    streamed = True

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            for key, tensor in read_tensors(self.source / file, keys).items():
                tensors[key] = tensor.to(self.dtype) if self.dtype is not None else tensor
        return tensors

    def _block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks_path}.{index}."

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights read from disk; written to ``out`` (if any) and
        dropped back to ``meta`` afterwards, also on error."""
        block = self.adapter.blocks(self.model)[index]
        prefix = self._block_prefix(index)
        names = [n for n in self.weight_map if n.startswith(prefix)]
        state = {n.removeprefix(prefix): t for n, t in self._read(names).items()}
        block.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield block
            if self.out is not None:
                shard = f"model-block-{index:05d}.safetensors"
                tensors = {prefix + n: t.detach().contiguous() for n, t in block.state_dict().items()}
                save_file(tensors, self.out / shard, metadata={"format": "pt"})
                self.total_bytes += _nbytes(tensors)
                self.written.update(dict.fromkeys(tensors, shard))
        finally:
            block.to("meta")
            _release_free_memory()

    def _finish(self) -> None:
        """Copies every tensor no walk wrote (embeddings, norm, head), then the index,
        config and tokenizer files."""
        assert self.out is not None
        rest = [n for n in self.weight_map if n not in self.written]
        missing = [n for n in self.written if n not in self.weight_map]
        if missing:
            raise RuntimeError(f"the walk wrote tensors the source does not have: {missing[:3]}")
        if rest:
            tensors = {n: t.contiguous() for n, t in self._read(rest).items()}
            save_file(tensors, self.out / "model-rest.safetensors", metadata={"format": "pt"})
            self.written.update(dict.fromkeys(tensors, "model-rest.safetensors"))
            self.total_bytes += _nbytes(tensors)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.written.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))
        for item in self.source.iterdir():
            if item.is_file() and not any(item.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(item, self.out / item.name)
        if self.dtype is not None:
            config = json.loads((self.out / "config.json").read_text())
            config["dtype"] = str(self.dtype).removeprefix("torch.")
            (self.out / "config.json").write_text(json.dumps(config, indent=2))


def require_in_memory(bundle: Any, what: str) -> None:
    """Raises before any compute if ``bundle`` streams its blocks and ``what`` needs them all."""
    if getattr(bundle, "streamed", False):
        raise StreamingError(
            f"{what} needs the whole model in memory (a backward pass, or blocks changing size), "
            "but this model streams its blocks from disk. Fix: load the model in memory, or use a "
            "walk-based step (profiling without gradients, magnitude / wanda / sparsegpt pruning)."
        )


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _skeleton(config: Any) -> nn.Module:
    """The model on ``meta``; the parts the walk runs before the first block made real."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, module in model.named_modules():  # rotary tables are computed, not stored
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=config))
    return model


@contextlib.contextmanager
def stream_blocks(
    source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None
) -> Iterator[StreamedBundle]:
    """Opens ``source`` (a model directory) for a block-streaming walk.

    Args:
        out: where the changed model is written (a new directory, replaced atomically when
            the ``with`` block ends without error); ``None`` for a read-only walk.
        dtype: convert tensors to this type as they are read (default: as stored).

    Raises:
        ModelSourceError: no config.json or no safetensors weights, or the blocks have
            per-layer sizes (stream a uniformly sized model).
    """
    from transformers import AutoConfig, AutoTokenizer

    source = Path(source)
    _check_hf_dir(source)
    weight_map = _weight_map(source)
    config = AutoConfig.from_pretrained(source)
    if getattr(config, structure.LAYER_SHAPES, None):
        raise ModelSourceError(
            f"{source} has per-layer block sizes ({structure.LAYER_SHAPES}); streaming supports uniform blocks. "
            "Fix: load it in memory (model.source kind hf_dir)."
        )
    adapter = adapter_for(config)
    model = _skeleton(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    bundle = StreamedBundle(model, tokenizer, adapter, source, None, weight_map, dtype)
    blocks_prefix = adapter.blocks_path + "."
    head = adapter.head_path + "."
    needed = [n for n in weight_map if not n.startswith(blocks_prefix) and not n.startswith(head)]
    model.load_state_dict(bundle._read(needed), strict=False, assign=True)
    model.eval()
    if out is None:
        yield bundle
        return
    with atomic_dir(out) as tmp:
        bundle.out = Path(tmp)
        yield bundle
        bundle._finish()
    bundle.out = Path(out)


__all__ = ["StreamedBundle", "require_in_memory", "stream_blocks"]
