"""Sweeps end to end: SLURM and local launchers, the experiment presets, failing grid points and
the launcher scripts.

Every sweep runs ``editexp -m`` as a subprocess on the tiny Llama-3 with small settings, as a
user would. The SLURM test needs a cluster: the ``slurm_cluster`` fixture uses a running one
(``sinfo`` answers) or starts launchers/local-slurm (as root) and stops it at the end; if other
jobs hold every CPU of the node, it skips and names them.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, PROJECT, TINY_RUN
from console_scripts import (
    TWO_UPDATES,
    job_dirs,
    multirun,
    read_jsonl,
    run_command,
    sweep_environment,
    tail,
)
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb_offline import read_run

import editexp  # noqa: F401  (registers the resolvers the presets use)
from editexp.report import collect, grid_status

LOCAL_SLURM = PROJECT / "launchers" / "local-slurm"
REPORT = shutil.which("editexp-report", path=str(Path(sys.executable).parent)) or "editexp-report"

SLURM_LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=4",
]
UPDATE_KEYS = {
    *(f"per_update/{key}" for key in ("ES", "PS", "NS", "S", "delta_norm", "preservation_error")),
    *(f"edited_so_far/{key}" for key in ("ES", "PS", "NS", "S")),
    "edits_done",
}


# --------------------------------------------------------------------------- the SLURM cluster

USABLE_STATES = {"idle", "mixed", "allocated", "completing"}


def _sinfo_works() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and bool(USABLE_STATES & set(result.stdout.split()))


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """A usable SLURM cluster: the running one, or launchers/local-slurm started (and stopped)."""
    if _sinfo_works():
        yield
        return
    start = LOCAL_SLURM / "start.sh"
    try:
        result = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as error:
        output = _text(error.stdout) + _text(error.stderr)
        pytest.skip(f"no SLURM cluster: {start} did not finish in 900 s:\n{tail(output)}")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.skip(
            f"no SLURM cluster: sinfo does not answer and {start} failed "
            f"(exit {result.returncode}; it needs root):\n{tail(output)}"
        )
    started = re.search(r"started by this script: (.*)\)", result.stdout)
    started_here = started is not None and started.group(1).strip() != "nothing"
    yield
    if started_here:
        subprocess.run(["bash", str(LOCAL_SLURM / "stop.sh")], timeout=120, check=False)


def slurm_busy_reason(cpu_counts: str, queue: str) -> str | None:
    """Why a 1-CPU job could not start now, or None.

    ``cpu_counts`` is ``sinfo -h -o %C`` ("allocated/idle/other/total" per partition line),
    ``queue`` is ``squeue -h -o "%i %T %C"``. A test job behind other users' hour-long jobs
    would only time out, so the test says which jobs hold the node instead.
    """
    idle = sum(int(line.split("/")[1]) for line in cpu_counts.split())
    if idle > 0:
        return None
    jobs = "; ".join(line.strip() for line in queue.strip().splitlines()) or "none listed"
    return (
        f"every CPU of the SLURM node is held by other jobs (squeue: {jobs}); the SLURM test "
        "needs one free CPU: wait for those jobs or scancel them"
    )


@pytest.fixture
def free_slurm_cpu(slurm_cluster):
    """The cluster, with a CPU free for the test's jobs (skip, naming the jobs, if none is)."""

    def ask(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout

    reason = slurm_busy_reason(
        ask("sinfo", "-h", "-o", "%C"), ask("squeue", "-h", "-o", "%i %T %C")
    )
    if reason is not None:
        pytest.skip(reason)


def test_a_busy_slurm_node_is_named_instead_of_waited_on():
    assert slurm_busy_reason("1/1/0/2", "69_3 RUNNING 1") is None
    reason = slurm_busy_reason("2/0/0/2", "69_3 RUNNING 2\n69_7 PENDING 2\n")
    assert reason is not None and "69_3 RUNNING 2; 69_7 PENDING 2" in reason


# --------------------------------------------------------------------------- running sweeps


def job_dir_with(sweep_dir: Path, override: str) -> Path | None:
    matches = [d for overrides, d in job_dirs(sweep_dir).items() if override in overrides]
    assert len(matches) <= 1, matches
    return matches[0] if matches else None


def assert_unfinished_wandb_runs_none(sweep_dir: Path) -> None:
    for run_file in sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"):
        assert read_run(run_file.parents[2])["exit_code"] is not None, f"{run_file} unfinished"


def check_tracked_grid_point(job_dir: Path, sweep_dir: Path, layer: int, swept: str) -> None:
    """summary.json has the layer; the grid point's own W&B run recorded the same summary and
    one history row per update (the metrics of batches.jsonl) and finished cleanly."""
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["layer"] == [layer]
    assert summary["edits_done"] == 2
    batches = read_jsonl(job_dir / "batches.jsonl")

    run = read_run(job_dir)  # exactly one offline run, under this job's directory
    assert run["exit_code"] == 0
    assert run["config"]["layer"] == layer
    assert run["summary"]["edits_done"] == 2
    for block in ("pre", "post"):
        for metric in ("ES", "PS", "NS", "S"):
            expected = summary[block][metric]["mean"]
            assert run["summary"][f"{block}/{metric}/mean"] == pytest.approx(expected)
    assert run["summary"]["ES"] == pytest.approx(summary["post"]["ES"]["mean"])
    assert run["summary"]["update_mean/delta_norm"] == pytest.approx(
        summary["update_mean"]["delta_norm"]
    )

    updates = [row for row in run["history"] if "edits_done" in row]
    assert [row["edits_done"] for row in updates] == [1, 2]
    for row, batch in zip(updates, batches, strict=True):
        assert UPDATE_KEYS <= set(row)
        assert row["per_update/ES"] == pytest.approx(batch["metrics"]["ES"])
        assert row["per_update/delta_norm"] == pytest.approx(batch["update"]["delta_norm"])

    meta = run["run"]
    assert swept in meta.display_name.split(",")
    assert meta.run_group == sweep_dir.name


def check_two_layer_sweep(sweep_dir: Path) -> None:
    jobs = {layer: job_dir_with(sweep_dir, f"layer={layer}") for layer in (1, 2)}
    assert all(jobs.values()), sorted(p.name for p in sweep_dir.iterdir())
    for layer, job_dir in jobs.items():
        check_tracked_grid_point(job_dir, sweep_dir, layer, f"layer={layer}")
    run_ids = {read_run(job_dir)["run"].run_id for job_dir in jobs.values()}
    assert len(run_ids) == 2

    status = grid_status(collect(sweep_dir))
    assert (status.complete, status.total) == (2, 2)


# --------------------------------------------------------------------------- launchers


@pytest.mark.slurm
def test_slurm_sweep_runs_every_grid_point_as_a_tracked_job(free_slurm_cpu, tmp_path):
    result, sweep_dir = multirun(
        tmp_path, *TINY_RUN, *TWO_UPDATES, "layer=1,2", "logger=wandb", *SLURM_LAUNCHER
    )
    assert result.returncode == 0, tail(result.stdout, 60)
    assert list(sweep_dir.glob(".submitit/*")), "no SLURM job was submitted"
    check_two_layer_sweep(sweep_dir)


def test_local_launcher_sweep(tmp_path):
    result, sweep_dir = multirun(
        tmp_path, *TINY_RUN, *TWO_UPDATES, "layer=1,2", "logger=wandb", "hydra/launcher=local"
    )
    assert result.returncode == 0, tail(result.stdout, 60)
    check_two_layer_sweep(sweep_dir)


# --------------------------------------------------------------------------- presets


def test_layer_search_preset_runs_and_reports(tmp_path):
    """The documented quick check: 2 algorithms x 4 layers of tiny-llama3, then the report."""
    result, sweep_dir = multirun(
        tmp_path,
        "+experiment=layer_search",
        *TINY_RUN,
        "n_edits=2",
        "eval.generation_facts=0",
        "logger=none",
    )
    assert result.returncode == 0, tail(result.stdout, 60)
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    points = sorted((s["algorithm"], s["layer"][0]) for s in summaries)
    assert points == sorted((a, layer) for a in ("rome", "memit") for layer in range(4))
    assert all(s["mode"] == "singular" and s["edits_done"] == 2 for s in summaries)

    report = run_command([REPORT, str(sweep_dir)], tmp_path, timeout=300)
    assert report.returncode == 0, report.stdout
    assert "8 of 8 grid points complete" in report.stdout
    out = sweep_dir / "report"
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    assert "| rome |" in (out / "results.md").read_text().lower()
    assert (out / "metric_vs_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def expand_sweep(*overrides: str) -> tuple[dict[str, list[str]], dict]:
    """The grid axes a preset gives Hydra's basic sweeper, and the composed job config."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    arguments = [f"{key}={OmegaConf.select(params, key)}" for key in params]
    axes = {
        override.get_key_element(): list(override.sweep_string_iterator())
        for override in OverridesParser.create().parse_overrides(arguments)
    }
    return axes, cfg


@pytest.mark.parametrize(
    ("overrides", "expected", "settings"),
    [
        (
            ["+experiment=layer_search", "model=smollm2-135m"],
            {"algorithm": ["rome", "memit"], "layer": [str(i) for i in range(30)]},
            {"mode": "singular", "n_edits": 1000},
        ),
        (
            ["+experiment=batch_scaling", "max_edits=256"],
            {"algorithm": ["memit", "emmet"], "n_edits": ["16", "64", "256"]},
            {"mode": "batch"},
        ),
        (
            ["+experiment=sequential_batch_scaling", "n_edits=256"],
            {"algorithm": ["memit", "emmet"], "batch_size": ["1", "16", "64", "256"]},
            {"mode": "sequential", "n_edits": 256},
        ),
        (
            ["+experiment=lambda_search", "algorithm=emmet"],
            {"lambda": ["0", "1e-07", "1e-06", "1e-05", "0.0001", "0.001", "0.01"]},
            {"mode": "batch", "n_edits": 1024},
        ),
        (
            ["+experiment=lambda_search", "algorithm=memit"],
            {"lambda": ["1", "10", "100", "1000", "10000", "50000", "100000", "500000", "1000000"]},
            {"mode": "batch", "n_edits": 1024},
        ),
    ],
    ids=[
        "layer_search",
        "batch_scaling",
        "sequential_batch_scaling",
        "lambda_emmet",
        "lambda_memit",
    ],
)
def test_presets_expand_to_the_documented_grids(overrides, expected, settings):
    axes, cfg = expand_sweep(*overrides)
    assert axes == expected
    for key, value in settings.items():
        assert cfg[key] == value
    experiment = overrides[0].split("=")[1]
    assert OmegaConf.select(cfg, "hydra.sweep.dir").startswith(f"multirun/{experiment}/")
    if experiment == "lambda_search":  # the job directories say their algorithm
        subdir = OmegaConf.to_container(cfg.hydra.sweep)["subdir"]
        assert subdir == "${algorithm.name}-${hydra.job.num}"


# --------------------------------------------------------------------------- failing grid points


def test_crashing_grid_point_does_not_stop_the_sweep_and_finishes_its_wandb_run(tmp_path):
    """Basic launcher: a point that fails mid-run (after its first update) is reported by a
    non-zero exit after the other points ran, and its W&B run is closed with exit code 1."""
    result, sweep_dir = multirun(
        tmp_path, *TINY_RUN, *TWO_UPDATES, "+debug.stop_after_updates=1,null", "logger=wandb"
    )
    assert result.returncode != 0
    assert "SimulatedCrash" in result.stdout
    crashed = job_dir_with(sweep_dir, "+debug.stop_after_updates=1")
    completed = job_dir_with(sweep_dir, "+debug.stop_after_updates=null")
    assert completed is not None, "the sweep stopped at the failing grid point"
    assert not (crashed / "summary.json").exists()
    crashed_run = read_run(crashed)
    assert crashed_run["exit_code"] == 1
    assert [row["edits_done"] for row in crashed_run["history"] if "edits_done" in row] == [1]
    check_tracked_grid_point(completed, sweep_dir, 1, "+debug.stop_after_updates=null")
    assert_unfinished_wandb_runs_none(sweep_dir)


@pytest.mark.parametrize(
    ("launcher", "layers"),
    # basic: the refused point first, or nothing would follow it; local: last, so that the
    # Hydra process does not return while the valid point still runs in the background
    [("basic", "2,1"), ("local", "1,2")],
)
def test_a_point_refused_when_it_starts_fails_only_its_grid_point(tmp_path, launcher, layers):
    """A point that passes the sweep's checks but is refused when it starts (here: a link
    planted as its lock file) fails its grid point only. It must stay an Exception in a
    multirun: a SystemExit escapes Hydra's run_job, which stops the basic launcher's sweep, and
    a submitit job then writes no result (the launcher fails, or hangs on a SLURM cluster
    without accounting). Bad configs are refused before any point starts
    (tests/test_sweep_check.py)."""
    launcher_args = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    refused_num = layers.split(",").index("2")
    lock = tmp_path / "sweep" / str(refused_num) / ".editexp.lock"
    lock.parent.mkdir(parents=True)
    lock.symlink_to(tmp_path / "outside.txt")
    result, sweep_dir = multirun(
        tmp_path, *TINY_RUN, "n_edits=1", f"layer={layers}", "logger=wandb", *launcher_args
    )
    assert result.returncode != 0
    assert ".editexp.lock is a symbolic link" in result.stdout
    assert not (tmp_path / "outside.txt").exists()
    valid = job_dir_with(sweep_dir, "layer=1")
    assert valid is not None and (valid / "summary.json").is_file(), "the sweep stopped"
    refused = job_dir_with(sweep_dir, "layer=2")
    assert not (refused / "summary.json").exists()
    assert not (refused / "wandb").exists()  # refused before any W&B run started
    assert_unfinished_wandb_runs_none(sweep_dir)
    # Every submitit job handed its outcome back (a failed JobReturn for the refused point).
    tasks = [p for p in sweep_dir.glob(".submitit/*") if p.is_dir() and p.name[0].isdigit()]
    assert all(list(task.glob("*_result.pkl")) for task in tasks), tasks


# --------------------------------------------------------------------------- launcher scripts


def dry_run(script: str, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The commands a launcher script prints with DRY_RUN=1 (lines starting with "+ ")."""
    command = ["bash", str(PROJECT / "launchers" / script), *args]
    process = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**sweep_environment(tmp_path), "DRY_RUN": "1", **env},
    )
    assert process.returncode == 0, process.stdout + process.stderr
    assert f"editexp-report {tmp_path / 'sw'}" in process.stdout
    return [line[2:] for line in process.stdout.splitlines() if line.startswith("+ ")]


