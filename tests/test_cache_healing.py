"""Caches heal: a damaged entry is logged, removed and computed again, a good one is read without a
lock, and a complete cache is read without writing to it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from console_scripts import (
    TWO_UPDATES,
    editexp,
    read_jsonl,
)

from editexp.cache import load_or_compute


def test_damaged_pre_edit_and_prefixes_caches_heal(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    (pre_edit,) = (tmp_path / "cache" / "pre_edit").glob("*.json")
    (prefixes,) = (tmp_path / "cache" / "prefixes").glob("*.json")
    good = {path: path.read_bytes() for path in (pre_edit, prefixes)}
    expected = read_jsonl(finished[0] / "facts.jsonl")
    damages = [
        (b'[{"case_id": 3, "sco', b'["cut'),  # truncated files
        (b'{"not": "a list"}', b'{"not": "a list"}'),  # wrong types
        (b"{}", b'[""]'),  # no facts, too few prefixes: {} was a KeyError after the whole edit
        (b"[]", b"[1, 2]"),
    ]
    for attempt, (bad_pre_edit, bad_prefixes) in enumerate(damages):
        pre_edit.write_bytes(bad_pre_edit)
        prefixes.write_bytes(bad_prefixes)
        result = editexp(tmp_path / f"run{attempt}", *TWO_UPDATES)
        assert result.code == 0, result.err
        for what in ("pre-edit score cache", "prefixes cache"):
            assert re.search(f"{what} .* is bad \\(.*\\); removing it and computing it", result.out)
        assert read_jsonl(tmp_path / f"run{attempt}" / "facts.jsonl") == expected
        assert {path: path.read_bytes() for path in good} == good  # healed, the same entries


def test_a_bad_entry_is_computed_again_and_a_good_one_is_read_without_a_lock(tmp_path):
    path = tmp_path / "entry.json"
    calls = []

    def compute():
        calls.append(1)
        return [1, 2, 3]

    def problem(value):
        return None if isinstance(value, list) and len(value) == 3 else "not three numbers"

    def get():
        return load_or_compute(
            path,
            load=lambda p: json.loads(p.read_text()),
            save=lambda p, v: p.write_text(json.dumps(v)),
            compute=compute,
            problem=problem,
        )

    path.write_text("[1, 2]")
    assert get() == [1, 2, 3] and len(calls) == 1
    Path(f"{path}.lock").unlink()
    assert get() == [1, 2, 3] and len(calls) == 1
    assert not Path(f"{path}.lock").exists()  # read: no lock file, nothing written


def test_a_populated_cache_is_read_without_writing_to_it(tmp_path, finished, monkeypatch):
    """No lock file, no write: a complete cache may be read-only (read-only for real when the
    tests do not run as root, who may write anyway)."""
    cache = tmp_path / "cache"
    shutil.copytree(finished[1], cache)
    for lock in cache.rglob("*.lock"):
        lock.unlink()
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache))
    before = {str(p): p.stat().st_mtime_ns for p in cache.rglob("*")}
    modes = {p: p.stat().st_mode for p in [cache, *cache.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        result = editexp(tmp_path / "run", *TWO_UPDATES)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert result.code == 0, result.err
    assert {str(p): p.stat().st_mtime_ns for p in cache.rglob("*")} == before
