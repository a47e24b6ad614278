"""Quality and size of a model: token-weighted perplexity, parameter count, per-layer
density, bytes on disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from birdbone.core.progress import bar


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
    return quality(model, blocks, None, batch_size, device, desc)


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"perplexity needs a [blocks, length>=2] tensor, got shape {tuple(blocks.shape)}")


def _batches(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: Any, desc: str) -> Any:
    """(start, ids, float32 next-token logits) per batch."""
    for start in bar(range(0, blocks.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        ids = blocks[start : start + batch_size].to(device)
        yield start, ids, model(ids, use_cache=False).logits[:, :-1].float()


@torch.no_grad()
def teacher_topk(
    model: nn.Module,
    blocks: torch.Tensor,
    k: int = 32,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    with_nll: bool = False,
) -> dict[str, torch.Tensor]:
    """The (dense) teacher's top-k next-token log-probabilities and token ids for every
    scored position of ``blocks``: ``index`` int32 and ``logprob`` float32, ``[n, L-1, k]``;
    with ``with_nll`` also ``nll``, its own mean negative log-likelihood of the blocks (a
    float64 scalar: its perplexity, from the same pass)."""
    _check_blocks(blocks)
    index, logprob, total = [], [], 0.0
    for _, ids, logits in _batches(model, blocks, batch_size, device, "teacher logits"):
        full = torch.log_softmax(logits, dim=-1)
        top = full.topk(k, dim=-1)
        index.append(top.indices.to(torch.int32).cpu())
        logprob.append(top.values.cpu())
        if with_nll:
            total -= float(full.gather(-1, ids[:, 1:, None]).sum())
    out = {"index": torch.cat(index), "logprob": torch.cat(logprob)}
    if with_nll:
        out["nll"] = torch.tensor(total / (blocks.shape[0] * (blocks.shape[1] - 1)), dtype=torch.float64)
    return out


def topk_kl(teacher_logprob: torch.Tensor, teacher_index: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per position KL(teacher || student) over the teacher's top-k tokens plus one bin for
    the rest of the vocabulary: exact for the coarsened distributions, and a lower bound of
    the full KL (coarsening never increases a KL divergence)."""
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_index.long())
    p = teacher_logprob.exp()
    rest_t = (1.0 - p.sum(-1)).clamp(min=1e-12)
    rest_s = (1.0 - student.exp().sum(-1)).clamp(min=1e-12)
    return (p * (teacher_logprob - student)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per position KL(teacher || student) over the whole vocabulary."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


@torch.no_grad()
def quality(
    model: nn.Module,
    blocks: torch.Tensor,
    teacher: dict[str, torch.Tensor] | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    desc: str = "quality",
    with_top1: bool = False,
) -> dict[str, float]:
    """Perplexity and, given the teacher's ``teacher_topk`` on the same blocks, the mean
    per-token KL from the teacher (over its top-k plus the rest: a lower bound of the full
    KL) and ``top1``, the share of positions where the model's most likely next token is
    the teacher's, in one pass."""
    _check_blocks(blocks)
    if teacher is not None and tuple(teacher["index"].shape[:2]) != (blocks.shape[0], blocks.shape[1] - 1):
        raise ValueError(
            f"teacher logits cover {tuple(teacher['index'].shape[:2])} positions, the blocks "
            f"{(blocks.shape[0], blocks.shape[1] - 1)}: they were cached for other text. Fix: rerun the baseline"
        )
    total_nll, total_kl, total_tokens, agree = 0.0, 0.0, 0, 0
    for start, ids, logits in _batches(model, blocks, batch_size, device, desc):
        targets = ids[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
        if teacher is not None:
            end = start + ids.shape[0]
            logprob, index = (teacher[key][start:end].to(logits.device) for key in ("logprob", "index"))
            total_kl += float(topk_kl(logprob, index, logits).sum())
            if with_top1:
                agree += int((logits.argmax(-1) == index[..., 0].long()).sum())
    mean = total_nll / total_tokens
    # a broken model's loss can pass exp's range, or be NaN: the gate reads inf / nan as non-finite
    result = {"ppl": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": total_tokens}
    if teacher is not None:
        result["kl"] = total_kl / total_tokens
        if with_top1:
            result["top1"] = agree / total_tokens
    return result


def general_quality(
    model: nn.Module,
    general: dict[str, torch.Tensor] | None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    desc: str = "general",
) -> dict[str, float] | None:
    """Perplexity, KL to dense and top-1 agreement with dense on the general split (the
    ``blocks`` the dense model wrote, with its cached top-k ``index`` and ``logprob``), or
    None when there is no general split."""
    if not general:
        return None
    measured = quality(model, general["blocks"], general, batch_size, device, desc, with_top1=True)
    return {key: measured[key] for key in ("ppl", "kl", "top1")}


def general_figures(general: dict[str, float] | None) -> dict[str, float]:
    """General-split numbers as flat keys: ``ppl_general``, ``kl_general``, ``top1_general``
    (none without a general split)."""
    return {f"{key}_general": value for key, value in (general or {}).items()}


def stage_quality(
    model: nn.Module,
    blocks: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor] | None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    desc: str = "quality",
) -> dict[str, float]:
    """What every stage reports of a model: ``ppl_val`` and ``ppl_test`` (in-domain), and
    ``ppl_general``, ``kl_general``, ``top1_general`` on the general split."""
    out = {
        f"ppl_{short}": perplexity(model, blocks[split], batch_size, device, f"{desc} ({split})")["ppl"]
        for split, short in (("validation", "val"), ("test", "test"))
    }
    return {**out, **general_figures(general_quality(model, general, batch_size, device, f"{desc} (general)"))}


def quality_key(blocks: dict[str, torch.Tensor], general: dict[str, torch.Tensor] | None) -> str:
    """What ``stage_quality`` figures were measured on: a hash of the validation, test and
    general blocks (figures a model carries in its ``origin`` count only under this key)."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in (blocks["validation"], blocks["test"], *((general["blocks"],) if general else ())):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def baseline_figures(quality: dict[str, Any]) -> dict[str, float]:
    """The ``stage_quality`` figures of the baseline's quality report (``baseline_quality``:
    ``validation``, ``test`` and ``general`` measured on the dense model)."""
    figures = {"ppl_val": quality["validation"]["ppl"], "ppl_test": quality["test"]["ppl"]}
    if "general" in quality:
        figures.update(general_figures({k: quality["general"][k] for k in ("ppl", "kl", "top1")}))
    return figures


def carried_quality(bundle: Any, key: str) -> dict[str, float] | None:
    """The ``stage_quality`` figures the stage that wrote ``bundle`` measured on it (its
    ``origin['quality']``), if measured on the same text; None otherwise."""
    carried = (bundle.origin or {}).get("quality") or {}
    return carried.get("figures") if carried.get("key") == key else None


def general_change(before: dict[str, float], after: dict[str, float]) -> str:
    """``, general perplexity a -> b`` for a log line (empty without a general split)."""
    if "ppl_general" not in after:
        return ""
    return f", general perplexity {before['ppl_general']:.3f} -> {after['ppl_general']:.3f}"


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
