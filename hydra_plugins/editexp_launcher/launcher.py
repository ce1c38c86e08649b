"""editexp's launchers: every grid point checked before the first job starts, and a local
launcher that runs only as many grid points at once as the machine holds.

All three (``editexp_basic``, the default; ``hydra/launcher=local``; ``hydra/launcher=slurm``)
first check every grid point of the sweep (:func:`editexp.sweep_check.check_grid`) and refuse
the whole sweep, naming its bad points, before any job is submitted.

``hydra/launcher=local`` (``conf/hydra/launcher/local.yaml``) runs every grid point of a
multirun as its own process through submitit, like hydra-submitit-launcher's ``submitit_local``,
but at most ``parallel_jobs`` at a time, each with ``threads_per_job`` torch / OpenMP / MKL
threads. Left null, both are derived from the machine (:func:`plan_parallelism`):

    parallel jobs   = min(grid points, cores, available memory / mem_gb, GPUs / gpus_per_node)
    threads per job = cores / parallel jobs

A user-set ``OMP_NUM_THREADS`` is kept, as on SLURM (``editexp.task.use_slurm_cpus``): it is
then the threads per job (unless ``threads_per_job`` is given), and given threads per job cap
the parallel jobs at cores / threads per job.

Several processes that each start torch's default thread count (all cores) oversubscribe the
cores and run 10-20x slower each; one thread per core and job does not. With GPUs, every job
gets its own ``gpus_per_node`` devices (CUDA_VISIBLE_DEVICES).

Hydra imports plugin modules in a way that breaks dataclasses under
``from __future__ import annotations``, so this module does without it.
"""

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_launcher import BasicLauncher, BasicLauncherConf
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import (
    BaseQueueConf,
    LocalQueueConf,
    SlurmQueueConf,
)
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from editexp.errors import UserError

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
POLL_SECONDS = 1.0


class LauncherConfigError(UserError):
    """A launcher setting that cannot work (``hydra.launcher.parallel_jobs=0``)."""


@dataclass
class ParallelLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.editexp_launcher.launcher.ParallelLocalLauncher"
    # Grid points running at once; null: as many as fit (see the module docstring).
    parallel_jobs: Optional[int] = None  # noqa: UP045 (OmegaConf reads these annotations)
    # Threads of each job; null: cores / parallel jobs.
    threads_per_job: Optional[int] = None  # noqa: UP045
    # Cores to share; null: the cores this process may run on.
    cores: Optional[int] = None  # noqa: UP045


@dataclass
class CheckedBasicConf(BasicLauncherConf):
    _target_: str = "hydra_plugins.editexp_launcher.launcher.CheckedBasicLauncher"


@dataclass
class CheckedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.editexp_launcher.launcher.CheckedSlurmLauncher"


for _name, _node in (
    ("editexp_local", ParallelLocalConf),
    ("editexp_basic", CheckedBasicConf),
    ("editexp_slurm", CheckedSlurmConf),
):
    ConfigStore.instance().store(group="hydra/launcher", name=_name, node=_node, provider="editexp")


