"""A run or sweep directory on a shared file system: no code runs from a planted file, no write
leaves its directory, names built from overrides stay short and inside their folders, a sweep
is checked whole before it starts and continues when its command is run again.

Runs go through the console script in this process, sweeps run ``editexp -m`` as a
subprocess (both with tests/console_scripts.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, cached_model
from console_scripts import EDITEXP, TINY, cli, job_dirs, multirun, run_command, user_error

import editexp.runner as runner_module
from editexp.editing.prefixes import context_prefixes
from editexp.paths import NAME_LIMIT, dir_name, safe_name
from editexp.resolvers import sweep_name
from editexp.run_dir import RunDirectory, RunDirError

OUTSIDE_TEXT = "the file a planted link points to\n"


class Planted:
    """Unpickling this runs ``touch pwned`` in the working directory."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory of its own, and a cache beside it."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "work"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every run directory, which planted links point to."""
    path = tmp_path / "outside.txt"
    path.write_text(OUTSIDE_TEXT)
    return path


def editexp(*overrides: str):
    return cli(runner_module.main, *TINY, "n_edits=1", *overrides)


# --------------------------------------------------------------------------- planted files


def test_a_planted_checkpoint_runs_no_code_and_is_refused_in_one_line(work, no_model):
    run_dir = work / "D"
    run_dir.mkdir()
    torch.save({"updates_done": Planted()}, run_dir / "checkpoint.pt")
    line = user_error(editexp(f"hydra.run.dir={run_dir}"))
    assert not (work / "pwned").exists()
    assert "checkpoint.pt is damaged" in line and "not written by editexp" in line
    assert "force=true" in line


@pytest.mark.parametrize("name", [".editexp.lock", "runner.log", "run.json"])
def test_a_planted_file_link_is_refused_and_its_target_untouched(work, outside, no_model, name):
    run_dir = work / "D"
    run_dir.mkdir()
    (run_dir / name).symlink_to(outside)
    line = user_error(editexp(f"hydra.run.dir={run_dir}"))
    assert f"{run_dir / name} is a symbolic link" in line
    assert outside.read_text() == OUTSIDE_TEXT


def test_a_planted_hydra_folder_link_is_refused_and_nothing_written_there(work, tmp_path, no_model):
    run_dir, elsewhere = work / "D", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (run_dir / ".hydra").symlink_to(elsewhere, target_is_directory=True)
    line = user_error(editexp(f"hydra.run.dir={run_dir}"))
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


# --------------------------------------------------------------------------- names from overrides


def test_a_case_ids_path_does_not_move_the_run_directory_out_of_outputs(work, tmp_path, no_model):
    escape = "../" * 6 + "x.txt"
    user_error(editexp("data.order=case_ids", f"data.case_ids={escape}"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]
    assert sorted(path.name for path in work.iterdir()) == ["outputs"]


def test_a_model_name_does_not_move_prefix_files_out_of_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache))
    loaded = cached_model("tiny-llama3")
    renamed = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, name="../../x"))
    context_prefixes(renamed, count=1, length=4, seed=0)
    assert [path.name for path in (tmp_path / "a" / "b").iterdir()] == ["cache"]
    assert [path.parent for path in cache.rglob("*.json")] == [cache / "prefixes"]


def test_names_are_one_short_component_and_the_same_for_the_same_text():
    assert safe_name("../../x") == ".._.._x" and safe_name("..") == "_.."
    assert dir_name("layer=[4,5],lambda=10") == "layer=[4,5],lambda=10"
    assert dir_name("data.case_ids=../../x.txt") == "data.case_ids=.._.._x.txt"
    assert dir_name("..") == "_.."
    long = ",".join(f"model.hparams.memit.v_steps={n}" for n in range(20))
    assert len(dir_name(long)) <= NAME_LIMIT and dir_name(long).startswith(long[:60])
    assert dir_name(long) == dir_name(long) != dir_name(long + "0")
    assert sweep_name(["logger=none", "+experiment=layer_search", "layer=0,1"]) == "layer=0,1"
    assert sweep_name([]) == "default"


def test_a_long_override_list_runs_and_runs_again_in_the_same_directory(work, monkeypatch):
    """The test suite's own tiny-model list without hydra.run.dir: the default directory name
    is short, and the same overrides find it again (the second run skips)."""
    overrides = [*TINY_RUN, "logger=none", "n_edits=1", "eval.generation_facts=0"]
    first = cli(runner_module.main, *overrides)
    assert first.code == 0, first.err
    (summary,) = work.glob("outputs/*/*/*/summary.json")
    assert len(summary.parent.name) <= NAME_LIMIT
    second = cli(runner_module.main, *overrides)
    assert second.code == 0, second.err
    assert f"{summary} exists; skipping" in second.out + second.err
    assert list(work.glob("outputs/*/*/*/summary.json")) == [summary]


# --------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_sweep_with_a_bad_point_is_refused_before_any_job(tmp_path, launcher):
    args = [] if launcher == "basic" else ["hydra/launcher=local"]
    result, sweep_dir = multirun(tmp_path, *TINY_RUN, "n_edits=1", "layer=0,9", *args)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert errors[0].startswith("editexp: error: 1 of 2 grid points would fail")
    assert "#1 (" in errors[0] and "layer=9" in errors[0] and "outside model" in errors[0]
    assert job_dirs(sweep_dir) == {} and not list(sweep_dir.glob("*/runner.log"))
    assert not (sweep_dir / ".submitit").exists()


def test_the_same_sweep_command_continues_the_same_sweep(tmp_path):
    """No hydra.sweep.dir: the directory comes from the command, so running the command again
    finds the sweep and every finished point is skipped."""
    command = [EDITEXP, "-m", *TINY_RUN, "n_edits=1", "eval.generation_facts=0", "layer=1,2"]
    command += ["logger=none", "hydra/launcher=local"]
    first = run_command(command, tmp_path, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == 2
    written = [path.read_bytes() for path in summaries]
    second = run_command(command, tmp_path, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert list((tmp_path / "multirun").iterdir()) == [sweep_dir]
    assert [path.read_bytes() for path in summaries] == written
    for summary in summaries:
        assert "exists; skipping" in (summary.parent / "runner.log").read_text()
