"""The errors bird-bone raises for bad input. Each message names the problem and the fix."""

from __future__ import annotations

import sys
from typing import Any


class BirdboneError(Exception):
    """Base class: a problem with what the user gave bird-bone, not a bug in it."""


class ConfigError(BirdboneError, ValueError):
    """The recipe (conf/<env>/parameters_*.yml, or --params) is invalid."""


class ModelSourceError(BirdboneError):
    """The model could not be found or read."""


class UnsupportedArchitectureError(BirdboneError):
    """The model's architecture is not one bird-bone knows how to walk."""


class TextSourceError(BirdboneError):
    """The text (calibration / healing / evaluation corpus) is missing, empty or too short."""


class TaskFileError(BirdboneError):
    """A task file (multiple-choice or canary jsonl) is malformed."""


class PruneError(BirdboneError):
    """A pruning request that cannot be met (bad pattern for a layer, target not reached)."""


class StreamingError(BirdboneError):
    """A step that needs the whole model in memory was asked of a block-streamed model."""


class HealError(BirdboneError):
    """Healing settings that cannot fit the model (LoRA targets, rank, QLoRA without CUDA)."""


class QuantizeError(BirdboneError):
    """Quantization or low-rank settings a model cannot take (bits, group size, bit budget)."""


class ExportError(BirdboneError):
    """A model that cannot be exported as asked (format, architecture, output path)."""


class PackError(ExportError):
    """A pack that cannot be written or read: a hostile or broken file, a link in the folder."""


class RunLockedError(BirdboneError):
    """Another bird-bone run holds this project's lock."""


class OutputError(BirdboneError):
    """An artifact could not be written (a read-only folder, a full disk)."""


class NonFiniteError(BirdboneError):
    """A model holds NaN or inf weights where finite ones are required."""


def _excepthook(kind: Any, error: BaseException, trace: Any) -> None:
    """A bad-input error is shown as its message (which names the fix), not a traceback,
    also when Kedro wrapped it (a dataset's save fails as a ``DatasetError``)."""
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, BirdboneError):
            sys.stderr.write(f"\nbird-bone stopped: {type(cause).__name__}\n{cause}\n")
            return
        seen.add(id(cause))
        cause = cause.__cause__
    _excepthook.previous(kind, error, trace)


_excepthook.previous = sys.excepthook  # type: ignore[attr-defined]


def install_excepthook() -> None:
    """Puts ``_excepthook`` in front of whatever handles uncaught exceptions now (rich's
    traceback printer, when Kedro fell back to its default logging outside the project
    root), keeping that one for every other error. Idempotent."""
    if sys.excepthook is not _excepthook:
        _excepthook.previous = sys.excepthook  # type: ignore[attr-defined]
        sys.excepthook = _excepthook
