"""Tracking: offline W&B runs read back from their .wandb files, NullTracker, run identities,
and a real runner run: config axes, headline summary, per-update history, facts table,
artifact, and a resumed run continuing the same W&B run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_config
from omegaconf import OmegaConf
from wandb_offline import read_run, read_runs

from editexp.tracking import (
    NullTracker,
    RunAxes,
    WandbIdentity,
    fact_table_data,
    flat_axes,
    run_id_for,
    run_identity,
    summary_metrics,
    sweep_group,
    tracking,
)

WANDB_CFG = {
    "name": "wandb",
    "project": "editexp-test",
    "entity": None,
    "mode": "offline",
    "tags": ["test"],
    "job_type": None,
    "log_deltas": True,
}
HEADLINE = ("ES", "PS", "NS", "S", "GE")


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def identity(run_dir: Path, name: str = "default", group: str | None = None) -> WandbIdentity:
    return WandbIdentity(run_id_for(run_dir), name, group, None)


def log_one(tracker, step: int = 1) -> None:
    tracker.log_update(step, step, {"ES": 100.0}, {"ES": 50.0}, {"delta_norm": 1.0})


# --------------------------------------------------------------------------- unit level


def test_tracker_records_updates_results_and_identity(tmp_path: Path) -> None:
    run_dir = tmp_path / "multirun" / "0"
    ident = WandbIdentity(run_id_for(run_dir), "layer=3", "sweep-a", "layer_search")
    config = {"model": "tiny", "algorithm": "memit", "cfg": {"algorithm": {"name": "memit"}}}
    with tracking(OmegaConf.create(WANDB_CFG), ident, config, run_dir, ["tiny", "memit"]) as t:
        for i in range(3):
            t.log_update(
                i + 1, 16 * (i + 1), {"ES": 50.0 + i}, {"ES": 60.0 + i}, {"delta_norm": float(i)}
            )
        summary_file = run_dir / "summary.json"
        summary_file.write_text("{}")
        summary = {"post": {"ES": {"mean": 70.0, "std": 1.0, "n": 4}}, "edits_done": 48}
        rows = [{"case_id": 7, "batch": 0, "pre": {"ES": 0.0}, "post": {"ES": 1.0}}]
        t.log_results(summary, 4, rows, [summary_file, run_dir / "missing.pt"])
    t.finish()  # idempotent

    run = read_run(run_dir)
    updates = [row for row in run["history"] if "edits_done" in row]
    assert [
        {k: v for k, v in row.items() if not k.startswith(("_", "facts"))} for row in updates
    ] == [
        {
            "per_update/ES": 50.0 + i,
            "per_update/delta_norm": float(i),
            "edited_so_far/ES": 60.0 + i,
            "edits_done": 16 * (i + 1),
        }
        for i in range(3)
    ]
    assert [row["_step"] for row in run["history"]] == [1, 2, 3, 4]
    assert run["history"][-1]["facts/_type"] == "table-file"
    assert run["summary"]["ES"] == 70.0
    assert run["summary"]["post/ES/mean"] == 70.0
    assert run["exit_code"] == 0
    meta = run["run"]
    assert (meta.run_id, meta.display_name, meta.run_group) == (ident.run_id, "layer=3", "sweep-a")
    assert meta.job_type == "layer_search"
    assert list(meta.tags) == ["tiny", "memit", "test"]
    assert run["config"]["model"] == "tiny"
    assert run["config"]["cfg"] == {"algorithm": {"name": "memit"}}
    (artifact,) = [a for a in run["artifacts"] if a["type"] == "results"]
    assert artifact["name"] == f"results-{ident.run_id}"
    assert set(artifact["files"]) == {"summary.json"}  # missing files are left out
    assert json.loads((run_dir / "wandb" / "editexp-identity.json").read_text())["group"] == (
        "sweep-a"
    )


@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit(-1)])
def test_exception_finishes_run_with_failure(tmp_path: Path, error: BaseException) -> None:
    """Also submitit's sys.exit(-1) after requeueing a preempted job."""
    cfg = OmegaConf.create(WANDB_CFG)
    with pytest.raises(type(error)):
        with tracking(cfg, identity(tmp_path), {}, tmp_path) as tracker:
            log_one(tracker)
            raise error
    run = read_run(tmp_path)
    assert run["exit_code"] == 1
    assert len(run["history"]) == 1


def test_two_runs_in_one_process(tmp_path: Path) -> None:
    cfg = OmegaConf.create(WANDB_CFG)
    for name in ("a", "b"):
        with tracking(cfg, identity(tmp_path / name, name, "g"), {}, tmp_path / name) as tracker:
            log_one(tracker)
    runs = [read_run(tmp_path / name) for name in ("a", "b")]
    assert [run["run"].display_name for run in runs] == ["a", "b"]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    assert all(run["exit_code"] == 0 for run in runs)


