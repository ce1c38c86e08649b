"""A run directory on a shared file system trusts nothing found there: a planted checkpoint runs no
code and is refused in one line, a planted link is refused with its target untouched, and
neither the lock nor Hydra's files are written through a link.

Runs go through the console script in this process (tests/console_scripts.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from console_scripts import (
    editexp_here,
    user_error,
)

from editexp.run_dir import RunDirectory, RunDirError

OUTSIDE_TEXT = "the file a planted link points to\n"


class Planted:
    """Unpickling this runs ``touch pwned`` in the working directory."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every run directory, which planted links point to."""
    path = tmp_path / "outside.txt"
    path.write_text(OUTSIDE_TEXT)
    return path


def test_a_planted_checkpoint_runs_no_code_and_is_refused_in_one_line(work, no_model):
    run_dir = work / "D"
    run_dir.mkdir()
    torch.save({"updates_done": Planted()}, run_dir / "checkpoint.pt")
    line = user_error(editexp_here(f"hydra.run.dir={run_dir}"))
    assert not (work / "pwned").exists()
    assert "checkpoint.pt is damaged" in line and "not written by editexp" in line
    assert "force=true" in line


@pytest.mark.parametrize("name", [".editexp.lock", "runner.log", "run.json"])
def test_a_planted_file_link_is_refused_and_its_target_untouched(work, outside, no_model, name):
    run_dir = work / "D"
    run_dir.mkdir()
    (run_dir / name).symlink_to(outside)
    line = user_error(editexp_here(f"hydra.run.dir={run_dir}"))
    assert f"{run_dir / name} is a symbolic link" in line
    assert outside.read_text() == OUTSIDE_TEXT


def test_a_planted_hydra_folder_link_is_refused_and_nothing_written_there(work, tmp_path, no_model):
    run_dir, elsewhere = work / "D", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (run_dir / ".hydra").symlink_to(elsewhere, target_is_directory=True)
    line = user_error(editexp_here(f"hydra.run.dir={run_dir}"))
    assert f"{run_dir / '.hydra'} is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_the_lock_never_opens_a_link(tmp_path, outside):
    (tmp_path / ".editexp.lock").symlink_to(outside)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        with RunDirectory(tmp_path).locked():
            pass
    assert outside.read_text() == OUTSIDE_TEXT


def test_restoring_hydra_files_never_writes_through_a_linked_folder(tmp_path):
    run_dir, elsewhere = tmp_path / "D", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (run_dir / "link").symlink_to(elsewhere, target_is_directory=True)
    files = {"link/x": "planted", ".hydra/config.yaml": "a: 1\n", "../y": "planted"}
    (run_dir / "run.json").write_text(json.dumps({"hydra_files": files}))
    RunDirectory(run_dir).restore_hydra_files()
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "y").exists()
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "a: 1\n"
