"""The local launcher keeps a user-set OMP_NUM_THREADS, as a SLURM job does: it becomes the
threads of every job, and the jobs that run at once share the cores at that many each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra_plugins.editexp_launcher import launcher

PROBE = Path(__file__).with_name("launcher_probe.py")


def test_given_threads_per_job_cap_the_parallel_jobs():
    plan = launcher.plan_parallelism(10, cores=8, threads_per_job=4)
    assert (plan.parallel_jobs, plan.threads_per_job) == (2, 4)
    plan = launcher.plan_parallelism(10, cores=8, threads_per_job=16)
    assert (plan.parallel_jobs, plan.threads_per_job) == (1, 16)


def test_user_threads_come_from_a_positive_omp_num_threads(monkeypatch):
    for value, expected in (("3", 3), ("0", None), ("two", None), ("", None)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert launcher.user_threads() == expected
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert launcher.user_threads() is None


def test_a_local_multirun_keeps_the_users_omp_num_threads(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROBE.parents[1]), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(PROBE),
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.cores=4",
        "~logger",
        f"++probe.out={tmp_path}",
        "++probe.sleep=0",
        "++probe.index=0,1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert all(r["torch_threads"] == 1 and r["omp"] == "1" for r in records), records
