"""A sweep's finished runs as a DataFrame (editexp.load_results), and an Optuna search of
lambda on tiny-llama3 (conf/experiment/optuna_lambda.yaml) when hydra-optuna-sweeper is
installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN

import editexp

PROJECT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "logger=none", "n_edits=2", "eval.generation_facts=0"]


def editexp_multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDITEXP_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "editexp", "-m", *TINY, *overrides]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def summaries(sweep: Path) -> dict[str, dict]:
    return {str(p.parent.resolve()): json.loads(p.read_text()) for p in sweep.rglob("summary.json")}


def test_load_results_has_a_row_per_run_with_every_axis_and_metric(tmp_path):
    sweep = tmp_path / "sweep"
    editexp_multirun(tmp_path, "algorithm=memit", "lambda=10,1000", f"hydra.sweep.dir={sweep}")
    (sweep / "unfinished" / ".hydra").mkdir(parents=True)  # a job without a summary: no row
    df = editexp.load_results(sweep)
    assert len(df) == 2 and sorted(df["lambda"]) == [10.0, 1000.0]
    assert set(df["algorithm"]) == {"memit"} and set(df["layer"]) == {(1,)}
    expected = summaries(sweep)
    for _, row in df.iterrows():
        summary = expected[row["run_dir"]]
        for stage in ("pre", "post"):
            for metric in ("ES", "PS", "NS"):
                for stat in ("mean", "std"):
                    column = f"{stage}_{metric}_{stat}"
                    assert row[column] == summary[stage][metric][stat], column
        assert row["post_S_mean"] == summary["post"]["S"]["mean"]
        assert row["post_S_se"] == summary["post"]["S"]["se"]  # the delta method's
        assert math.isnan(row["post_S_std"]) and math.isnan(row["post_GE_mean"])
        assert row["edits_done"] == 2 and row["mode"] == "batch"
    with pytest.raises(FileNotFoundError):
        editexp.load_results(tmp_path / "nowhere")


def test_optuna_searches_lambda_for_the_best_s_and_a_rerun_continues(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    args = [
        "+experiment=optuna_lambda",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    ]
    editexp_multirun(tmp_path, *args)
    df = editexp.load_results(sweep)
    assert len(df) == 2 and df["lambda"].nunique() == 2
    assert all(1 <= lam <= 1e6 for lam in df["lambda"])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == df["post_S_mean"].max()
    assert best["best_params"]["lambda"] == df.loc[df["post_S_mean"].idxmax(), "lambda"]
    editexp_multirun(tmp_path, *args)  # the same lambdas: both trials skipped
    assert editexp.load_results(sweep).equals(df)
    logs = [path.read_text() for path in sweep.glob("*/runner.log")]
    assert len(logs) == 2 and all("exists; skipping" in log for log in logs)
