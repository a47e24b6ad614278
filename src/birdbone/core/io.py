"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Every artifact bird-bone writes goes through these helpers: the bytes go to a temporary
name in the same directory, are flushed to disk, and are then renamed over the target
(``os.replace`` is atomic on POSIX). A crash mid-write leaves the old artifact intact and,
at worst, a ``.tmp-*`` leftover that no reader ever opens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from birdbone.errors import OutputError

TMP_PREFIX = ".tmp-"

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_OS_CODE = re.compile(r"(?:os error |code: )(\d+)")  # how Rust writers (safetensors) report errno


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, also when a native writer reported it as text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = _OS_CODE.search(str(exc))
    return int(found.group(1)) if found else None


def explain_write_error(exc: BaseException, target: str | os.PathLike[str]) -> str:
    """A message for a write that failed: what the file system said, and the fix."""
    code = write_errno(exc)
    if code in _NO_SPACE:
        free = shutil.disk_usage(_existing_parent(Path(target))).free
        return (
            f"could not write {target}: no space left ({os.strerror(code)}; {free / 2**20:.0f} MiB free). "
            "The artifact that was there before is untouched. Fix: free disk space (old runs' models/, "
            "the DVC cache) or move the project to a larger disk, then rerun: finished steps are not redone."
        )
    if code in _NOT_WRITABLE:
        return (
            f"could not write {target}: the folder is not writable ({os.strerror(code)}). "
            "Fix: make it writable (chmod u+w, or remount read-write), or run from a copy of the project "
            "on a writable disk."
        )
    return f"could not write {target} ({type(exc).__name__}: {exc}). Fix: check the disk and the folder's permissions."


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    """Turns a file system refusal (read-only, full) into an ``OutputError`` naming the fix."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        if write_errno(exc) in _NO_SPACE | _NOT_WRITABLE:
            raise OutputError(explain_write_error(exc, target)) from exc
        raise


def default_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary file path next to ``target``; renames it over ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _write_errors(target):
            yield tmp
            os.chmod(tmp, 0o666 & ~default_umask())  # mkstemp makes 0600; artifacts get normal modes
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


OWNER_FILE = "birdbone.json"  # in every folder bird-bone writes whole: a model's sidecar, or this mark
OWNER_MARK = {"written_by": "bird-bone"}
_OWNER_FILE_MAX = 16 << 20


def written_by_birdbone(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is one bird-bone wrote: its ``birdbone.json`` (a regular file, not
    a link) is a model sidecar (``origin`` and ``sha256``) or says ``written_by: bird-bone``."""
    marker = Path(folder) / OWNER_FILE
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > _OWNER_FILE_MAX:
            return False
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (
        data.get("written_by") == OWNER_MARK["written_by"] or {"origin", "sha256"} <= data.keys()
    )


def check_replaceable(target: str | os.PathLike[str], overwrite: bool = False, hint: str = "") -> None:
    """Raises ``OutputError`` unless ``target`` may be replaced whole: it does not exist, is
    an empty folder, is a folder bird-bone wrote (``written_by_birdbone``), or ``overwrite``.

    Args:
        hint: how to pass an explicit overwrite where the caller has one (``--overwrite``).
    """
    target = Path(target)
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink():
        what = f"a symbolic link (to {os.readlink(target)}), which bird-bone never writes through"
    elif not target.is_dir():
        what = "a file, not a folder bird-bone wrote"
    elif not any(target.iterdir()) or written_by_birdbone(target):
        return
    else:
        what = f"a folder bird-bone did not write (it has no {OWNER_FILE} of bird-bone's)"
    raise OutputError(
        f"{target} exists and is {what}; bird-bone replaces a folder whole, so it would be lost. "
        f"Nothing was written. Fix: choose another path (a new or empty folder){hint}, or move {target} away yourself."
    )


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory; on success it replaces ``target`` whole.

    ``target`` must be replaceable (``check_replaceable``: absent, empty, written by
    bird-bone, or ``overwrite``), checked before anything is written; the new folder gets
    bird-bone's ``birdbone.json`` mark unless it holds a model sidecar already. An
    existing ``target`` is moved aside first and deleted only after the new one is in
    place, so a crash never leaves a half-written directory under the final name; a link
    is removed, never followed.
    """
    target = Path(target)
    check_replaceable(target, overwrite)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    old: Path | None = None
    try:
        with _write_errors(target):
            yield tmp
            if not (tmp / OWNER_FILE).exists():
                (tmp / OWNER_FILE).write_text(json.dumps(OWNER_MARK) + "\n")
            os.chmod(tmp, 0o777 & ~default_umask())
            if target.exists() or target.is_symlink():
                old = target.with_name(f"{TMP_PREFIX}{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if old.is_symlink() or old.is_file():
                old.unlink(missing_ok=True)
            else:
                shutil.rmtree(old, ignore_errors=True)


def read_regular(path: str | os.PathLike[str], limit: int, error: type[Exception], what: str) -> bytes:
    """The bytes of ``path``, which must be a regular file (a FIFO would block, a device
    such as /dev/zero never ends) of at most ``limit`` bytes; else ``error`` naming the fix."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist. Fix: check the path.")
    if not path.is_file():
        raise error(
            f"{what} {path} is not a regular file (a folder, FIFO or device such as /dev/zero): reading it would "
            "block or never end. Fix: point at a regular file."
        )
    size = path.stat().st_size
    if size > limit:
        raise error(
            f"{what} {path} is {size / 2**20:.0f} MiB, more than the {limit >> 20} MiB read at most. "
            "Fix: split it into several files."
        )
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise error(f"{what} {path} grew past {limit >> 20} MiB while being read. Fix: point at a finished file.")
    return data


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as indented, key-sorted JSON to ``target`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes_atomic(target, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of the canonical (sorted, compact) JSON form of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def flatten(value: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested dicts (and lists of dicts) as ``{"a.b.0.c": leaf}``; other lists are leaves."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            flatten(item, f"{prefix}.{i}", out)
    elif prefix:
        out[prefix] = value
    return out
