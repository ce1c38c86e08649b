"""Tracking: offline W&B runs read back from their .wandb file, NullTracker, run names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb_offline import read_run

from editexp.tracking import NullTracker, run_identity, start_tracker, tracking

WANDB_CFG = {
    "name": "wandb",
    "project": "editexp-test",
    "entity": None,
    "mode": "offline",
    "tags": ["test"],
    "job_type": "edit",
}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def test_wandb_run_records_updates_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "multirun" / "0"
    cfg = OmegaConf.create(WANDB_CFG)
    tracker = start_tracker(cfg, {"algorithm": {"name": "memit"}}, run_dir, "layer=3", "sweep-a")
    for i in range(3):
        tracker.log_update({"ES": 0.5 + i / 10, "delta_norm": float(i)}, edits_done=16 * (i + 1))
    summary = {"post": {"ES": {"mean": 0.7, "std": 0.1}}, "edits_done": 48, "layer": [3, 4]}
    tracker.log_summary(summary)
    tracker.finish()
    tracker.finish()  # idempotent

    run = read_run(run_dir)
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]]
    assert rows == [
        {"ES": 0.5, "delta_norm": 0.0, "edits_done": 16},
        {"ES": 0.6, "delta_norm": 1.0, "edits_done": 32},
        {"ES": 0.7, "delta_norm": 2.0, "edits_done": 48},
    ]
    assert run["summary"]["post/ES/mean"] == 0.7
    assert run["summary"]["post/ES/std"] == 0.1
    assert run["summary"]["layer"] == [3, 4]
    assert run["exit_code"] == 0
    meta = run["run"]
    assert (meta.display_name, meta.run_group, meta.job_type) == ("layer=3", "sweep-a", "edit")
    assert list(meta.tags) == ["test"]
    config = {item.key: json.loads(item.value_json) for item in meta.config.update}
    assert config["algorithm"] == {"name": "memit"}


@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit(-1)])
def test_exception_finishes_run_with_failure(tmp_path: Path, error: BaseException) -> None:
    """Also submitit's sys.exit(-1) after requeueing a preempted job."""
    cfg = OmegaConf.create(WANDB_CFG)
    with pytest.raises(type(error)):
        with tracking(cfg, {}, tmp_path, "default", None) as tracker:
            tracker.log_update({"ES": 1.0}, edits_done=1)
            raise error
    run = read_run(tmp_path)
    assert run["exit_code"] == 1
    assert len(run["history"]) == 1


def test_two_runs_in_one_process(tmp_path: Path) -> None:
    cfg = OmegaConf.create(WANDB_CFG)
    for name in ("a", "b"):
        with tracking(cfg, {}, tmp_path / name, name, "g") as tracker:
            tracker.log_update({"ES": 1.0}, edits_done=1)
    for name in ("a", "b"):
        run = read_run(tmp_path / name)
        assert run["run"].display_name == name
        assert run["exit_code"] == 0


def test_wandb_mode_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.create(WANDB_CFG)
    with tracking(cfg, {}, tmp_path, "default", None) as tracker:
        tracker.log_update({"ES": 1.0}, edits_done=1)
    assert not list(tmp_path.glob("wandb/offline-run-*"))


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with tracking(OmegaConf.create({"name": "none"}), {}, run_dir, "default", None) as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_update({"ES": 1.0}, edits_done=1)
        tracker.log_summary({"post": {"ES": {"mean": 1.0}}})
    tracker.finish(exit_code=1)
    assert not run_dir.exists()
    assert not (tmp_path / "wandb-home").exists()


def test_null_tracker_does_not_import_wandb() -> None:
    code = (
        "import sys; from omegaconf import OmegaConf; from editexp.tracking import tracking\n"
        "with tracking(OmegaConf.create({'name': 'none'}), {}, '.', 'x', None) as t:\n"
        "    t.log_update({'ES': 1.0}, 1)\n"
        "assert 'wandb' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_identity() -> None:
    overrides = ["algorithm=memit", "layer=3", "logger=wandb", "hydra.launcher.partition=debug"]
    assert run_identity(overrides, None) == ("algorithm=memit,layer=3", None)
    assert run_identity([], None) == ("default", None)
    assert run_identity(["logger.project=x", "hydra/launcher=slurm"], None) == ("default", None)
    sweep = "multirun/2024-06-01/12-00-00"
    assert run_identity(["layer=[4,5]"], sweep) == ("layer=[4,5]", "2024-06-01/12-00-00")
    layer_search = ["+experiment=layer_search", "algorithm=rome", "layer=0"]
    sweep = "/scratch/me/multirun/layer_search/smollm2-135m/2024-06-01_12-00-00"
    assert run_identity(layer_search, sweep) == (
        "algorithm=rome,layer=0",
        "layer_search/smollm2-135m/2024-06-01_12-00-00",
    )
    assert run_identity(layer_search, None) == ("algorithm=rome,layer=0", "layer_search")
    assert run_identity(["layer=1"], "/data/sweeps/exp7") == ("layer=1", "exp7")
