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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a fresh temporary directory; on success it replaces ``target`` whole.

    An existing ``target`` is moved aside first and deleted only after the new one is in
    place, so a crash never leaves a half-written directory under the final name.
    """
    target = Path(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    old: Path | None = None
    try:
        with _write_errors(target):
            yield tmp
            os.chmod(tmp, 0o777 & ~default_umask())
            if target.exists():
                old = target.with_name(f"{TMP_PREFIX}{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
