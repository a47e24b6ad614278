"""Task files a user brings, because perplexity misses knowledge loss.

- multiple-choice jsonl, one ``{"question", "choices", "answer"}`` a line (``answer`` is the
  index of the right choice): each choice is scored by the log-likelihood of ``" " + choice``
  after the question, as lm-eval-harness scores ARC/MMLU. ``accuracy`` picks the highest
  sum of log-probabilities, ``accuracy_norm`` the highest per byte of the choice.
- canary jsonl, one ``{"prompt", "expected"}`` a line: greedy decoding must reproduce the
  expected text (``exact_match``), and the expected text's log-likelihood is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from birdbone.core.modeling import forward_cached
from birdbone.core.progress import bar
from birdbone.errors import TaskFileError

TASK_LIMIT = 256 << 20


def read_task_file(path: str | Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Reads a jsonl task file; every line must be an object with the ``required`` keys."""
    from birdbone.core.io import read_regular

    path = Path(path)
    items = []
    try:
        text = read_regular(path, TASK_LIMIT, TaskFileError, "task file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path} is not UTF-8 text ({exc.reason}). Fix: save it as UTF-8 jsonl.") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFileError(
                f"{path}:{number} is not valid JSON ({exc.msg}). Fix: one JSON object per line."
            ) from None
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            raise TaskFileError(
                f"{path}:{number} lacks {missing}; each line needs {list(required)}. Fix: add them to that line."
            )
        items.append(item)
    if not items:
        raise TaskFileError(f"{path} holds no items. Fix: add lines or remove it from baseline.tasks.")
    return items


def _text_field(item: dict[str, Any], key: str, where: str) -> None:
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(
            f"{where}: '{key}' must be non-empty text, got {value!r}. Fix: write the {key} as a JSON string."
        )


def _check_choice(item: dict[str, Any], where: str) -> None:
    _text_field(item, "question", where)
    choices, answer = item["choices"], item["answer"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFileError(f"{where}: 'choices' must be a list of at least two strings. Fix: list the options.")
    # a bool is an int to Python: ``true`` would score as index 1
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise TaskFileError(
            f"{where}: 'answer' must be the index (0..{len(choices) - 1}) of the right choice, got {answer!r}. "
            "Fix: give the right choice's position, counting from 0."
        )


@torch.no_grad()
def continuation_logprob(
    model: nn.Module, tokenizer: Any, context: str, continuation: str, device: torch.device
) -> tuple[float, int]:
    """Sum of log-probabilities of ``continuation``'s tokens after ``context``, and their count.

    As lm-eval-harness does, the pair is tokenized whole and the continuation is what
    follows the context's tokens, so a merge across the boundary is scored fairly.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(ctx)
    while n_ctx > 0 and whole[:n_ctx] != ctx[:n_ctx]:
        n_ctx -= 1
    n_ctx = max(n_ctx, 1)
    ids = torch.tensor([whole], device=device)
    logprobs = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    cont = picked[n_ctx - 1 :]
    return float(cont.sum()), int(cont.numel())


def score_multiple_choice(
    model: nn.Module, tokenizer: Any, items: list[dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """Accuracy (sum log-likelihood) and length-normalized accuracy over the items."""
    correct = correct_norm = 0
    for i, item in enumerate(bar(items, desc="multiple choice", leave=False)):
        _check_choice(item, f"item {i + 1}")
        scores = [continuation_logprob(model, tokenizer, item["question"], " " + c, device)[0] for c in item["choices"]]
        norm = [s / len((" " + c).encode("utf-8")) for s, c in zip(scores, item["choices"], strict=True)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["answer"])
    return {"n": len(items), "accuracy": correct / len(items), "accuracy_norm": correct_norm / len(items)}


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, device: torch.device
) -> str:
    """Greedy decoding of ``max_new_tokens`` after ``prompt``, as text."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    logits, cache = forward_cached(model, ids)
    token, new = logits[:, -1:].argmax(-1), []
    for _ in range(max_new_tokens):
        new.append(int(token))
        logits, cache = forward_cached(model, token, cache)
        token = logits[:, -1:].argmax(-1)
    return tokenizer.decode(new, skip_special_tokens=True)


def score_canaries(
    model: nn.Module, tokenizer: Any, items: list[dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """Exact-match rate of greedy decoding, and mean log-likelihood per expected token."""
    hits, logprob, tokens = 0, 0.0, 0
    for item in bar(items, desc="canaries", leave=False):
        expected = item["expected"]
        n_new = len(tokenizer(expected, add_special_tokens=False)["input_ids"]) + 2
        got = greedy_continuation(model, tokenizer, item["prompt"], n_new, device)
        hits += int(got.strip().startswith(expected.strip()))
        lp, n = continuation_logprob(model, tokenizer, item["prompt"], expected, device)
        logprob += lp
        tokens += n
    return {"n": len(items), "exact_match": hits / len(items), "mean_token_logprob": logprob / max(tokens, 1)}


TASK_KINDS: dict[str, tuple[tuple[str, ...], Callable[..., dict[str, Any]]]] = {
    "multiple_choice": (("question", "choices", "answer"), score_multiple_choice),
    "canary": (("prompt", "expected"), score_canaries),
}


def check_task_file(kind: str, path: str | Path) -> list[dict[str, Any]]:
    """Reads a task file of ``kind`` and checks every item (before any model is loaded)."""
    required = TASK_KINDS[kind][0]
    items = read_task_file(path, required)
    for i, item in enumerate(items):
        if kind == "multiple_choice":
            _check_choice(item, f"{path} item {i + 1}")
        else:
            _text_field(item, "prompt", f"{path} item {i + 1}")
            _text_field(item, "expected", f"{path} item {i + 1}")
    return items


def score_task_file(
    model: nn.Module, tokenizer: Any, kind: str, path: str | Path, device: torch.device
) -> dict[str, Any]:
    """Reads and scores one task file of the given kind."""
    scorer = TASK_KINDS[kind][1]
    items = check_task_file(kind, path)
    return {"kind": kind, "path": str(path), **scorer(model, tokenizer, items, device)}
