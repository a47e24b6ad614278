"""What one ``kedro run`` holds in the project: the run lock and the resume journal.

**The lock** (``.birdbone/run.lock``): a run takes an exclusive ``flock`` on it before its
first node, and writes who holds it (pid, host, command, env, start). A second run in the
same project stops at once with that description; the kernel drops the lock when the
holder exits, however it exits (kill -9 included), so a crashed run never leaves a stale
lock behind.

**The journal** (``.birdbone/journal.json``): after each artifact is written whole, the
journal records it under the recipe's hash, with its content: a SHA-256 over its bytes
(every file of a folder, by relative path), and the files' sizes and mtimes so that an
untouched artifact is recognised without reading it. A rerun of the same recipe treats an
artifact as done only when the journal holds it with that hash and that content, so a
killed run resumes where it stopped, a changed recipe or a file whose bytes changed is made
again, and the same bytes brought back by ``dvc checkout``, ``dvc repro`` or a copy of the
project count as done (the three caches, DVC's, Kedro's only-missing and this one,
agree). A file several nodes write in turn (``summary.json``, merged) is recorded without
its content.

Everything here is plain Python (no Kedro): ``birdbone.hooks`` drives it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from birdbone.core.io import TMP_PREFIX, explain_write_error, sha256_file, sha256_json, write_json_atomic
from birdbone.errors import RunLockedError

STATE_DIR = ".birdbone"
LOCK_FILE = "run.lock"
JOURNAL_FILE = "journal.json"
# where a run writes its artifacts: stale temporary files are swept from these at start
ARTIFACT_DIRS = ("data", "models")

__all__ = ["Journal", "RunLock", "activate", "explain_write_error", "finished", "record", "sweep_temporaries"]


def command_line() -> str:
    """This process's command as typed: ``kedro run ...`` (``python -m kedro run ...``)."""
    program = Path(sys.argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    return " ".join([name, *sys.argv[1:]])


class RunLock:
    """An exclusive lock on the project, held for one run."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / STATE_DIR / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, **about: Any) -> None:
        """Takes the lock or raises ``RunLockedError`` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self._refusal()) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command_line(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            **about,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def _refusal(self) -> str:
        try:
            other = json.loads(self.path.read_text())
            who = (
                f"pid {other['pid']} on {other['host']}, '{other['command']}' (env {other.get('env', '?')}), "
                f"started {other['started']}"
            )
            stop = f"kill {other['pid']}"
        except (OSError, ValueError, KeyError):  # the holder is still writing its description
            who, stop = "a run that is just starting", "stop it"
        return (
            f"another bird-bone run is using this project: {who}. Two runs at once would write the same "
            f"models and reports. Fix: wait for it to finish, or {stop}; the lock ({self.path}) is released "
            "when that process ends, however it ends."
        )

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Any:
    """SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C does) while the block runs, so a
    terminated run unwinds and cleans up instead of dying where it stands."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# safetensors' writer (Rust's tempfile) stages a file as ``.tmp`` + 6 characters beside it
_NATIVE_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def sweep_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Removes the ``.tmp-*`` files and folders a killed run left under data/ and models/,
    and safetensors' own ``.tmpXXXXXX`` staging files.

    Only safe while holding the run lock: no other run can be writing them."""
    removed = []
    for top in ARTIFACT_DIRS:
        base = Path(root) / top
        if not base.is_dir():
            continue
        found = [*base.rglob(f"{TMP_PREFIX}*"), *(p for p in base.rglob(".tmp*") if _NATIVE_TMP.match(p.name))]
        for path in sorted(set(found), key=lambda p: len(p.parts)):
            if not path.exists() and not path.is_symlink():
                continue  # inside a folder already removed
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _files(path: Path) -> list[tuple[str, Path]]:
    """The regular files of an artifact by relative path: itself, or a folder's files
    (links are not followed out)."""
    if path.is_file():
        return [(".", path)]
    if not path.is_dir():
        return []
    return sorted((str(f.relative_to(path)), f) for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _stats(path: Path) -> list[list[Any]] | None:
    """Each file's relative path, size and mtime: cheap, and equal while nothing touched them."""
    try:
        out = [[rel, st.st_size, st.st_mtime_ns] for rel, f in _files(path) for st in (f.stat(),)]
    except OSError:
        return None
    return out or None


def _digest(path: Path) -> str | None:
    """SHA-256 over the artifact's files: each one's relative path, size and SHA-256."""
    files = _files(path)
    try:
        parts = [[rel, f.stat().st_size, sha256_file(f)] for rel, f in files]
    except OSError:
        return None
    return sha256_json(parts) if parts else None


class Journal:
    """Artifacts this project's runs finished, each under the recipe hash that made it."""

    def __init__(self, root: str | os.PathLike[str], recipe_hash: str, resume: bool = True) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / STATE_DIR / JOURNAL_FILE
        self.recipe_hash = recipe_hash
        self.resume = resume
        try:
            self._entries: dict[str, Any] = json.loads(self.path.read_text())["artifacts"]
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: nothing is done
            self._entries = {}

    def _key(self, path: str | os.PathLike[str]) -> str:
        full = Path(path)
        full = full if full.is_absolute() else Path.cwd() / full
        try:
            return str(full.resolve().relative_to(self.root))
        except ValueError:
            return str(full.resolve())

    def record(self, path: str | os.PathLike[str], shared: bool = False) -> None:
        """Notes that ``path`` was just written whole by this recipe."""
        full = Path(path)
        self._entries[self._key(full)] = {
            "recipe": self.recipe_hash,
            "stats": None if shared else _stats(full),
            "sha256": None if shared else _digest(full),
        }
        write_json_atomic(self.path, {"artifacts": self._entries})

    def done(self, path: str | os.PathLike[str], shared: bool = False) -> bool:
        """Whether ``path`` holds what this recipe would write (and resuming is on): the
        bytes it recorded, recognised by size and mtime, else by reading them."""
        if not self.resume:
            return False
        key = self._key(path)
        entry = self._entries.get(key)
        if not isinstance(entry, dict) or entry.get("recipe") != self.recipe_hash:
            return False
        if shared:
            return True
        stats = _stats(Path(path))
        if stats is None or entry.get("sha256") is None:  # gone, or an entry from before contents were kept
            return False
        if stats == entry.get("stats"):
            return True
        if _digest(Path(path)) != entry["sha256"]:
            return False
        entry["stats"] = stats  # the same bytes, copied or checked out: known by their stats from now on
        write_json_atomic(self.path, {"artifacts": self._entries})
        return True


_ACTIVE: dict[str, Journal] = {}


def activate(journal: Journal | None) -> None:
    """Makes ``journal`` the one datasets record to and check against (None: no run)."""
    _ACTIVE.pop("journal", None)
    if journal is not None:
        _ACTIVE["journal"] = journal


def record(path: str | os.PathLike[str], shared: bool = False) -> None:
    """Records a finished artifact in the active run's journal (no run: nothing to do)."""
    journal = _ACTIVE.get("journal")
    if journal is not None:
        journal.record(path, shared)


def finished(path: str | os.PathLike[str], present: bool, shared: bool = False) -> bool:
    """Whether an artifact counts as existing: present on disk and, during a run, made by
    this recipe (outside a run, present is enough)."""
    journal = _ACTIVE.get("journal")
    return present and (journal is None or journal.done(path, shared))
