"""The console scripts' errors: a full disk, ``editexp-stats`` and ``editexp-report`` user errors
are one line on stderr with exit status 2 and leave no partial output; ``debug=true`` and
``hydra.verbose`` show the traceback; a Python run ignores a Hydra config left in the process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from console_scripts import (
    TINY,
    TWO_UPDATES,
    cli,
    editexp,
    error_line,
    user_error,
)

import editexp.runner as runner_module
import editexp.stats_cli as stats_cli
from editexp import report


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, finished, monkeypatch):
    """torch.save reports a full disk as ``RuntimeError: ... unexpected pos``; the checkpoint
    write fails here, after the first update's rows were kept."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".checkpoint.pt."):
            real_save(obj, path, *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    run_dir = tmp_path / "run"
    line = error_line(editexp(run_dir, *TWO_UPDATES))
    assert f"cannot write {run_dir / 'checkpoint.pt'}: the write was cut short" in line
    assert "is the disk full?" in line
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "checkpoint.pt").exists()


def test_a_real_full_disk(tmp_path, finished, monkeypatch):
    """The run directory on a 160 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
        shutil.copytree(finished[1], tmp_path / "cache")
        result = editexp(mount / "run", *TWO_UPDATES, "hydra/job_logging=stdout")
        line = error_line(result)
        assert f"cannot write {mount / 'run'}" in line
        assert "no space left on the device" in line or "is the disk full?" in line
        assert not list((mount / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_editexp_stats_errors_are_one_line_and_leave_no_outputs_tree(
    tmp_path, monkeypatch, cache_dir
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stats_cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for args, says in (
        (["layer=[1,9]"], "layer=[9] is outside model 'tiny-llama3'"),
        (["stats.n_tokens=abc"], "stats.n_tokens='abc'; expected a positive integer"),
        (["stats.corpus.files=[/nonexistent.txt]"], "/nonexistent.txt does not exist"),
    ):
        line = user_error(cli(stats_cli.main, "model=tiny-llama3", *args), "editexp-stats")
        assert says in line
    assert list(tmp_path.iterdir()) == [cache_dir] or not list(tmp_path.iterdir())


def test_editexp_stats_refuses_too_few_tokens_before_the_model_loads(
    tmp_path, monkeypatch, cache_dir
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stats_cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    for args, says in (
        (["stats.n_tokens=100"], "stats.n_tokens=100 is less than d_k=128 of model 'tiny-llama3'"),
        ([f"stats.corpus.files=[{corpus}]"], "tokens, fewer than d_k=128, so C0 would be singular"),
    ):
        line = user_error(
            cli(stats_cli.main, "model=tiny-llama3", "layer=1", *args), "editexp-stats"
        )
        assert says in line
    assert not (cache_dir / "stats").exists()


def test_editexp_stats_writes_only_the_cache(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    result = cli(
        stats_cli.main, "model=tiny-llama3", "layer=1", "stats.n_tokens=300", "eval.held_out_keys=8"
    )
    assert result.code == 0, result.err
    assert "layer 1: computed and cached" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_editexp_report_user_errors(tmp_path):
    missing = cli(lambda: sys.exit(report.main([str(tmp_path / "nowhere")])))
    assert missing.code == 2 and "is not a directory" in missing.message


def test_editexp_debug_shows_the_traceback(tmp_path, no_model, monkeypatch):
    monkeypatch.setenv("EDITEXP_DEBUG", "1")
    result = editexp(tmp_path / "run", *TWO_UPDATES, "layer=1.5")
    assert result.code == 1 and "Traceback" in result.err and "ConfigError" in result.err


def test_hydra_verbose_shows_the_traceback(tmp_path, no_model):
    result = editexp(tmp_path / "run", *TWO_UPDATES, "layer=1.5", "hydra.verbose=true")
    assert result.code == 1 and "Traceback" in result.err and "ConfigError" in result.err


@pytest.mark.parametrize("left_behind", ["no output_dir", "another job's output_dir"])
def test_a_python_run_ignores_a_hydra_config_left_in_the_process(tmp_path, cache_dir, left_behind):
    """A Hydra job that failed in this process (``hydra.verbose=true`` leaves its config set)
    or any earlier job must not be taken for this run: the run succeeds and writes no
    ``.hydra/`` files, neither in its own directory nor in the other job's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from editexp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        stale = compose("config", return_hydra_config=True)
    other = tmp_path / "other-job"
    if left_behind != "no output_dir":
        with open_dict(stale):
            stale.hydra.runtime.output_dir = str(other)
    HydraConfig.instance().set_config(stale)
    try:
        record = runner_module.run(compose_config(*TINY, *TWO_UPDATES), tmp_path / "api")
    finally:
        HydraConfig.instance().cfg = None
    assert record.edits_done == 2
    assert not (tmp_path / "api" / ".hydra").exists() and not other.exists()


def test_the_console_script_exits_2_with_one_line(tmp_path):
    """The real entry point, as a shell sees it."""
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "from editexp.cli import main; main()",
            *TINY,
            "seed=abc",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == "editexp: error: seed='abc'; expected an integer"
