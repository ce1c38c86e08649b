"""Results others can read: output files follow the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from editexp.cache import atomic_torch_save, atomic_write_json, atomic_write_text, current_umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        written = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "b.json", {"a": 1}),
            atomic_torch_save(tmp_path / "c.pt", {"a": 1}),
        ]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other program would create
    finally:
        os.umask(old)
    assert _mode(plain) == 0o666 & ~umask
    for path in written:
        assert _mode(path) == 0o666 & ~umask, path
    assert not list(tmp_path.glob(".*.tmp"))
