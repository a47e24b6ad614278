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

The same sampler writes healing and calibration text (``generated_text``: the
``{kind: generated}`` source, another seed): from random first tokens or from prompts through
the model's chat template (``chat_prompts``; left-padded batches), optionally nucleus
(``top_p``) sampling, cached under a key of the model's weights and every setting so the
next run with the same model reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from birdbone.core.io import atomic_path, sha256_json
from birdbone.core.modeling import forward_cached
from birdbone.core.progress import bar
from birdbone.errors import TextSourceError

log = logging.getLogger(__name__)


def first_tokens(tokenizer: Any, vocab: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random token ids of the vocabulary, special tokens left out."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    return allowed[torch.randint(0, allowed.numel(), (count,), generator=generator)]


def chat_prompts(tokenizer: Any, texts: list[str], limit: int) -> list[list[int]]:
    """Each text as a user turn through the tokenizer's chat template, ready for the
    assistant's answer (plain tokens where the tokenizer has no template).

    Raises:
        TextSourceError: a prompt of more than ``limit`` tokens.
    """
    template = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for number, text in enumerate(texts, start=1):
        if template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not 1 <= len(ids) <= limit:
            raise TextSourceError(
                f"prompt {number} ({text[:40]!r}...) is {len(ids)} tokens"
                f"{' with the chat template' if template else ''}; "
                f"a prompt may take at most {limit} (half a block: the model writes the rest). Fix: shorten it, "
                "or raise data.block_size"
            )
        out.append([int(i) for i in ids])
    return out


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with everything outside the smallest set of top tokens that holds ``top_p``
    of the mass set to 0 (the most likely token always stays)."""
    if top_p >= 1.0:
        return probs
    ordered, index = probs.sort(dim=-1, descending=True)
    ordered = torch.where(ordered.cumsum(-1) - ordered < top_p, ordered, torch.zeros_like(ordered))
    return torch.zeros_like(probs).scatter_(-1, index, ordered)


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
    top_p: float = 1.0,
    prompts: list[list[int]] | None = None,
    desc: str = "general text",
) -> torch.Tensor:
    """``count`` sequences of ``length`` token ids the model writes (``[count, length]``
    int64), sampled at ``temperature`` (and nucleus ``top_p``) with a generator seeded by
    ``seed``: each from a random first token, or sequence i from ``prompts[i % len(prompts)]``
    (token ids, e.g. ``chat_prompts``; kept at the start of its row). Prompts of unequal
    length are left-padded and masked, batched by length so little is padded."""
    if count < 1 or length < 2:
        raise ValueError(f"sample_blocks needs count >= 1 and length >= 2, got {count} and {length}")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    if prompts is None:
        starts = [[int(t)] for t in first_tokens(tokenizer, min(vocab, len(tokenizer)), count, generator)]
    else:
        if not prompts or any(not 1 <= len(p) < length for p in prompts):
            raise ValueError(f"sample_blocks needs prompts of 1 to {length - 1} tokens")
        starts = [prompts[i % len(prompts)] for i in range(count)]
    uniform = torch.rand(count, length - 1, generator=generator, dtype=torch.float64)
    order = sorted(range(count), key=lambda i: len(starts[i]))  # like lengths batch together
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    out = torch.empty(count, length, dtype=torch.long)
    model.eval()
    with bar(total=sum(length - len(p) for p in starts), desc=desc, unit="tok", leave=False) as progress:
        for begin in range(0, count, batch_size):
            rows = order[begin : begin + batch_size]
            widths = [len(starts[i]) for i in rows]
            wide = max(widths)
            ids = torch.tensor([[pad] * (wide - len(starts[i])) + starts[i] for i in rows], dtype=torch.long)
            extra: dict[str, torch.Tensor] = {}
            if min(widths) < wide:  # left padding: masked, and positions counted from each row's first token
                mask = (torch.arange(wide)[None] >= torch.tensor([wide - w for w in widths])[:, None]).long()
                extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
            written: list[torch.Tensor] = []
            logits, cache = forward_cached(model, ids.to(device), None, **_to(extra, device))
            for step in range(length - min(widths)):
                probs = torch.softmax(logits[:, -1].float().cpu() / temperature, dim=-1).double()
                cdf = _nucleus(probs, top_p).cumsum(-1)
                draw = uniform[rows, step, None] * cdf[:, -1:]
                token = torch.searchsorted(cdf, draw).clamp(max=probs.shape[-1] - 1)
                written.append(token)
                progress.update(sum(1 for w in widths if step < length - w))
                if step + 1 < length - min(widths):
                    if extra:
                        extra["attention_mask"] = torch.cat([extra["attention_mask"], torch.ones_like(token)], 1)
                        extra["position_ids"] = extra["position_ids"][:, -1:] + 1
                    logits, cache = forward_cached(model, token.to(device), cache, **_to(extra, device))
            sampled = torch.cat(written, dim=1)
            for row, i in enumerate(rows):
                out[i] = torch.cat([torch.tensor(starts[i]), sampled[row, : length - len(starts[i])]])
    return out


def _to(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in tensors.items()}


# --------------------------------------------------------------------------- healing text, cached

CACHE_FORMAT = 1  # bump when sample_blocks writes other tokens for the same settings
CACHE_DIR = Path("data/02_intermediate/generated")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes, bytes): what the text it writes
    depends on besides the settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cached_blocks(path: Path, key: str, count: int, length: int, vocab: int) -> torch.Tensor | None:
    """The blocks cached at ``path`` when they are the ones ``key`` names and well formed
    (``[count, length]`` int64 ids below ``vocab``); else None, and why is logged. A link
    is not followed."""
    if not path.exists() and not path.is_symlink():
        return None
    why = None
    if path.is_symlink() or not path.is_file():
        why = "not a regular file"
    elif path.stat().st_size > count * length * 8 + (1 << 20):
        why = f"{path.stat().st_size} bytes, more than {count} x {length} ids take"
    else:
        try:
            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}).get("key") != key or set(handle.keys()) != {"blocks"}:
                    return None  # written for other settings: a name clash of the short key, never reused
                blocks = handle.get_tensor("blocks")
        except (SafetensorError, OSError, ValueError) as exc:
            why = f"unreadable ({exc})"
        else:
            if blocks.dtype != torch.long or tuple(blocks.shape) != (count, length):
                why = f"{blocks.dtype} {tuple(blocks.shape)}, not int64 ({count}, {length})"
            elif blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= vocab):
                why = f"token ids outside the vocabulary of {vocab}"
            else:
                return blocks
    log.warning("generated text cache %s is broken (%s): writing it anew", path, why)
    return None


def generated_text(
    model: nn.Module,
    tokenizer: Any,
    config: Any,
    length: int,
    digest: str,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = CACHE_DIR,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``{kind: generated}`` source's blocks (``config``: a ``GeneratedText``): written by
    ``model`` (whose weights ``digest`` names), or read from ``cache_dir`` where the same
    model wrote them with the same settings before. Returns them and a report (key, path,
    whether reused, seconds)."""
    prompts = None
    if config.prompts is not None:
        from birdbone.core.data import read_documents

        texts = read_documents([config.prompts], Path.cwd())
        prompts = chat_prompts(tokenizer, texts, length // 2)
    settings = {
        "format": CACHE_FORMAT,
        "model": digest,
        "blocks": config.blocks,
        "length": length,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "prompts": sha256_json(prompts) if prompts is not None else None,
    }
    key = sha256_json(settings)
    vocab = model.get_output_embeddings().weight.shape[0]
    path = cache_dir / f"{key[:16]}.safetensors" if cache_dir is not None else None
    start = time.perf_counter()
    blocks = cached_blocks(path, key, config.blocks, length, vocab) if path is not None else None
    reused = blocks is not None
    if blocks is None:
        blocks = sample_blocks(
            model,
            tokenizer,
            config.blocks,
            length,
            config.seed,
            config.temperature,
            config.batch_size,
            device,
            config.top_p,
            prompts,
            desc="healing text",
        )
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"blocks": blocks}, str(tmp), metadata={"key": key, "settings": json.dumps(settings)})
    seconds = time.perf_counter() - start
    log.info(
        "generated text: %d blocks of %d tokens %s %s (%.0f s)",
        config.blocks,
        length,
        "read from" if reused else "written to",
        path if path is not None else "memory",
        seconds,
    )
    report = {
        "key": key,
        "path": str(path) if path else None,
        "reused": reused,
        "seconds": seconds,
        "prompts": len(prompts or []),
    }
    return blocks, report
