"""On-disk cache helpers: where the cache lives, content hashes, atomic writes and file locks.

Everything expensive that editexp stores (dequantized models, layer statistics, context
prefixes, pre-edit scores) goes under ``cache_root()`` with a key that names everything that
changes the result. Writes go to a temporary file in the same directory followed by
``os.replace``, so a killed job or two jobs writing the same file never leave a corrupt one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

_SHA256_MEMO: dict[tuple[str, int, float], str] = {}


def cache_root() -> Path:
    """The cache directory: ``$EDITEXP_CACHE_DIR``, else ``~/.cache/editexp``."""
    root = os.environ.get("EDITEXP_CACHE_DIR") or Path.home() / ".cache" / "editexp"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
