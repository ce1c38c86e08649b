"""Results others can read (output files follow the umask) and SLURM job names."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
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


# --------------------------------------------------------------------------- SLURM job names


@pytest.mark.parametrize(
    ("preset", "job_name"),
    [(["+experiment=layer_search"], "editexp-layer_search"), ([], "editexp-sweep")],
)
def test_slurm_job_name_is_the_experiment(tmp_path: Path, preset, job_name) -> None:
    """The sbatch script submitit writes names the job after the experiment preset (a fake
    sbatch refuses the job, so nothing runs and no cluster is needed)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "srun"):
        (fake / tool).write_text("#!/bin/sh\necho 'refused by the test' >&2\nexit 1\n")
        (fake / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "editexp.runner", "-m", *preset, "model=tiny-llama3",
         "layer=0,1", "logger=none", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert "refused by the test" in result.stdout + result.stderr
    (script,) = sweep.glob(".submitit/.submission_file_*.sh")
    assert f"#SBATCH --job-name={job_name}\n" in script.read_text()
