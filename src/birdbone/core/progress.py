"""Progress bars that read well both on a terminal and in a log file.

On a terminal, a bar is tqdm's own. When stderr is not a terminal (``kedro run > run.log
2>&1``, a CI job, ``dvc repro`` in a pipe), tqdm's carriage-return frames would fill the
file with half-lines between the log lines; there a bar becomes a plain log line at most
once a minute, and only for work that takes longer than that:

    12:04:31 INFO heal wave 2: 120/400 step [01:02<02:25, 1.93 step/s]
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("birdbone.progress")

QUIET_SECONDS = 60.0  # in a file: a line at most this often, none for shorter work


class _LogLines:
    """A file-like target for tqdm that turns each frame into one log line."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            log.info(line)

    def flush(self) -> None:
        pass


def interactive() -> bool:
    """Whether bars redraw in place: stderr is a terminal, or this is a notebook (where
    ``tqdm.auto`` draws widgets)."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; elsewhere a log line a minute, with the
    bar's description, count, elapsed and remaining time."""
    if not interactive() and not kwargs.get("disable"):
        kwargs.update(
            file=_LogLines(),
            mininterval=QUIET_SECONDS,
            delay=QUIET_SECONDS,
            bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]",
            leave=False,
        )
    return tqdm(iterable, **kwargs)
