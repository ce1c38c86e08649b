"""The GPU benchmark script runs end to end (on a CPU, at a tiny shape), so it is ready when a
GPU is at hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_batch.py"


def test_gpu_batch_script_times_every_phase_and_extrapolates(tmp_path):
    out = tmp_path / "table.txt"
    args = ["--shape", "small", "--facts", "4", "--device", "cpu", "--dtype", "float32"]
    args += ["--stats-tokens", "2000", "--out", str(out)]
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True)
    rows = {line.split()[0]: line.split()[1:] for line in out.read_text().splitlines()[2:7]}
    assert list(rows) == ["statistics", "keys_values", "solve", "evaluation", "total"]
    measured, extrapolated = float(rows["keys_values"][0]), float(rows["keys_values"][1])
    assert extrapolated / (4096 / 4) == pytest.approx(measured, abs=0.06)  # printed to 0.1 s
    assert "against the target of 30 min" in out.read_text()
