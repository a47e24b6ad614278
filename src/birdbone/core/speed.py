"""Decode and prefill speed on the current device, timed (median of repeats after warm-up)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from birdbone.core.modeling import forward_cached
from birdbone.core.progress import bar


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    """Greedy decode with the KV cache: the prompt's prefill is not timed, each of the
    ``steps`` single-token forward passes is."""
    logits, cache = forward_cached(model, prompt)
    token = logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = forward_cached(model, token, cache)
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _prefill_seconds(model: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    model(ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def measure_speed(model: nn.Module, tokens: torch.Tensor, config: Any, device: torch.device) -> dict[str, Any]:
    """Decode tokens/s (batch 1, KV cache) and prefill tokens/s (one forward of
    ``prefill_tokens``), each the median over ``repeats`` after ``warmup`` runs.

    Args:
        tokens: a 1-D tensor of real token ids to take the prompt and prefill input from.
        config: a ``SpeedConfig``.
    """
    need = max(config.prompt_tokens, config.prefill_tokens)
    if tokens.numel() < need:
        tokens = tokens.repeat(need // max(tokens.numel(), 1) + 1)
    prompt = tokens[: config.prompt_tokens].view(1, -1).to(device)
    prefill = tokens[: config.prefill_tokens].view(1, -1).to(device)
    decode, pre = [], []
    runs = config.warmup + config.repeats
    for i in bar(range(runs), desc="speed", unit="run", leave=False):
        d = _decode_seconds(model, prompt, config.decode_tokens, device)
        p = _prefill_seconds(model, prefill, device)
        if i >= config.warmup:
            decode.append(d)
            pre.append(p)
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "decode_tokens_per_s": config.decode_tokens / statistics.median(decode),
        "prefill_tokens_per_s": config.prefill_tokens / statistics.median(pre),
        "decode_seconds": decode,
        "prefill_seconds": pre,
    }
