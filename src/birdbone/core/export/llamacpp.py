"""A GGUF file run in llama.cpp (through llama-cpp-python): perplexity from its logits,
greedy generation, decode and prefill speed, and llama.cpp's own quantizer.

Perplexity follows ``core.evaluate.perplexity``: every block of token ids is evaluated
from an empty cache, and tokens 1..L-1 are scored from the ones before, so the two agree
on the same blocks up to the arithmetic of the two runtimes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birdbone.core.io import atomic_path
from birdbone.core.progress import bar
from birdbone.errors import ExportError

log = logging.getLogger(__name__)


def require() -> Any:
    """The ``llama_cpp`` module, or an error that says how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(
            "running a GGUF needs llama-cpp-python, which is not installed. "
            "Fix: pip install llama-cpp-python (the README's set-up command installs it; it compiles for minutes)."
        ) from exc
    return llama_cpp


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp logs to the C stderr; this hides it unless bird-bone logs at DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load(path: str | os.PathLike[str], n_ctx: int, threads: int | None = None, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on the CPU; ``logits_all`` keeps every position's logits."""
    llama_cpp = require()
    kwargs: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    try:
        with _quiet():
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_gpu_layers=0,
                logits_all=logits_all,
                verbose=False,
                **kwargs,
            )
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ExportError(
            f"llama.cpp could not load {path} ({exc}). Fix: rerun with logging at DEBUG to see llama.cpp's reason."
        ) from exc


def perplexity(
    path: str | os.PathLike[str],
    blocks: torch.Tensor,
    threads: int | None = None,
    desc: str = "llama.cpp perplexity",
    teacher: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Token-weighted perplexity of the GGUF at ``path`` over ``blocks`` ``[n, L]``; given
    the dense model's ``evaluate.teacher_topk`` on the same blocks, also the mean KL from it
    and the top-1 agreement with it, as ``evaluate.quality`` computes them in torch."""
    from birdbone.core.evaluate import topk_kl

    n, length = blocks.shape
    llm = load(path, n_ctx=length, threads=threads, logits_all=True)
    total, tokens, kl, agree = 0.0, 0, 0.0, 0
    try:
        for i, row in enumerate(bar(blocks.tolist(), desc=desc, unit="block", leave=False)):
            llm.reset()
            llm.eval(row)
            logits = torch.from_numpy(np.array(llm.scores[: length - 1], dtype=np.float32))
            targets = torch.tensor(row[1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            tokens += length - 1
            if teacher is not None:
                index = teacher["index"][i]
                kl += float(topk_kl(teacher["logprob"][i], index, logits).sum())
                agree += int((logits.argmax(-1) == index[:, 0].long()).sum())
    finally:
        llm.close()
    mean = total / tokens
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": tokens}
    if teacher is not None:
        out.update(kl=kl / tokens, top1=agree / tokens)
    return out


def _last_logits(llm: Any) -> np.ndarray:
    llama_cpp = require()
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def greedy(llm: Any, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` (from an empty cache)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(steps):
        token = int(_last_logits(llm).argmax())
        out.append(token)
        llm.eval([token])
    return out


def generate(path: str | os.PathLike[str], prompt: list[int], steps: int, threads: int | None = None) -> list[int]:
    """Greedy tokens the GGUF at ``path`` generates after ``prompt``."""
    llm = load(path, n_ctx=len(prompt) + steps + 8, threads=threads)
    try:
        return greedy(llm, prompt, steps)
    finally:
        llm.close()


def speed(path: str | os.PathLike[str], tokens: torch.Tensor, config: Any) -> dict[str, Any]:
    """Decode tokens/s (greedy, batch 1, plain decode: logits of the last token only) and
    prefill tokens/s (one evaluation of ``prefill_tokens``), each the median of
    ``repeats`` after ``warmup`` runs, on ``config.threads`` CPU threads."""
    need = max(config.prompt_tokens, config.prefill_tokens)
    ids = tokens.reshape(-1)
    if ids.numel() < need:
        ids = ids.repeat(need // max(ids.numel(), 1) + 1)
    prompt, prefill = ids[: config.prompt_tokens].tolist(), ids[: config.prefill_tokens].tolist()
    n_ctx = max(config.prefill_tokens, config.prompt_tokens + config.decode_tokens) + 8
    llm = load(path, n_ctx=n_ctx, threads=config.threads)
    decode, pre = [], []
    try:
        for i in range(config.warmup + config.repeats):
            llm.reset()
            llm.eval(prompt)
            token = int(_last_logits(llm).argmax())
            start = time.perf_counter()
            for _ in range(config.decode_tokens):
                llm.eval([token])
                token = int(_last_logits(llm).argmax())
            d = time.perf_counter() - start
            llm.reset()
            start = time.perf_counter()
            llm.eval(prefill)
            p = time.perf_counter() - start
            if i >= config.warmup:
                decode.append(d)
                pre.append(p)
    finally:
        llm.close()
    return {
        "runtime": "llama.cpp",
        "threads": config.threads,
        "decode_tokens_per_s": config.decode_tokens / statistics.median(decode),
        "prefill_tokens_per_s": config.prefill_tokens / statistics.median(pre),
        "decode_seconds": decode,
        "prefill_seconds": pre,
    }


# llama.cpp's file types by name (llama_ftype), for its own quantizer
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def quantize(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    ftype: str,
    threads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``, round-to-nearest per its type
    rules) from an F16/F32 GGUF: the baseline bird-bone's packed grids are compared with."""
    llama_cpp = require()
    if ftype not in FTYPES:
        raise ExportError(f"llama.cpp file type {ftype} is not one of {', '.join(FTYPES)}.")
    target = Path(target)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists. Fix: choose another path, or pass overwrite.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads or 0
    with atomic_path(target) as tmp, _quiet():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ExportError(f"llama.cpp could not quantize {source} to {ftype} (status {status}).")
    return target
