"""The local launcher runs at most as many grid points as fit, each with its share of cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_plugins.editexp_launcher import launcher

PROBE = Path(__file__).with_name("launcher_probe.py")


def plan(*args, **kwargs) -> tuple[int, int]:
    """(parallel jobs, threads per job). Through the module at call time: Hydra's plugin scan
    executes plugin modules again, which makes new classes."""
    result = launcher.plan_parallelism(*args, **kwargs)
    return result.parallel_jobs, result.threads_per_job


def test_plan_shares_the_cores():
    assert plan(n_jobs=10, cores=2) == (2, 1)
    assert plan(n_jobs=10, cores=16) == (10, 1)
    assert plan(n_jobs=3, cores=16) == (3, 5)
    assert plan(n_jobs=1, cores=8) == (1, 8)


def test_plan_counts_memory_and_gpus():
    assert plan(10, cores=16, memory_gb=20, mem_gb_per_job=4) == (5, 3)
    assert plan(10, cores=16, memory_gb=2, mem_gb_per_job=4) == (1, 16)
    assert plan(10, cores=16, gpus=4, gpus_per_job=1) == (4, 4)
    assert plan(10, cores=16, gpus=0, gpus_per_job=1) == (10, 1)


def test_plan_takes_explicit_settings_and_refuses_bad_ones():
    assert plan(10, cores=8, parallel_jobs=2) == (2, 4)
    assert plan(10, cores=8, parallel_jobs=2, threads_per_job=1) == (2, 1)
    with pytest.raises(ValueError, match="parallel_jobs=0"):
        plan(10, cores=8, parallel_jobs=0)
    with pytest.raises(ValueError, match="threads_per_job=-1"):
        plan(10, cores=8, threads_per_job=-1)


def test_local_multirun_runs_two_at_a_time_with_their_share_of_threads(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROBE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.cores=4",
            "hydra.launcher.parallel_jobs=2",
            "~logger",
            f"++probe.out={tmp_path}",
            "++probe.sleep=3",
            "++probe.index=0,1,2,3",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert all(r["torch_threads"] == 2 and r["omp"] == "2" for r in records)
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2