def check_grid(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> None:
    """Refuse the sweep before any job starts when a grid point would fail its checks."""
    from editexp.sweep_check import check_grid as check

    check(launcher.hydra_context.config_loader, launcher.config, job_overrides, first)


class CheckedBasicLauncher(BasicLauncher):
    """Hydra's basic launcher (one grid point after another, in this process), checked first."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        check_grid(self, job_overrides, initial_job_idx)
        return super().launch(job_overrides, initial_job_idx)


class CheckedSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (a job array), checked before submission."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        check_grid(self, job_overrides, initial_job_idx)
        return super().launch(job_overrides, initial_job_idx)


@dataclass(frozen=True)
class Plan:
    parallel_jobs: int
    threads_per_job: int


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else None (not counted)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch or no driver: no GPUs to share
        return 0


def user_threads() -> int | None:
    """The threads per job the user set with ``OMP_NUM_THREADS`` (a positive integer), if any."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def plan_parallelism(
    n_jobs: int,
    cores: int,
    memory_gb: float | None = None,
    mem_gb_per_job: float | None = None,
    gpus: int = 0,
    gpus_per_job: int | None = None,
    parallel_jobs: int | None = None,
    threads_per_job: int | None = None,
) -> Plan:
    """How many jobs run at once and with how many threads each (module docstring)."""
    for name, value in (("parallel_jobs", parallel_jobs), ("threads_per_job", threads_per_job)):
        if value is not None and value < 1:
            raise LauncherConfigError(
                f"hydra.launcher.{name}={value}; expected a positive integer or null (automatic)"
            )
    if cores < 1:
        raise LauncherConfigError(
            f"hydra.launcher.cores={cores}; expected a positive integer or null"
        )
    fit = cores
    if memory_gb is not None and mem_gb_per_job:
        fit = min(fit, max(1, int(memory_gb // mem_gb_per_job)))
    if gpus > 0 and gpus_per_job:
        fit = min(fit, max(1, gpus // gpus_per_job))
    if threads_per_job is not None:
        fit = min(fit, max(1, cores // threads_per_job))
    if parallel_jobs is None:
        parallel_jobs = fit
    elif parallel_jobs > fit:
        log.warning("hydra.launcher.parallel_jobs=%d is more than fit (%d)", parallel_jobs, fit)
    parallel_jobs = max(1, min(parallel_jobs, n_jobs))
    if threads_per_job is None:
        threads_per_job = max(1, cores // parallel_jobs)
    return Plan(parallel_jobs, threads_per_job)


class ParallelLocalLauncher(LocalLauncher):
    def __init__(
        self,
        parallel_jobs: int | None = None,
        threads_per_job: int | None = None,
        cores: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        self.parallel_jobs = parallel_jobs
        self.threads_per_job = threads_per_job
        self.cores = cores
        self.threads = 0  # set by launch(), read by each job in __call__

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs in the job's process: its share of the cores, then the grid point."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return super().__call__(*args, **kwargs)

    def plan(self, n_jobs: int) -> Plan:
        gpus_per_job = self.params.get("gpus_per_node")
        return plan_parallelism(
            n_jobs,
            self.cores or available_cores(),
            available_memory_gb(),
            self.params.get("mem_gb"),
            visible_gpus() if gpus_per_job else 0,
            gpus_per_job,
            self.parallel_jobs,
            self.threads_per_job or user_threads(),
        )

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:

        assert self.config is not None
        plan = self.plan(len(job_overrides))  # a bad setting is refused before the grid check
        check_grid(self, job_overrides, initial_job_idx)
        self.threads = plan.threads_per_job
        log.info(
            "Local launcher: %d grid points, %d at a time, %d threads each",
            len(job_overrides),
            plan.parallel_jobs,
            plan.threads_per_job,
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        executors = [self._executor(slot, plan) for slot in range(plan.parallel_jobs)]
        pending = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            pending.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}"))

        jobs: list[Any] = [None] * len(pending)
        running: dict[int, int] = {}  # slot -> index of its job
        next_job = 0
        saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
        os.environ.update({name: str(plan.threads_per_job) for name in THREAD_VARIABLES})
        try:
            while next_job < len(pending) or running:
                for slot in range(plan.parallel_jobs):
                    busy = slot in running and not jobs[running[slot]].done()
                    if busy:
                        continue
                    running.pop(slot, None)
                    if next_job < len(pending):
                        job_args = (*pending[next_job], Singleton.get_state())
                        jobs[next_job] = executors[slot].submit(self, *job_args)
                        running[slot] = next_job
                        next_job += 1
                if running:
                    time.sleep(POLL_SECONDS)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return [job.results()[0] for job in jobs]

    def _executor(self, slot: int, plan: Plan):
        """A submitit local executor with this launcher's parameters; with GPUs, slot s sees
        its own gpus_per_node devices."""
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="local", folder=params.pop("submitit_folder"))
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        settings = {
            key if key in base_keys else f"local_{key}": value for key, value in params.items()
        }
        gpus_per_job = params.get("gpus_per_node") or 0
        if gpus_per_job and visible_gpus() >= gpus_per_job * plan.parallel_jobs:
            first = slot * gpus_per_job
            settings["local_visible_gpus"] = tuple(range(first, first + gpus_per_job))
        executor.update_parameters(**settings)
        return executor