SCRIPT_ENV = {"PARTITION": "gpu", "ACCOUNT": "proj", "TIME_MIN": "90", "SWEEP_DIR": "sw"}


@pytest.mark.parametrize(
    "experiment", ["layer_search", "lambda_search", "batch_scaling", "sequential_batch_scaling"]
)
def test_launcher_script_commands(tmp_path, experiment):
    commands = dry_run(f"{experiment}.sh", tmp_path, "model=tiny-llama3", "n_edits=8", **SCRIPT_ENV)
    stats = [c for c in commands if "editexp-stats" in c]
    sweeps = [c for c in commands if c.startswith("editexp -m")]
    assert stats and all(c.startswith("srun ") for c in stats)
    for command in stats:
        assert "--partition=gpu --account=proj --gpus-per-node=1" in command
        assert "model=tiny-llama3" in command and "n_edits" not in command
    if experiment == "layer_search":
        (command,) = stats
        assert command.endswith("layer=[0,1,2,3]")
    assert len(sweeps) == (2 if experiment == "lambda_search" else 1)
    for index, command in enumerate(sweeps):
        words = command.split()
        sweep_dir = tmp_path / "sw"
        if experiment == "lambda_search":  # one directory per algorithm below SWEEP_DIR
            sweep_dir = sweep_dir / ["memit", "emmet"][index]
        assert f"+experiment={experiment}" in words and "hydra/launcher=slurm" in words
        for setting in (
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.gpus_per_node=1",
            f"hydra.sweep.dir={sweep_dir}",
        ):
            assert setting in words
        assert words[-2:] == ["model=tiny-llama3", "n_edits=8"]  # arguments come last
    if experiment == "lambda_search":
        assert ["algorithm=memit" in sweeps[0], "algorithm=emmet" in sweeps[1]] == [True, True]


def test_layer_search_script_groups_statistics_and_runs_them_locally(tmp_path):
    commands = dry_run(
        "layer_search.sh",
        tmp_path,
        "model=tiny-llama3",
        "stats.n_tokens=3000",
        SWEEP_DIR="sw",
        STATS="local",
        STATS_GROUP="3",
        GPUS="0",
    )
    assert commands[:2] == [
        "editexp-stats model=tiny-llama3 model=tiny-llama3 stats.n_tokens=3000 layer=[0,1,2]",
        "editexp-stats model=tiny-llama3 model=tiny-llama3 stats.n_tokens=3000 layer=[3]",
    ]
    assert "hydra.launcher.gpus_per_node=null" in commands[2].split()


def study_dry_run(script: str, tmp_path: Path, study: Path, stages: str, **env: str) -> list[str]:
    """The editexp commands a study launcher prints for ``stages`` with DRY_RUN=1 (its
    choices read from the finished runs under ``study``)."""
    process = subprocess.run(
        ["bash", str(PROJECT / "launchers" / script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            **sweep_environment(tmp_path),
            "DRY_RUN": "1",
            "STUDY_DIR": str(study),
            "STAGES": stages,
            **env,
        },
    )
    assert process.returncode == 0, process.stdout + process.stderr
    return [line[2:] for line in process.stdout.splitlines() if line.startswith("+ editexp ")]


def test_study_script_takes_each_stage_from_the_previous_ones_results(tmp_path):
    """launchers/study_smollm2.sh: stage 1 is the layer search; stages 2-4 use the best layer
    (MEMIT's, by S) and the best lambdas of the finished runs before them."""
    from test_report import _job, _summary

    study = tmp_path / "study"
    _job(study / "layer_search", 0, ["layer=1"], _summary(layer=[1], post=(90, 80, 60)))
    _job(study / "layer_search", 1, ["layer=5"], _summary(layer=[5], post=(95, 90, 70)))
    for num, lam in enumerate((100.0, 1000.0)):
        post = (90, 85, 60 + num)
        _job(
            study / "lambda_search" / "memit", num, [f"lambda={lam}"], _summary(lam=lam, post=post)
        )
    _job(study / "lambda_search" / "emmet", 0, ["lambda=0"], _summary("emmet", lam=0.0))

    def commands(stages: str) -> list[str]:
        return study_dry_run("study_smollm2.sh", tmp_path, study, stages)

    (layer_search,) = commands("1")
    assert "+experiment=layer_search" in layer_search and "n_edits=40" in layer_search.split()
    (lambda_memit, lambda_emmet, batch, *sequential) = commands("2 3 4")
    assert "algorithm=memit" in lambda_memit and "layer=5" in lambda_memit.split()
    assert "algorithm=emmet" in lambda_emmet
    chosen = ["layer=5", "model.hparams.memit.lambda=1000", "model.hparams.emmet.lambda=0"]
    for command in [batch, *sequential]:
        assert set(chosen) <= set(command.split()), command
    assert "max_edits=1024" in batch.split() and len(sequential) == 3
    assert {f"hydra.sweep.dir={study}/sequential/{name}" for name in ("256", "rome", "1024")} == {
        word for command in sequential for word in command.split() if "sweep.dir" in word
    }


def test_paper_scale_study_runs_the_grid_its_budget_section_names(tmp_path):
    """launchers/study_paper_scale.sh with PRECISION=bf16-mixed, stages 3-6: every grid point in
    bf16-mixed except EMMET's one batch of 1024 or more (docs/precision.md); and the grid of the
    third revision (docs/study-smollm2.md, "Budget and its revisions"): no GE after stage 3,
    MEMIT 1024x2 and 256x8 on 2048 edits, MEMIT and EMMET 256x4 on 1024, the remedies at 256x4,
    the repeats one fact set per sweep."""
    from test_report import _job, _summary

    study = tmp_path / "study"
    _job(study / "layer_search", 0, ["layer=2"], _summary(layer=[2], post=(95, 90, 70)))
    memit = study / "lambda_search" / "512" / "memit"
    _job(memit, 0, ["lambda=1000"], _summary(lam=1000.0))
    emmet = study / "lambda_search" / "512" / "emmet"
    _job(emmet, 0, ["lambda=0"], _summary("emmet", lam=0.0, post=(95, 90, 70)))
    _job(emmet, 1, ["lambda=10"], _summary("emmet", lam=10.0, post=(90, 80, 70)))
    commands = study_dry_run(
        "study_paper_scale.sh", tmp_path, study, "3 4 5 6", PRECISION="bf16-mixed"
    )
    sweeps = {}
    for line in commands:
        if line.startswith("editexp -m"):
            words = line.split()
            (sweep_dir,) = [w.split("=", 1)[1] for w in words if w.startswith("hydra.sweep.dir=")]
            (precision,) = [w for w in words if w.startswith("precision=")]
            sweeps[Path(sweep_dir).relative_to(study).as_posix()] = (precision, words)
    float32 = {"batch_scaling/emmet-lambda0-1024", "batch_scaling/emmet-positive"}
    assert {name for name, (p, _) in sweeps.items() if p == "precision=32-true"} == float32
    assert all(p == "precision=bf16-mixed" for n, (p, _) in sweeps.items() if n not in float32)
    for name, (_, words) in sweeps.items():
        assert {"layer=2", "model.hparams.emmet.lambda=0"} <= set(words), name
    assert "n_edits=1024" in sweeps["batch_scaling/emmet-lambda0-1024"][1]
    assert "lambda=10" in sweeps["batch_scaling/emmet-positive"][1]  # its best positive lambda
    for name, (_, words) in sweeps.items():  # the budget's cuts: no GE after stage 3
        ge = [w for w in words if w.startswith("eval.generation_facts=")]
        assert ge == ["eval.generation_facts=100" if name.startswith("batch_scaling/") else
                      "eval.generation_facts=0"], name  # fmt: skip
    grid = {
        "sequential/256-emmet": {"algorithm=emmet", "n_edits=1024", "batch_size=256"},
        "sequential/1024": {"algorithm=memit", "n_edits=2048", "batch_size=1024"},
        "sequential/256": {"algorithm=memit", "n_edits=2048,1024", "batch_size=256"},
        "remedies": {"algorithm=memit,alphaedit", "n_edits=1024", "batch_size=256"},
        **{
            f"repeats/256/set{k}": {f"data.fact_set={k}", "n_edits=256", "batch_size=256,64,16"}
            for k in range(3)
        },
    }
    assert set(sweeps) - {n for n in sweeps if n.startswith("batch_scaling/")} == set(grid)
    for name, expected in grid.items():
        words = sweeps[name][1]
        assert expected <= set(words), name
        assert len([w for w in words if w.startswith("n_edits=")]) == 1, name


def test_paper_scale_study_reads_its_choices_from_the_committed_reports(tmp_path):
    """On a fresh machine (no stage 1-2 runs), the layer and lambdas come from the reports
    committed for those stages (results.csv, best post-edit S, the lambda search at 512 facts
    only); where neither exists, a real run stops with one line instead of running stage 3
    with an empty override."""
    reports = tmp_path / "reports"
    (reports / "layer_search").mkdir(parents=True)
    (reports / "lambda_search").mkdir()
    fields = ["algorithm", "layer", "lambda", "post_S_mean", "run_dir"]

    def table(name: str, rows: list[tuple]) -> None:
        with (reports / name / "results.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(fields)
            writer.writerows(rows)

    table("layer_search", [("memit", 2, 1, 90, "0"), ("memit", 4, 1, 95, "1"),
                           ("rome", 7, "", 99, "2")])  # fmt: skip
    table("lambda_search", [("memit", 4, 100, 80, "512/memit/memit-0"),
                            ("memit", 4, 1000, 85, "512/memit/memit-1"),
                            ("memit", 4, 10, 99, "256/memit/memit-0"),  # another size
                            ("emmet", 4, 0, 90, "512/emmet/emmet-0"),
                            ("emmet", 4, 0.0001, 88, "512/emmet/emmet-1")])  # fmt: skip
    study = tmp_path / "study"
    commands = study_dry_run("study_paper_scale.sh", tmp_path, study, "3", REPORTS=str(reports))
    chosen = {"layer=4", "model.hparams.memit.lambda=1000", "model.hparams.emmet.lambda=0"}
    sweeps = [c for c in commands if c.startswith("editexp -m")]
    assert len(sweeps) == 4 and all(chosen <= set(c.split()) for c in sweeps), sweeps
    assert "lambda=0.0001" in sweeps[-1].split()  # EMMET's best positive lambda

    env = {**sweep_environment(tmp_path), "STUDY_DIR": str(study), "STAGES": "3",
           "REPORTS": str(tmp_path / "none"), "ARCHIVE": str(tmp_path / "no-archive")}  # fmt: skip
    script = PROJECT / "launchers" / "study_paper_scale.sh"
    process = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, env=env)  # fmt: skip
    assert process.returncode != 0 and "+ editexp" not in process.stdout, process.stdout
    assert f"no runs in {study}/layer_search and no committed report" in process.stderr
