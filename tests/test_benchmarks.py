"""The GPU benchmark script runs end to end (on a CPU, at a tiny shape), so it is ready when a
GPU is at hand; the precision study's fact-by-fact comparison on a hand-made case."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_batch.py"


def test_gpu_batch_script_times_every_phase_and_extrapolates(tmp_path):
    out = tmp_path / "table.txt"
    args = ["--shape", "small", "--facts", "4", "--device", "cpu", "--precision", "32-true"]
    args += ["--stats-tokens", "2000", "--out", str(out)]
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True)
    rows = {line.split()[0]: line.split()[1:] for line in out.read_text().splitlines()[2:7]}
    assert list(rows) == ["statistics", "keys_values", "solve", "evaluation", "total"]
    measured, extrapolated = float(rows["keys_values"][0]), float(rows["keys_values"][1])
    assert extrapolated / (4096 / 4) == pytest.approx(measured, abs=0.06)  # printed to 0.1 s
    assert "against the target of 30 min" in out.read_text()


def _precision_study():
    spec = importlib.util.spec_from_file_location(
        "precision_study", BENCHMARKS / "precision_study.py"
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_precision_study_pairs_the_facts():
    study = _precision_study()
    fp32 = {1: (100, 50, 100), 2: (0, 100, 50), 3: (100, 100, 0)}
    bf16 = {1: (100, 50, 100), 2: (100, 100, 50), 3: (100, 100, 10)}
    as_rows = {case: dict(zip(("ES", "PS", "NS"), values)) for case, values in fp32.items()}
    result = study.compare(as_rows, {c: dict(zip(("ES", "PS", "NS"), v)) for c, v in bf16.items()})
    assert result["n"] == 3 and result["agreement"] == pytest.approx(100 * 7 / 9)
    assert result["ES"] == pytest.approx(100 / 3) and result["PS"] == 0
    assert result["ES_se"] == pytest.approx(np.std([0, 100, 0], ddof=1) / np.sqrt(3))
    means_fp32, means_bf16 = [200 / 3, 250 / 3, 50], [100, 250 / 3, 160 / 3]
    assert result["S_fp32"] == pytest.approx(3 / sum(1 / m for m in means_fp32))
    assert result["S"] == pytest.approx(3 / sum(1 / m for m in means_bf16) - result["S_fp32"])
    assert result["S_se"] > 0


def test_precision_study_checks_the_reference_point_against_the_paper_code(tmp_path):
    study = _precision_study()
    pre = json.loads((study.REFERENCE / "ume-smollm2-pre-edit-64.json").read_text())["facts"]
    post = json.loads((study.REFERENCE / "ume-smollm2-memit-l1-post-64.json").read_text())
    post = post["facts"]
    dirs = {}
    for precision, flipped in (("32-true", 0), ("bf16-mixed", 2)):
        rows = []
        for index, (before, after) in enumerate(zip(pre, post)):
            row = {"case_id": before["case_id"]}
            row["pre"] = {m: before[m] / 100 for m in ("ES", "PS", "NS")}
            row["post"] = {m: after[m] / 100 for m in ("ES", "PS", "NS")}
            if index < flipped:  # a pre-edit ES that differs from the paper code's
                row["pre"]["ES"] = 1 - row["pre"]["ES"]
            rows.append(json.dumps(row))
        dirs[precision] = tmp_path / precision
        dirs[precision].mkdir()
        (dirs[precision] / "facts.jsonl").write_text("\n".join(rows) + "\n")
    lines = study.reference_lines(dirs)
    paper, fp32, bf16 = (line.split(" | ") for line in lines[2:5])
    assert paper[1] == fp32[1] == "192/192" and bf16[1] == "190/192"
    assert fp32[2:] == paper[2:]  # the post-edit means, as the paper code's