def test_second_attempt_continues_the_same_run(tmp_path: Path) -> None:
    cfg = OmegaConf.create(WANDB_CFG)
    with tracking(cfg, identity(tmp_path), {}, tmp_path) as first:
        assert not first.continues
        log_one(first, step=1)
    with tracking(cfg, identity(tmp_path), {}, tmp_path) as second:
        assert second.continues  # the earlier attempt's files are there
        log_one(second, step=2)
    attempts = read_runs(tmp_path)
    assert [run["run"].run_id for run in attempts] == [run_id_for(tmp_path)] * 2
    assert [row["_step"] for run in attempts for row in run["history"]] == [1, 2]


def test_run_id_is_stable_per_directory(tmp_path: Path) -> None:
    assert run_id_for(tmp_path / "a") == run_id_for(tmp_path / "a" / ".." / "a")
    assert run_id_for(tmp_path / "a") != run_id_for(tmp_path / "b")
    assert run_id_for(tmp_path / "a", fresh=True) != run_id_for(tmp_path / "a")
    assert len(run_id_for(tmp_path)) <= 64


def test_wandb_mode_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.create(WANDB_CFG)
    with tracking(cfg, identity(tmp_path), {}, tmp_path) as tracker:
        log_one(tracker)
    assert not list(tmp_path.glob("wandb/offline-run-*"))


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = OmegaConf.create({"name": "none"})
    with tracking(cfg, identity(run_dir), {}, run_dir) as tracker:
        assert isinstance(tracker, NullTracker)
        log_one(tracker)
        tracker.log_results({"post": {"ES": {"mean": 1.0}}}, 2, [], [])
    tracker.finish(exit_code=1)
    assert not run_dir.exists()
    assert not (tmp_path / "wandb-home").exists()


