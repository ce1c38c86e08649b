"""On-disk cache helpers: where the cache lives, content hashes, atomic writes and file locks.

Everything expensive that editexp stores (dequantized models, layer statistics, context
prefixes, pre-edit scores) goes under ``cache_root()`` with a key that names everything that
changes the result. Writes go to a temporary file in the same directory followed by
``os.replace``, so a killed job or two jobs writing the same file never leave a corrupt one.

Entries heal: :func:`load_or_compute` checks every entry it reads (type, keys, shapes, the
facts it must cover); a bad one is logged, removed and computed again. Reading a complete
cache takes no lock and writes nothing, so a populated cache may be read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from editexp.errors import UserError, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

# errno values that mean "the disk or the permissions", not a bug.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class CacheError(UserError):
    """The cache cannot be used (not writable where it must be written), naming the path."""


class WriteError(UserError):
    """A file could not be written: the disk is full, or the folder is not writable."""


_SHA256_MEMO: dict[tuple[str, int, float], str] = {}


def cache_root() -> Path:
    """The cache directory: ``$EDITEXP_CACHE_DIR``, else ``~/.cache/editexp``."""
    root = os.environ.get("EDITEXP_CACHE_DIR") or Path.home() / ".cache" / "editexp"
    path = Path(root).expanduser()
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(
                f"cannot create the cache folder {path} ({error.strerror}); set "
                "EDITEXP_CACHE_DIR to a writable folder"
            ) from error
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) for this process."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if memo_key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256_MEMO[memo_key] = digest.hexdigest()
    return _SHA256_MEMO[memo_key]


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short, stable hash of a JSON-serialisable payload (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` atomically.

    The file gets the permissions of any file the user creates (0666 minus the umask), not
    the owner-only 0600 of a temporary file, so lab-mates can read results on a shared disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would give
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        problem = write_problem(error)
        if problem is not None:
            raise WriteError(f"cannot write {path}: {problem}") from error
        raise
    return path


def write_problem(error: BaseException) -> str | None:
    """What an exception raised while writing a file says about the disk, in words: a full
    disk or quota, a read-only or forbidden folder; None when it is something else.

    torch.save reports a full disk as ``RuntimeError: ... unexpected pos ...`` (its zip writer
    checks the file position after writing), without an errno.
    """
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return f"no space left on the device ({error.strerror}); free some space or write elsewhere"
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
        return f"the folder is not writable ({error.strerror})"
    if isinstance(error, RuntimeError) and (
        "unexpected pos" in str(error) or "file write failed" in str(error)
    ):
        return "the write was cut short (is the disk full?); free some space or write elsewhere"
    return None


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (works across processes and SLURM jobs
    that share a POSIX file system)."""
    lock_path = Path(f"{path}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    except OSError as error:
        raise CacheError(
            f"cannot create the lock file {lock_path} ({error.strerror}): this cache entry is "
            "missing or bad and must be computed, which needs a writable cache; make it "
            "writable or set EDITEXP_CACHE_DIR to a writable folder"
        ) from error
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- healing entries


def read_entry(
    path: str | Path, load: Callable[[Path], T], problem: Callable[[T], str | None]
) -> tuple[T | None, str | None]:
    """``(value, None)`` for a valid entry; ``(None, reason)`` for a missing or bad one.

    ``problem(value)`` returns what is wrong with a loaded entry (None when it is fine).
    Reads only: no lock, nothing written.
    """
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        value = load(path)
    except Exception as error:  # truncated, damaged by hand, from another torch version
        return None, f"unreadable: {type(error).__name__}: {one_line(error)[:200]}"
    reason = problem(value)
    return (None, reason) if reason is not None else (value, None)


def load_or_compute(
    path: str | Path,
    load: Callable[[Path], T],
    save: Callable[[Path, T], Any],
    compute: Callable[[], T],
    problem: Callable[[T], str | None],
    what: str = "cache entry",
) -> T:
    """The valid cache entry at ``path``, else ``compute()`` it and ``save`` it (atomically).

    A complete entry is read without a lock. Otherwise the entry is locked, read again
    (another job may have written it meanwhile), and a bad one is logged and removed before
    it is computed again, so a damaged entry heals instead of failing every run for good.
    """
    path = Path(path)
    value, _ = read_entry(path, load, problem)
    if value is not None:
        return value
    with file_lock(path):
        value, reason = read_entry(path, load, problem)
        if value is not None:
            return value
        if reason is not None:
            log.warning("%s %s is bad (%s); removing it and computing it again", what, path, reason)
            path.unlink(missing_ok=True)
        value = compute()
        computed_problem = problem(value)
        if computed_problem is not None:  # a bug: never cache what would be refused on read
            raise RuntimeError(f"freshly computed {what} for {path} is invalid: {computed_problem}")
        save(path, value)
    return value
