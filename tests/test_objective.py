"""The run's objective: parsed and checked with the config, returned by the Hydra task
function (seen here by a Hydra callback, as a sweeper sees it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_config

from editexp.config import run_settings
from editexp.errors import UserError
from editexp.objective import Objective, parse_objective

PROJECT = Path(__file__).resolve().parents[1]


class RecordReturn:
    """A Hydra callback writing each job's return value to $OBJECTIVE_OUT."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        Path(os.environ["OBJECTIVE_OUT"]).write_text(json.dumps(job_return.return_value))


def test_objectives_parse_as_stage_metric_and_stat():
    assert parse_objective("post.S", "each_batch", True) == Objective("post", "S", "mean")
    assert parse_objective("pre.NS.std", "final", False) == Objective("pre", "NS", "std")
    assert parse_objective("each_batch.ES", "every_k", False) == Objective("each_batch", "ES")
    assert parse_objective("post.GE", "each_batch", True).metric == "GE"


@pytest.mark.parametrize(
    ("text", "schedule", "generates", "says"),
    [
        ("S", "each_batch", True, "expected stage.metric[.stat]"),
        (3, "each_batch", True, "expected stage.metric[.stat]"),
        ("later.S", "each_batch", True, "stage 'later' is not one of pre, post, each_batch"),
        ("post.SS", "each_batch", True, "metric 'SS' is not one of ES, PS, NS, S, GE"),
        ("post.ES.median", "each_batch", True, "ES has the statistics mean, std only"),
        ("post.S.std", "each_batch", True, "S has the statistics mean only"),
        ("each_batch.S", "final", True, "eval.schedule=every_k runs only"),
        ("post.GE", "each_batch", False, "eval.generation_facts > 0"),
        ("each_batch.GE", "every_k", True, "eval.generation_facts > 0"),
    ],
)
def test_a_bad_objective_is_one_clear_error(text, schedule, generates, says):
    with pytest.raises(UserError) as error:
        parse_objective(text, schedule, generates)
    assert says in str(error.value) and f"objective={text}" in str(error.value)


def test_the_config_checks_its_objective_before_any_work():
    with pytest.raises(UserError, match="objective=each_batch.S: each_batch scores"):
        run_settings(compose_config(*TINY_RUN, "objective=each_batch.S"))
    settings = run_settings(compose_config(*TINY_RUN, "objective=post.ES.std"))
    assert settings.objective == Objective("post", "ES", "std")


def test_the_task_function_returns_the_runs_objective(tmp_path):
    out = tmp_path / "objective.json"
    env = {**os.environ, "OBJECTIVE_OUT": str(out), "EDITEXP_CACHE_DIR": str(tmp_path / "c")}
    paths = [str(PROJECT), str(PROJECT / "tests"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "editexp.runner",
        *TINY_RUN,
        "logger=none",
        "n_edits=2",
        "objective=post.PS",
        f"hydra.run.dir={run_dir}",
        "+hydra.callbacks.record._target_=test_objective.RecordReturn",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(out.read_text()) == summary["post"]["PS"]["mean"]
