"""The Hydra task function of ``editexp`` (:mod:`editexp.cli` calls it once a run starts): one
run or one grid point of a multirun, on the CPUs a SLURM job was given; a refused single run
leaves no new directory behind; Ctrl-C says where the run stopped and how to resume.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from editexp.config import ConfigError, check_appended, run_settings
from editexp.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, cli_errors, one_line
from editexp.record import RunRecord
from editexp.refused_run import remove_refused_run
from editexp.run_dir import RunDirectory, RunDirError
from editexp.runner import run

log = logging.getLogger("editexp")


def use_slurm_cpus() -> int | None:
    """In a SLURM job, run torch on the CPUs the job was given (``SLURM_CPUS_PER_TASK``), not on
    every core of the node, unless ``OMP_NUM_THREADS`` says otherwise. Clusters without CPU
    binding (``TaskPlugin=task/none``) otherwise start every job with all cores' threads, and
    two jobs on one node then each run 10-20x slower. Returns the thread count it set."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus or "OMP_NUM_THREADS" in os.environ or not cpus.isdigit():
        return None
    torch.set_num_threads(int(cpus))
    return int(cpus)


def run_task(cfg: DictConfig) -> float:
    """Hydra's task function (``editexp.cli`` calls it): one grid point, or a single run.

    A single run refused before it starts (a user error) leaves no new run directory behind
    (:mod:`editexp.refused_run`); Ctrl-C says where the run stopped and exits 130. Returns
    the run's objective (``objective``, e.g. post.S), for Hydra's optimising sweepers.
    """
    use_slurm_cpus()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = hydra_cfg.runtime.choices.get("experiment")
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    try:
        if multirun:
            record = run_point(cfg, run_dir, overrides, hydra_cfg, experiment)
        else:
            with cli_errors("editexp"):  # exits here: Hydra would add a line of its own
                check_appended(overrides, cfg, hydra_cfg.runtime.choices)
                record = run(cfg, run_dir, overrides, None, experiment)
    except SystemExit as exit_:
        if exit_.code == EXIT_USER_ERROR:
            remove_refused_run(run_dir)
        raise
    except KeyboardInterrupt:
        what = f"grid point #{hydra_cfg.job.num}" if multirun else "the run"
        print(f"editexp: {interrupted(run_dir, cfg, what)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return run_settings(cfg).objective.value(record)


def run_point(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    hydra_cfg: DictConfig,
    experiment: str | None,
) -> RunRecord:
    """One grid point of a multirun. An Exception (not SystemExit): Hydra records the failed
    grid point and runs the others; ``editexp.cli`` prints a user error of the first failed
    point as one line."""
    try:
        check_appended(overrides, cfg, hydra_cfg.runtime.choices)
        return run(cfg, run_dir, overrides, hydra_cfg.sweep.dir, experiment)
    except Exception as error:
        log.error("grid point %s failed: %s", hydra_cfg.job.num, one_line(error))
        raise


def interrupted(run_dir: Path, cfg: DictConfig, what: str = "the run") -> str:
    """Where an interrupted run stopped (its checkpoint's last completed update) and how to go
    on, in one line."""
    try:
        checkpoint = RunDirectory(run_dir).read_checkpoint()
    except RunDirError:  # damaged: the next attempt says so
        checkpoint = None
    if checkpoint is None:
        return (
            f"interrupted: {what} stopped before its first update was saved; rerunning the same "
            "command starts it again"
        )
    try:
        of = f" of {run_settings(cfg).n_updates}"
    except ConfigError:
        of = ""
    return (
        f"interrupted: {what} stopped after update {checkpoint['updates_done']}{of} (saved in "
        f"{run_dir}); rerunning the same command resumes from there"
    )
