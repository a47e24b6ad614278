"""Peak memory of a stretch of work: the process's resident set (RSS) and, on CUDA, the
GPU memory torch allocated.

On Linux the RSS high-water mark (``VmHWM``) can be reset (``/proc/self/clear_refs``), so
each stretch gets its own peak. Elsewhere the peak is the process's since it started
(``ru_maxrss``), which ``Peak.resettable`` says, so a report can tell the two apart.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


@dataclass
class Peak:
    rss_bytes: int
    gpu_bytes: int | None  # None without CUDA
    resettable: bool  # False: rss_bytes is the peak since the process started


def _hwm_bytes() -> int | None:
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def reset_peak() -> None:
    """Starts a new stretch (where the RSS peak cannot be reset, ``peak`` says so)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001 - no torch or no CUDA: nothing to reset
        pass
    with contextlib.suppress(OSError):
        _CLEAR.write_text("5")


def peak() -> Peak:
    """The peaks since the last ``reset_peak`` (RSS: since the start where not resettable)."""
    gpu = None
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = int(torch.cuda.max_memory_allocated())
    hwm = _hwm_bytes()
    if hwm is not None and _CLEAR.exists():
        return Peak(hwm, gpu, True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Peak(rss if sys.platform == "darwin" else rss * 1024, gpu, False)  # macOS: bytes, Linux: kB
