"""A Hugging Face model directory in safetensors: what transformers and vLLM load.

Quantized weights go out dequantized (their values exactly as the quantize stage left
them, in ``dtype``); the packed form that keeps the codes is ``core.export.pack``. Uniform
shapes load in stock transformers; uneven ones (``birdbone_layers`` in the config) load
with ``birdbone.core.modeling.load_model_dir``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from birdbone.core import modeling, structure
from birdbone.core.io import atomic_dir, sha256_file
from birdbone.errors import ExportError


def write_hf(
    bundle: Any, directory: str | os.PathLike[str], dtype: str = "float16", overwrite: bool = False
) -> dict[str, Any]:
    """Writes ``bundle`` as an HF directory (config, ``model.safetensors``, tokenizer),
    atomically, and returns the report: path, bytes, dtype and what loads it."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ExportError(f"{directory} exists. Fix: choose another path, or pass overwrite=True.")
    if dtype not in modeling.DTYPES:
        raise ExportError(f"dtype {dtype} is not one of {', '.join(modeling.DTYPES)}.")
    model = bundle.model
    uniform = not getattr(model.config, structure.LAYER_SHAPES, None)
    out = modeling.ModelBundle(copy.deepcopy(model).to(modeling.DTYPES[dtype]), bundle.tokenizer, bundle.adapter)
    out.model.config.dtype = dtype
    with atomic_dir(directory, overwrite) as tmp:
        modeling.save_model(out, tmp)
    files = sorted(directory.glob("*.safetensors"))
    weights = sum(p.stat().st_size for p in files)
    params = sum(p.numel() for p in model.parameters())
    return {
        "path": str(directory),
        "format": "safetensors",
        "dtype": dtype,
        "bytes": sum(p.stat().st_size for p in directory.iterdir() if p.is_file()),
        "weights_bytes": weights,
        "bits_per_weight": weights * 8 / params,
        "sha256": {p.name: sha256_file(p) for p in files},
        "loads_in": "transformers" if uniform else "birdbone (core.modeling.load_model_dir: per-layer shapes)",
    }


@torch.no_grad()
def check_hf(directory: str | os.PathLike[str], bundle: Any, ids: torch.Tensor, uniform: bool) -> dict[str, Any]:
    """Loads the directory back (stock transformers when ``uniform``) and compares its
    logits on ``ids`` ``[1, L]`` with ``bundle``'s: the largest difference, relative to the
    largest logit."""
    if uniform:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    else:
        loaded = modeling.load_model_dir(directory, torch.float32).model
    ours = bundle.model(ids).logits.float()
    theirs = loaded.eval()(ids).logits.float()
    return {
        "loaded_by": "transformers" if uniform else "birdbone",
        "max_logit_difference": float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-30)),
        "same_top_token": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }
