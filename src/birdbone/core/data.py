"""Text sources -> token blocks, split into disjoint, seeded test / validation /
calibration / healing sets.

Documents are shuffled (seeded), joined with the tokenizer's end-of-text token, tokenized,
and cut into fixed-length blocks. The splits take *contiguous* runs of blocks in that
order, so at most one document straddles each split boundary: held-out blocks do not sit
between training blocks of the same passage.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from birdbone.errors import TextSourceError

log = logging.getLogger(__name__)

SPLIT_ORDER = ("test", "validation", "calibration", "healing")

Reader = Callable[[Any, Path], list[str]]
_READERS: dict[str, Reader] = {}


def register_reader(kind: str) -> Callable[[Reader], Reader]:
    """Registers a reader for a text-source ``kind``."""

    def wrap(fn: Reader) -> Reader:
        _READERS[kind] = fn
        return fn

    return wrap


def _full(path: Path, root: Path) -> Path:
    return path if path.is_absolute() else root / path


# control characters text does not hold (tab, newlines and form feed are allowed)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


TEXT_LIMIT = 4 << 30  # one text file at most; more is more than the splits ever take


def _read_utf8(path: Path) -> str:
    from birdbone.core.io import read_regular

    data = read_regular(path, TEXT_LIMIT, TextSourceError, "text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextSourceError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}). Fix: convert it to UTF-8, "
            "or remove it from data.sources if it is not text."
        ) from None
    check_text(text, str(path))
    return text


def check_text(text: str, where: str) -> None:
    """Refuses binary data that happens to decode as UTF-8 (NUL bytes, or more than 1 % of
    control characters): a model trained or measured on it would learn noise."""
    controls = len(_CONTROL.findall(text))
    if "\x00" in text or controls > 0.01 * max(len(text), 1):
        raise TextSourceError(
            f"{where} looks like binary data, not text ({controls} control characters in {len(text)}"
            f"{', NUL bytes among them' if chr(0) in text else ''}). Fix: point data.sources at text files "
            "(convert documents to plain text first)."
        )


@register_reader("pydoc_topics")
def _read_pydoc(source: Any, root: Path) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@register_reader("txt")
def _read_txt(source: Any, root: Path) -> list[str]:
    path = _full(Path(source.path), root)
    files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
    if not files:
        raise TextSourceError(f"directory {path} holds no *.txt files. Fix: add text files or point at a file.")
    return [_read_utf8(f) for f in files]


@register_reader("jsonl")
def _read_jsonl(source: Any, root: Path) -> list[str]:
    path = _full(Path(source.path), root)
    docs = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextSourceError(
                f"{path}:{number} is not valid JSON ({exc.msg}). Fix: one JSON object per line."
            ) from None
        if not isinstance(record, dict) or source.field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise TextSourceError(
                f"{path}:{number} has no field '{source.field}' (has: {keys}). "
                "Fix: set the source's 'field' to the text key."
            )
        if not isinstance(record[source.field], str):
            raise TextSourceError(f"{path}:{number}: field '{source.field}' is not a string.")
        check_text(record[source.field], f"{path}:{number}")
        docs.append(record[source.field])
    return docs


@register_reader("hf_dataset")
def _read_hf_dataset(source: Any, root: Path) -> list[str]:
    import datasets

    path = _full(Path(source.path), root)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise TextSourceError(
            f"{path} is not a saved datasets directory ({exc}). Fix: write it with save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split is None or source.split not in loaded:
            raise TextSourceError(
                f"{path} holds splits {sorted(loaded)}; set the source's 'split' to one of them (got {source.split!r})."
            )
        loaded = loaded[source.split]
    if source.field not in loaded.column_names:
        raise TextSourceError(f"{path} has no column '{source.field}' (has {loaded.column_names}). Fix: set 'field'.")
    return [str(t) for t in loaded[source.field]]


def read_documents(sources: list[Any], root: str | Path = ".") -> list[str]:
    """Reads every source into a list of documents; an empty source is an error."""
    docs: list[str] = []
    for source in sources:
        if source.kind == "generated":  # token blocks the dense model writes (``mix_generated``), not documents
            continue
        got = [d for d in _READERS[source.kind](source, Path(root)) if d.strip()]
        if not got:
            name = getattr(source, "path", source.kind)
            raise TextSourceError(
                f"text source {name} ({source.kind}) holds no text. Fix: fill it or remove it from data.sources."
            )
        docs.extend(got)
    return docs


def tokenize_documents(docs: list[str], tokenizer: Any, seed: int, shuffle: bool) -> torch.Tensor:
    """Shuffles documents (seeded) and tokenizes them into one stream, separated by the
    end-of-text token where the tokenizer has one."""
    order = list(range(len(docs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer([docs[i] for i in order], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.extend(sep)
    return torch.tensor(stream, dtype=torch.int64)


def split_blocks(stream: torch.Tensor, block_size: int, splits: Any) -> dict[str, torch.Tensor]:
    """Cuts the token stream into blocks and hands contiguous runs to each split.

    Raises:
        TextSourceError: the text gives fewer blocks than the splits ask for.
    """
    available = stream.numel() // block_size
    wanted = splits.fixed()
    if available < wanted or (splits.healing == "rest" and available == 0):
        asked = ", ".join(f"{name} {getattr(splits, name)}" for name in SPLIT_ORDER)
        raise TextSourceError(
            f"the text gives {stream.numel()} tokens = {available} blocks of {block_size}, but the "
            f"splits ask for {wanted} ({asked}). Fix: add text to data.sources, lower "
            "data.block_size, or ask for fewer blocks in data.splits."
        )
    blocks = stream[: available * block_size].view(available, block_size)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name in SPLIT_ORDER:
        count = getattr(splits, name)
        count = available - start if count == "rest" else count
        out[name] = blocks[start : start + count].clone()
        start += count
    return out


def build_blocks(
    config: Any, tokenizer: Any, root: str | Path = ".", docs: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Text sources of a ``DataConfig`` -> token blocks per split, and a report. ``docs``:
    the sources' documents where the caller has read them already (``read_documents``)."""
    docs = read_documents(config.sources, root) if docs is None else docs
    stream = tokenize_documents(docs, tokenizer, config.seed, config.shuffle_documents)
    blocks = split_blocks(stream, config.block_size, config.splits)
    report = {
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "tokens": int(stream.numel()),
        "block_size": config.block_size,
        "blocks": {name: int(t.shape[0]) for name, t in blocks.items()},
        "max_token_id": int(stream.max()) if stream.numel() else -1,
    }
    log.info(
        "text: %d documents, %d tokens -> %s blocks of %d",
        report["documents"],
        report["tokens"],
        report["blocks"],
        config.block_size,
    )
    return blocks, report


def general_text_blocks(
    config: Any, tokenizer: Any, root: str | Path = ".", user_docs: list[str] | None = None
) -> torch.Tensor:
    """The first ``config.general.text_blocks`` blocks of the general text the user names
    (``config.general.sources``), cut like the splits (seeded shuffle, one stream).
    ``user_docs``: the documents of ``config.sources`` where the caller has read them already.

    Raises:
        TextSourceError: the general text shares a document with ``config.sources`` (a stage
            would train on what judges it), or gives not one block.
    """
    general = config.general
    docs = read_documents(general.sources, root)
    shared = set(docs) & set(read_documents(config.sources, root) if user_docs is None else user_docs)
    if shared:
        first = next(iter(shared))
        raise TextSourceError(
            f"data.general.sources shares {len(shared)} document(s) with data.sources (e.g. {first[:60]!r}...): "
            "calibration and healing would train on the text that judges them. Fix: name general text "
            "that is not among data.sources"
        )
    stream = tokenize_documents(docs, tokenizer, config.seed, config.shuffle_documents)
    count = min(general.text_blocks, stream.numel() // config.block_size)
    if count == 0:
        raise TextSourceError(
            f"data.general.sources give {stream.numel()} tokens, less than one block of {config.block_size}. "
            "Fix: name more general text, or lower data.block_size"
        )
    if count < general.text_blocks:
        log.warning(
            "general text: %d blocks of %d, not the %d asked for", count, config.block_size, general.text_blocks
        )
    return stream[: count * config.block_size].view(count, config.block_size).clone()


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The blocks of ``first`` and ``second`` in one run, each kept in its order, spread so
    that every prefix holds ``second``'s share of the whole (rounded down), as evenly as a
    line is drawn on a grid."""
    total = first.shape[0] + second.shape[0]
    share = second.shape[0] / total if total else 0.0
    picks = [int((i + 1) * share) > int(i * share) for i in range(total)]
    out, a, b = [], 0, 0
    for pick in picks:
        out.append(second[b] if pick else first[a])
        b, a = (b + 1, a) if pick else (b, a + 1)
    return torch.stack(out) if out else first[:0]


def mix_generated(
    blocks: dict[str, torch.Tensor], generated: torch.Tensor, ratio: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The calibration and healing splits with ``ratio`` of their blocks from ``generated``
    (text the dense model wrote), interleaved (``interleave``); test and validation stay
    the user's text. Calibration keeps its size and takes the first generated blocks; healing
    takes the rest and as many of the user's healing blocks as the ratio allows (the first
    ones; the others are left out, counted in the report)."""
    out = dict(blocks)
    calibration = blocks["calibration"]
    take = min(round(ratio * calibration.shape[0]), generated.shape[0])
    out["calibration"] = interleave(calibration[: calibration.shape[0] - take], generated[:take])
    rest, healing = generated[take:], blocks["healing"]
    if ratio >= 1.0:
        keep, made = 0, rest.shape[0]
    elif rest.shape[0] / max(rest.shape[0] + healing.shape[0], 1) >= ratio:  # generated to spare
        keep, made = healing.shape[0], min(rest.shape[0], round(healing.shape[0] * ratio / (1 - ratio)))
    else:  # user text to spare
        keep, made = min(healing.shape[0], round(rest.shape[0] * (1 - ratio) / ratio)), rest.shape[0]
    out["healing"] = interleave(healing[:keep], rest[:made])
    report = {
        "ratio": ratio,
        "blocks": int(generated.shape[0]),
        "calibration": int(take),
        "healing": int(made),
        "unused": int(generated.shape[0] - take - made),
        "user_healing_left_out": int(healing.shape[0] - keep),
    }
    log.info(
        "generated text: %d of %d calibration blocks, %d of %d healing blocks (%d of the user's left out)",
        take,
        calibration.shape[0],
        made,
        out["healing"].shape[0],
        report["user_healing_left_out"],
    )
    return out, report
