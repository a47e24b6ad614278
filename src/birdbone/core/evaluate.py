"""Quality and size of a model: token-weighted perplexity, parameter count, per-layer
density, bytes on disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    desc: str = "perplexity",
) -> dict[str, float]:
    """Token-weighted perplexity over blocks of token ids, ``exp(sum NLL / tokens)``.

    Every block predicts its tokens 1..L-1 from the ones before (the first token of a block
    has no context and is not scored), which is what ``model(ids, labels=ids).loss`` of
    transformers averages; over blocks of equal length the two agree exactly.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"perplexity needs a [blocks, length>=2] tensor, got shape {tuple(blocks.shape)}")
    total_nll = 0.0
    total_tokens = 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def layer_density(named_linears: dict[str, nn.Linear]) -> dict[str, float]:
    """Share of nonzero weights in each Linear (1.0 for a dense model)."""
    return {name: float((m.weight != 0).float().mean()) for name, m in named_linears.items()}


def bytes_on_disk(directory: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.gguf``) in a directory."""
    directory = Path(directory)
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})


def size_report(bundle: Any) -> dict[str, Any]:
    """Parameter count, bytes of weights on disk, and per-layer density of a bundle."""
    density = layer_density(bundle.adapter.linears(bundle.model))
    return {
        "params": parameter_count(bundle.model),
        "bytes": bytes_on_disk(bundle.path) if bundle.path is not None else None,
        "density_mean": sum(density.values()) / max(len(density), 1),
        "density": density,
    }