def test_null_tracker_does_not_import_wandb() -> None:
    code = (
        "import sys; from omegaconf import OmegaConf\n"
        "from editexp.tracking import WandbIdentity, tracking\n"
        "ident = WandbIdentity('x', 'x', None, None)\n"
        "with tracking(OmegaConf.create({'name': 'none'}), ident, {}, '.') as t:\n"
        "    t.log_update(1, 1, {'ES': 1.0}, {}, {})\n"
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
    assert sweep_group("/data/sweeps/exp7") == "exp7"


def test_flat_axes_are_scalars() -> None:
    common = dict(batch_size=64, n_edits=64, mode="batch", eval_schedule="each_batch")
    one = flat_axes(
        RunAxes(model="m", algorithm="memit", layers=(1,), lam=15000.0, experiment=None, **common)
    )
    assert one == {
        "model": "m",
        "algorithm": "memit",
        "layer": 1,
        "batch_size": 64,
        "n_edits": 64,
        "lambda": 15000.0,
        "mode": "batch",
        "experiment": "none",
        "precision": "32-true",
        "eval_schedule": "each_batch",
    }
    many = flat_axes(
        RunAxes(model="m", algorithm="memit", layers=(4, 5, 6), lam=1.0, experiment="x", **common)
    )
    assert (many["layer"], many["experiment"]) == ("4,5,6", "x")


def test_summary_metrics_headline_is_post_mean() -> None:
    summary = {
        "algorithm": "memit",
        "layer": [1],
        "pre": {"ES": {"mean": 10.0, "std": 1.0, "n": 4}},
        "post": {"ES": {"mean": 75.0, "std": 2.0, "n": 4}, "S": {"mean": 60.0}},
        "update_mean": {"delta_norm": 2.0},
        "timing": {"total": 3.0},
        "edits_done": 4,
        "device": "cpu",
        "threads": 2,
    }
    assert summary_metrics(summary) == {
        "ES": 75.0,
        "S": 60.0,
        "pre/ES/mean": 10.0,
        "pre/ES/std": 1.0,
        "pre/ES/n": 4,
        "post/ES/mean": 75.0,
        "post/ES/std": 2.0,
        "post/ES/n": 4,
        "post/S/mean": 60.0,
        "update_mean/delta_norm": 2.0,
        "timing/total": 3.0,
        "edits_done": 4,
        "device": "cpu",  # where it ran: the run's CPU-hours are its seconds x threads
        "threads": 2,
    }


def test_fact_table_data() -> None:
    rows = [
        {
            "case_id": 3,
            "batch": 1,
            "pre": {"case_id": 3, "ES": 0.0, "scores": {}},
            "post": {"case_id": 3, "ES": 1.0, "GE": 6.1, "generation_texts": ["a b", "c"]},
        },
        {"case_id": 4, "batch": 1, "pre": {"ES": 1.0}, "post": {"ES": 0.0}},
    ]
    text = {3: {"prompt": "P3", "target_true": "T", "target_new": "N"}}
    columns, data = fact_table_data(rows, text)
    assert columns == [
        "case_id",
        "batch",
        "prompt",
        "target_true",
        "target_new",
        "pre_ES",
        "post_ES",
        "pre_GE",
        "post_GE",
        "post_generation",
    ]
    assert data == [
        [3, 1, "P3", "T", "N", 0.0, 1.0, None, 6.1, "a b"],
        [4, 1, None, None, None, 1.0, 0.0, None, None, None],
    ]


# --------------------------------------------------------------------------- a real run


def _run(tmp_path: Path, run_dir: Path, *overrides: str, experiment: str | None = None):
    from editexp.runner import run

    cfg = compose_config(*TINY_RUN, "logger=wandb", "logger.project=editexp-test", *overrides)
    record = run(cfg, run_dir, list(overrides), str(tmp_path / "multirun" / "s1"), experiment)
    return record.to_json()


def test_runner_wandb_run_holds_the_result(tmp_path: Path) -> None:
    """Sequential MEMIT, 2 updates of 2 facts: config, headline, history, table, artifact."""
    run_dir = tmp_path / "multirun" / "s1" / "0"
    overrides = ("mode=sequential", "n_edits=4", "batch_size=2", "algorithm=memit")
    summary = _run(tmp_path, run_dir, *overrides, experiment="sequential_batch_scaling")
    run = read_run(run_dir)
    assert run["exit_code"] == 0

    config = run["config"]
    assert {k: config[k] for k in ("model", "algorithm", "layer", "mode", "experiment")} == {
        "model": "tiny-llama3",
        "algorithm": "memit",
        "layer": 1,
        "mode": "sequential",
        "experiment": "sequential_batch_scaling",
    }
    assert (config["batch_size"], config["n_edits"]) == (2, 4)
    assert config["lambda"] == summary["lambda"] == 100.0  # the model's default, not null
    assert config["cfg"]["lambda"] is None and config["cfg"]["model"]["name"] == "tiny-llama3"
    meta = run["run"]
    assert meta.job_type == "sequential_batch_scaling"
    assert set(meta.tags) == {"tiny-llama3", "memit"}
    assert meta.run_group == "s1"
    assert meta.run_id == run_id_for(run_dir)

    for metric in HEADLINE:
        if metric in summary["post"]:
            assert run["summary"][metric] == pytest.approx(summary["post"][metric]["mean"])
            assert run["summary"][f"post/{metric}/mean"] == run["summary"][metric]
        if metric in summary["pre"]:
            assert run["summary"][f"pre/{metric}/mean"] == pytest.approx(
                summary["pre"][metric]["mean"]
            )
    assert "layer" not in run["summary"]  # axes live in the config

    batches = [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]
    updates = [row for row in run["history"] if "edits_done" in row]
    assert [row["edits_done"] for row in updates] == [2, 4]
    for row, batch in zip(updates, batches, strict=True):
        assert row["per_update/ES"] == pytest.approx(batch["metrics"]["ES"])
        assert row["per_update/delta_norm"] == pytest.approx(batch["update"]["delta_norm"])
        assert row["edited_so_far/ES"] == pytest.approx(batch["edited_so_far"]["ES"]["mean"])
    # each_batch: after the last update the running mean over all facts is the run's result
    assert updates[-1]["edited_so_far/ES"] == pytest.approx(summary["post"]["ES"]["mean"])
    assert batches[0]["edited_so_far"]["ES"]["n"] == 2
    assert batches[1]["edited_so_far"]["ES"]["n"] == 4

    table = run["history"][-1]
    assert table["facts/_type"] == "table-file" and table["facts/nrows"] == 4
    (table_file,) = run_dir.glob("wandb/offline-run-*/files/media/table/facts_*.table.json")
    content = json.loads(table_file.read_text())
    assert content["columns"][:5] == ["case_id", "batch", "prompt", "target_true", "target_new"]
    facts = [json.loads(line) for line in (run_dir / "facts.jsonl").read_text().splitlines()]
    assert [row[0] for row in content["data"]] == [fact["case_id"] for fact in facts]
    post_es = content["columns"].index("post_ES")
    assert [row[post_es] for row in content["data"]] == [f["post"]["ES"] for f in facts]

    (artifact,) = [a for a in run["artifacts"] if a["type"] == "results"]
    assert set(artifact["files"]) == {
        "summary.json",
        "facts.jsonl",
        "batches.jsonl",
        "deltas.pt",
    }
    assert artifact["files"]["deltas.pt"] == str(run_dir / "deltas.pt")


def test_runner_resumed_run_continues_the_wandb_run(tmp_path: Path) -> None:
    """A crash after update 1 of 2, then the same command: one W&B id, steps 1 then 2 (no
    update logged twice), the second attempt holds the result; deltas opted out."""
    from editexp.runner import SimulatedCrash

    run_dir = tmp_path / "multirun" / "s1" / "0"
    overrides = ("mode=sequential", "n_edits=2", "batch_size=1", "logger.log_deltas=false")
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, run_dir, *overrides, "+debug.stop_after_updates=1")
    summary = _run(tmp_path, run_dir, *overrides, "+debug.stop_after_updates=null")
    first, second = read_runs(run_dir)
    assert first["run"].run_id == second["run"].run_id == run_id_for(run_dir)
    assert (first["exit_code"], second["exit_code"]) == (1, 0)
    steps = [
        (row["_step"], row["edits_done"])
        for attempt in (first, second)
        for row in attempt["history"]
        if "edits_done" in row
    ]
    assert steps == [(1, 1), (2, 2)]
    assert second["summary"]["ES"] == pytest.approx(summary["post"]["ES"]["mean"])
    (artifact,) = [a for a in second["artifacts"] if a["type"] == "results"]
    assert "deltas.pt" not in artifact["files"] and (run_dir / "deltas.pt").is_file()


def test_runner_singular_run_headline_is_the_result(tmp_path: Path) -> None:
    """The issue's case: a singular run's last update says ES=100 or 0; the headline is the
    mean over all facts."""
    run_dir = tmp_path / "multirun" / "s1" / "0"
    summary = _run(tmp_path, run_dir, "mode=singular", "n_edits=3", "algorithm=rome")
    run = read_run(run_dir)
    assert run["summary"]["ES"] == pytest.approx(summary["post"]["ES"]["mean"])
    assert run["config"]["batch_size"] == 1 and run["config"]["lambda"] is None
    assert run["run"].job_type == "run"
    updates = [row for row in run["history"] if "edits_done" in row]
    assert [row["edits_done"] for row in updates] == [1, 2, 3]


# --------------------------------------------------------------------------- the report


def _job(root: Path, num: int, group: str | None, layer: int) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    block = {m: {"mean": 50.0 + layer, "std": 5.0, "n": 8} for m in ("ES", "PS", "NS", "GE")}
    summary = {
        "algorithm": "memit", "model": "tiny", "layer": [layer], "mode": "batch",
        "batch_size": 8, "n_edits": 8, "lambda": 10.0 * (num + 1), "keep_edits": False,
        "nullspace_threshold": None, "null_space_dim": None, "eval_schedule": "each_batch",
        "every_k": None, "edits_done": 8, "seed": 0, "hparams": {}, "pre": block,
        "post": block, "update_mean": None, "timing": {}, "run_dir": str(job),
    }  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))
    if group is not None:
        identity = {"id": f"x{num}", "group": group, "project": "editexp-test"}
        (job / "wandb").mkdir()
        (job / "wandb" / "editexp-identity.json").write_text(json.dumps(identity))
    return job


def test_report_logs_figures_and_tables_to_the_sweeps_group(tmp_path: Path) -> None:
    from editexp.report import main

    root = tmp_path / "multirun" / "layers"
    for num, layer in enumerate((1, 2)):
        _job(root, num, "layers-group", layer)
    assert main([str(root), "--wandb"]) == 0
    report = root / "report"
    run = read_run(report)
    meta = run["run"]
    assert (meta.run_group, meta.job_type, meta.project) == (
        "layers-group",
        "report",
        "editexp-test",
    )
    (row,) = run["history"]
    assert row["figures/metric_vs_layer/_type"] == "image-file"
    assert row["figures/metric_vs_lambda/_type"] == "image-file"
    assert row["tables/results/_type"] == "table-file"
    assert row["tables/results/nrows"] == 2
    assert row["tables/lambda_memit/_type"] == "table-file"
    (artifact,) = [a for a in run["artifacts"] if a["type"] == "report"]
    assert {"results.csv", "results.md", "metric_vs_layer.png", "metric_vs_layer.pdf"} <= set(
        artifact["files"]
    )
    assert run["exit_code"] == 0


def test_report_group_without_one_common_group(tmp_path: Path) -> None:
    """lambda_search: one sweep per algorithm below one directory, each its own group."""
    from editexp.tracking import report_group

    root = tmp_path / "multirun" / "lambda_search" / "tiny"
    dirs = [_job(root / "memit", 0, "lambda_search/tiny/memit", 1)]
    dirs.append(_job(root / "emmet", 0, "lambda_search/tiny/emmet", 1))
    assert report_group(dirs, root) == "lambda_search/tiny"
    assert report_group(dirs[:1], root) == "lambda_search/tiny/memit"
    assert report_group([tmp_path], root) == "lambda_search/tiny"  # no W&B runs recorded
