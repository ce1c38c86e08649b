"""A sweep is checked whole before its first job (a bad grid point refuses the sweep), and the same
command run again continues the same sweep; ``editexp -m`` runs as a subprocess
(tests/console_scripts.py).
"""

from __future__ import annotations

import pytest
from conftest import TINY_RUN
from console_scripts import EDITEXP, job_dirs, multirun, run_command


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
