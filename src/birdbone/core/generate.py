"""Text the dense model writes itself: a general-quality check that no stage trains on.

A model healed on the user's text can beat dense on that text and be far worse on any
other. ``sample_blocks`` has the dense model write ``count`` sequences of ``length`` tokens
(data-free: no corpus needed, and no stage ever trains on them): each starts from a random
token of the vocabulary (special tokens left out) and continues by sampling at
``temperature``. Every position's random number is drawn up front from one seeded
generator and turned into a token by the inverse of the float32 CDF on the CPU, so the
tokens depend on the seed and the logits only: not on the batch size, nor on the device's
random number generator. The blocks then measure what the model lost in general: their
perplexity, and the KL to and top-1 agreement with the dense model's own predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from birdbone.core.modeling import forward_cached


def first_tokens(tokenizer: Any, vocab: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random token ids of the vocabulary, special tokens left out."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    return allowed[torch.randint(0, allowed.numel(), (count,), generator=generator)]


@torch.no_grad()
def sample_blocks(
    model: nn.Module,
    tokenizer: Any,
    count: int,
    length: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``count`` sequences of ``length`` token ids the model writes from random first tokens
    (``[count, length]`` int64), sampled at ``temperature`` with a generator seeded by ``seed``."""
    if count < 1 or length < 2:
        raise ValueError(f"sample_blocks needs count >= 1 and length >= 2, got {count} and {length}")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    starts = first_tokens(tokenizer, min(vocab, len(tokenizer)), count, generator)
    uniform = torch.rand(count, length - 1, generator=generator, dtype=torch.float64)
    out = torch.empty(count, length, dtype=torch.long)
    model.eval()
    with tqdm(total=count * (length - 1), desc="general text", unit="tok", leave=False) as bar:
        for begin in range(0, count, batch_size):
            ids = starts[begin : begin + batch_size, None]
            rows = [ids]
            logits, cache = forward_cached(model, ids.to(device))
            for step in range(length - 1):
                probs = torch.softmax(logits[:, -1].float().cpu() / temperature, dim=-1).double()
                cdf = probs.cumsum(-1)
                draw = uniform[begin : begin + probs.shape[0], step, None] * cdf[:, -1:]
                ids = torch.searchsorted(cdf, draw).clamp(max=probs.shape[-1] - 1)
                rows.append(ids)
                bar.update(ids.shape[0])
                if len(rows) < length:
                    logits, cache = forward_cached(model, ids.to(device), cache)
            out[begin : begin + ids.shape[0]] = torch.cat(rows, dim=1)
    return out
