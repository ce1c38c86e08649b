"""Experiment tracking: Weights & Biases runs, or nothing.

The runner talks to a `Tracker`: `log_update` after every update (plotted against
`edits_done`), `log_summary` once at the end, `finish` always (`tracking` guarantees it).

W&B mode: `logger.mode` in the config (default `offline`), but the environment variable
`WANDB_MODE` wins when it is set, as it does for every W&B tool. So a cluster or CI can
force `offline` or `disabled` without touching configs. Offline runs live in
`<run dir>/wandb/offline-run-*` beside `summary.json`; upload them later with
`wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

log = logging.getLogger(__name__)

STEP_METRIC = "edits_done"
DEFAULT_MODE = "offline"


class Tracker(Protocol):
    def log_update(self, metrics: dict[str, float], edits_done: int) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracks nothing (logger=none)."""

    def log_update(self, metrics: dict[str, float], edits_done: int) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def flatten(nested: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """{"post": {"ES": {"mean": 1.0}}} -> {"post/ES/mean": 1.0}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


class WandbTracker:
    """One W&B run; every metric is plotted against `edits_done`."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._finished = False
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)

    def log_update(self, metrics: dict[str, float], edits_done: int) -> None:
        values = {k: v for k, v in flatten(metrics).items() if v is not None}
        self.run.log({**values, STEP_METRIC: edits_done})

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update(flatten(summary))

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        self.run.finish(exit_code=exit_code)


def wandb_mode(logger_cfg: DictConfig) -> str:
    """The W&B mode: $WANDB_MODE when set, else logger.mode, else offline."""
    configured = logger_cfg.get("mode") or DEFAULT_MODE
    env = os.environ.get("WANDB_MODE")
    if env and env != configured:
        log.info("WANDB_MODE=%s overrides logger.mode=%s", env, configured)
    return env or configured


def start_tracker(
    logger_cfg: DictConfig,
    resolved_config: dict,
    run_dir: Path,
    name: str,
    group: str | None,
) -> Tracker:
    """A tracker for `logger_cfg.name` ("none" or "wandb") writing under `run_dir`."""
    kind = logger_cfg.get("name", "none")
    if kind == "none":
        return NullTracker()
    if kind != "wandb":
        raise ValueError(f"unknown logger.name {kind!r} (expected 'wandb' or 'none')")

    import wandb  # only when W&B is actually used

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logger_cfg.get("project") or "editexp",
        entity=logger_cfg.get("entity"),
        mode=wandb_mode(logger_cfg),
        dir=str(run_dir),
        name=name,
        group=group,
        job_type=logger_cfg.get("job_type") or "edit",
        tags=list(logger_cfg.get("tags") or []),
        config=resolved_config,
        reinit="create_new",
    )
    return WandbTracker(run)


@contextlib.contextmanager
def tracking(
    logger_cfg: DictConfig,
    resolved_config: dict,
    run_dir: Path,
    name: str,
    group: str | None,
) -> Iterator[Tracker]:
    """A started tracker that is always finished: exit code 1 on an exception (re-raised).

    BaseException is caught too, so SIGINT and submitit's sys.exit after a requeue
    also close the run (a clean `sys.exit(0)` counts as success).
    """
    tracker = start_tracker(logger_cfg, resolved_config, run_dir, name, group)
    try:
        yield tracker
    except SystemExit as exc:
        tracker.finish(exit_code=0 if exc.code in (None, 0) else 1)
        raise
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def _is_group(key: str, group: str) -> bool:
    return key == group or key.startswith((f"{group}.", f"{group}/"))


def run_identity(overrides: list[str], sweep_dir: str | None) -> tuple[str, str | None]:
    """(name, group) of a W&B run.

    name: the job's overrides joined with "," ("algorithm=memit,layer=3"), leaving out
    hydra.*, logger.* and experiment overrides; "default" when nothing is left.
    group: for a multirun, the sweep directory below its "multirun" folder (e.g.
    "layer_search/smollm2-135m/2024-06-01_12-00-00"), else its last component; for a
    single run, the experiment name if one was chosen, else None.
    """
    kept = []
    experiment = None
    for override in overrides:
        key = _override_key(override)
        if _is_group(key, "experiment"):
            experiment = override.split("=", 1)[1] if "=" in override else None
        elif not (_is_group(key, "hydra") or _is_group(key, "logger")):
            kept.append(override)
    name = ",".join(kept) or "default"

    if sweep_dir:
        parts = Path(sweep_dir).parts
        if "multirun" in parts[:-1]:
            last = len(parts) - 1 - parts[::-1].index("multirun")
            return name, "/".join(parts[last + 1 :])
        return name, Path(sweep_dir).name or None
    return name, experiment
