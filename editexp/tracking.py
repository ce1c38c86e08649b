"""Experiment tracking: Weights & Biases runs, or nothing.

The runner talks to a `Tracker`: `log_update` after every update, `log_results` once at the
end, `finish` always (`tracking` guarantees it). What a W&B run holds:

- **config**: the run's effective sweep axes as flat scalars (`model`, `algorithm`, `layer`,
  `batch_size`, `n_edits`, `lambda`, `mode`, `experiment`, `eval_schedule`), the values the
  run used (a batch-mode run's `batch_size` is its `n_edits`, `lambda` is the model's default
  when the config left it null, one layer is an int, several are "4,5,6"), and the full
  resolved Hydra config under `cfg`. Group a dashboard by any axis.
- **summary**: the result. The headline metrics (`editexp.metric_specs`: `ES`, `PS`, `NS`,
  `S`, `GE` and those of the run's metric providers, e.g. `PPL`) are the post-edit means over
  all facts of the run (model-level metrics: after the last update); beside them the
  `pre/<metric>/{mean,std,n}` and `post/...` blocks of summary.json, `each_batch/...` (every
  fact right after its own update: the paper's schedule, also measured in sequential `every_k`
  runs), `update_mean/*` (over the updates),
  `timing/*` and `edits_done`.
- **history**, against `edits_done`: `per_update/*` (the metrics of the facts scored at that
  update and the update's norms) and `edited_so_far/*` (the mean over all facts edited so
  far: the running mean of what was scored for `eval.schedule=each_batch`, what was scored
  then for `every_k` and `final`). Steps are update numbers, so a resumed run continues.
- **a `facts` table** (`wandb.Table`): per fact its prompt, targets, pre and post metrics.
- **an artifact** `results-<run id>` of type `results`: summary.json, facts.jsonl,
  batches.jsonl and, unless `logger.log_deltas=false` (big models), deltas.pt.
- `job_type` = the experiment preset (`layer_search`, ...; `run` without one), tags = model
  and algorithm (plus `logger.tags`), name = the job's overrides, group = the sweep.
- **id** = a hash of the run directory, with `resume="allow"`: a requeued or resumed grid
  point continues the same W&B run (`force=true` starts a new one).

W&B mode: `logger.mode` in the config (default `offline`), but the environment variable
`WANDB_MODE` wins when it is set, as it does for every W&B tool. So a cluster or CI can
force `offline` or `disabled` without touching configs. Offline runs live in
`<run dir>/wandb/offline-run-*` beside `summary.json`; upload them later with
`wandb sync <run dir>/wandb/offline-run-*` (a resumed run's attempts sync into one run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from editexp.cache import atomic_write_json, stable_hash
from editexp.metric_specs import metrics_in

log = logging.getLogger(__name__)

STEP_METRIC = "edits_done"
PER_UPDATE = "per_update"  # history: the scoring at this update and the update's norms
SO_FAR = "edited_so_far"  # history: mean over every fact edited so far
DEFAULT_MODE = "offline"
IDENTITY_FILE = "editexp-identity.json"  # <run dir>/wandb/: id and group, for editexp-report


class Tracker(Protocol):
    def log_update(
        self,
        step: int,
        edits_done: int,
        scored: Mapping[str, float],
        so_far: Mapping[str, float],
        update: Mapping[str, float],
    ) -> None: ...

    def log_results(
        self,
        summary: dict,
        step: int,
        fact_rows: Sequence[dict],
        files: Sequence[Path],
        fact_text: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None: ...

    @property
    def continues(self) -> bool: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracks nothing (logger=none)."""

    continues = False

    def log_update(self, step, edits_done, scored, so_far, update) -> None:
        pass

    def log_results(self, summary, step, fact_rows, files, fact_text=None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


# --------------------------------------------------------------------------- what is logged


@dataclass(frozen=True)
class WandbIdentity:
    """Who a W&B run is: its id, display name, group (the sweep) and experiment preset."""

    run_id: str
    name: str
    group: str | None
    experiment: str | None

    @property
    def job_type(self) -> str:
        return self.experiment or "run"


def run_id_for(run_dir: Path, fresh: bool = False) -> str:
    """The W&B run id of a run directory: the same for every attempt at it (resume, requeue);
    ``fresh`` (force=true, which restarts the run) adds the start time."""
    key = str(Path(run_dir).resolve())
    if fresh:
        key += f"@{time.time_ns()}"
    return "ee-" + stable_hash(key, 20)


@dataclass(frozen=True)
class RunAxes:
    """The sweep axes of one run."""

    model: str
    algorithm: str
    layers: Sequence[int]
    batch_size: int
    n_edits: int
    lam: float | None
    mode: str
    experiment: str | None
    eval_schedule: str
    precision: str = "32-true"


def flat_axes(axes: RunAxes) -> dict[str, Any]:
    """The sweep axes a run used, as scalars (W&B groups and filters by scalars)."""
    layers = list(axes.layers)
    return {
        "model": axes.model,
        "algorithm": axes.algorithm,
        "layer": layers[0] if len(layers) == 1 else ",".join(str(layer) for layer in layers),
        "batch_size": axes.batch_size,
        "n_edits": axes.n_edits,
        "lambda": axes.lam,
        "mode": axes.mode,
        "experiment": axes.experiment or "none",
        "precision": axes.precision,
        "eval_schedule": axes.eval_schedule,
    }


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


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B summary of a run: headline post-edit means first, then the result blocks.

    The run's axes are left out (they are the config), so nothing appears twice in two forms.
    """
    post = summary.get("post") or {}
    headline = {key: post[key]["mean"] for key in metrics_in([post]) if key in post}
    stages = ("pre", "post", "each_batch", "update_mean", "timing")
    blocks = {k: summary[k] for k in stages if summary.get(k)}
    extra = {
        key: summary[key]
        for key in ("edits_done", "run_dir", "device", "threads")
        if key in summary
    }
    return {**headline, **flatten(blocks), **extra}


def fact_table_data(
    fact_rows: Sequence[Mapping[str, Any]],
    fact_text: Mapping[int, Mapping[str, str]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-fact table from facts.jsonl lines.

    Per fact: ``case_id``, ``batch`` (the update that edited it), the prompt and targets
    when ``fact_text`` has them, then ``pre_<metric>`` and ``post_<metric>`` for every
    metric (fractions as stored; ES of one fact is 0 or 1) and the first post-edit generation.
    """
    metrics: list[str] = []
    for row in fact_rows:
        for stage in ("pre", "post"):
            for key, value in (row.get(stage) or {}).items():
                if isinstance(value, int | float) and key != "case_id" and key not in metrics:
                    metrics.append(key)
    text_columns = ["prompt", "target_true", "target_new"] if fact_text else []
    columns = ["case_id", "batch", *text_columns]
    columns += [f"{stage}_{metric}" for metric in metrics for stage in ("pre", "post")]
    columns.append("post_generation")
    data = []
    for row in fact_rows:
        pre, post = row.get("pre") or {}, row.get("post") or {}
        text = (fact_text or {}).get(row["case_id"], {})
        values: list[Any] = [row["case_id"], row.get("batch")]
        values += [text.get(column) for column in text_columns]
        values += [block.get(metric) for metric in metrics for block in (pre, post)]
        generations = post.get("generation_texts") or [None]
        values.append(generations[0])
        data.append(values)
    return columns, data


def _numbers(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"{prefix}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


# --------------------------------------------------------------------------- W&B


class WandbTracker:
    """One W&B run; history is plotted against `edits_done`."""

    def __init__(self, run: Any, run_dir: Path, log_deltas: bool, continues: bool) -> None:
        self.run = run
        self.run_dir = run_dir
        self.log_deltas = log_deltas
        self._continues = continues
        self._finished = False
        run.define_metric(STEP_METRIC)
        for prefix in (PER_UPDATE, SO_FAR):
            run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC)

    @property
    def continues(self) -> bool:
        """True when an earlier attempt of this run already logged its updates to W&B."""
        return self._continues

    def log_update(
        self,
        step: int,
        edits_done: int,
        scored: Mapping[str, float],
        so_far: Mapping[str, float],
        update: Mapping[str, float],
    ) -> None:
        values = {**_numbers(PER_UPDATE, {**scored, **update}), **_numbers(SO_FAR, so_far)}
        self.run.log({**values, STEP_METRIC: edits_done}, step=step)

    def log_results(
        self,
        summary: dict,
        step: int,
        fact_rows: Sequence[dict],
        files: Sequence[Path],
        fact_text: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        """Summary, the per-fact table (at ``step``, after the last update) and the artifact."""
        import wandb

        columns, data = fact_table_data(fact_rows, fact_text)
        self.run.log({"facts": wandb.Table(columns=columns, data=data)}, step=step)
        self.run.summary.update(summary_metrics(summary))
        artifact = wandb.Artifact(f"results-{self.run.id}", type="results")
        for path in files:
            path = Path(path)
            if not path.is_file() or (path.name == "deltas.pt" and not self.log_deltas):
                continue
            # immutable: W&B reads the file where it is instead of copying it to its staging
            # area (deltas of a big model are large); these files are final when logged.
            artifact.add_file(str(path), name=path.name, policy="immutable")
        self.run.log_artifact(artifact)

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


def _earlier_attempt(run_dir: Path, run_id: str) -> bool:
    """Whether an earlier attempt of this run wrote W&B files here (offline or online)."""
    return any((run_dir / "wandb").glob(f"*run-*-{run_id}"))


def start_tracker(
    logger_cfg: DictConfig,
    identity: WandbIdentity,
    config: dict,
    run_dir: Path,
    tags: Sequence[str] = (),
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
    earlier = _earlier_attempt(run_dir, identity.run_id)
    all_tags = list(dict.fromkeys([*tags, *(logger_cfg.get("tags") or [])]))
    run = wandb.init(
        project=logger_cfg.get("project") or "editexp",
        entity=logger_cfg.get("entity"),
        mode=wandb_mode(logger_cfg),
        dir=str(run_dir),
        id=identity.run_id,
        resume="allow",
        name=identity.name,
        group=identity.group,
        job_type=logger_cfg.get("job_type") or identity.job_type,
        tags=all_tags,
        config=config,
        reinit="create_new",
    )
    atomic_write_json(
        run_dir / "wandb" / IDENTITY_FILE,
        {"id": identity.run_id, "group": identity.group, "project": run.project},
    )
    continues = earlier or bool(getattr(run, "resumed", False))
    return WandbTracker(run, run_dir, bool(logger_cfg.get("log_deltas", True)), continues)


@contextlib.contextmanager
def tracking(
    logger_cfg: DictConfig,
    identity: WandbIdentity,
    config: dict,
    run_dir: Path,
    tags: Sequence[str] = (),
) -> Iterator[Tracker]:
    """A started tracker that is always finished: exit code 1 on an exception (re-raised).

    BaseException is caught too, so SIGINT and submitit's sys.exit after a requeue
    also close the run (a clean `sys.exit(0)` counts as success).
    """
    tracker = start_tracker(logger_cfg, identity, config, run_dir, tags)
    try:
        yield tracker
    except SystemExit as exc:
        tracker.finish(exit_code=0 if exc.code in (None, 0) else 1)
        raise
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)


# --------------------------------------------------------------------------- names and groups


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def _is_group(key: str, group: str) -> bool:
    return key == group or key.startswith((f"{group}.", f"{group}/"))


def sweep_group(sweep_dir: str | Path) -> str | None:
    """The W&B group of a sweep directory: the path below its last "multirun" folder
    (e.g. "layer_search/smollm2-135m/2024-06-01_12-00-00"), else its last component."""
    parts = Path(sweep_dir).parts
    if "multirun" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("multirun")
        return "/".join(parts[last + 1 :])
    return Path(sweep_dir).name or None


def run_identity(overrides: list[str], sweep_dir: str | None) -> tuple[str, str | None]:
    """(name, group) of a W&B run.

    name: the job's overrides joined with "," ("algorithm=memit,layer=3"), leaving out
    hydra.*, logger.* and experiment overrides; "default" when nothing is left.
    group: for a multirun, `sweep_group` of the sweep directory; for a single run, the
    experiment name if one was chosen, else None.
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
        return name, sweep_group(sweep_dir)
    return name, experiment


def read_identity(run_dir: Path) -> dict | None:
    """The W&B id, group and project a run directory's tracker recorded, if any."""
    path = Path(run_dir) / "wandb" / IDENTITY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the sweep report


def report_group(run_dirs: Sequence[Path], sweep_dir: Path) -> str | None:
    """The W&B group of a sweep's runs: the one their trackers recorded when they all agree,
    else the group of the sweep directory itself (e.g. lambda_search's two sweeps)."""
    groups = {(read_identity(d) or {}).get("group") for d in run_dirs} - {None}
    return groups.pop() if len(groups) == 1 else sweep_group(Path(sweep_dir).resolve())


def log_report(
    out_dir: Path,
    files: Sequence[Path],
    tables: Mapping[str, tuple[list[str], list[list[Any]]]],
    group: str | None,
    project: str | None = None,
) -> str:
    """Log a report's figures (PNG) and tables to a W&B run of job type ``report`` in the
    sweep's group, and every report file as a ``report`` artifact. Mode: $WANDB_MODE, else
    offline (as the runs); the run's files go to ``<out_dir>/wandb``. Returns the run id."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or DEFAULT_MODE
    run = wandb.init(
        project=project or "editexp",
        mode=mode,
        dir=str(out_dir),
        group=group,
        job_type="report",
        name=f"report {group}" if group else "report",
        reinit="create_new",
    )
    try:
        media: dict[str, Any] = {}
        for path in files:
            if path.suffix == ".png":
                media[f"figures/{path.stem}"] = wandb.Image(str(path))
        for name, (columns, data) in tables.items():
            media[f"tables/{name}"] = wandb.Table(columns=columns, data=data)
        run.log(media)
        artifact = wandb.Artifact(f"report-{stable_hash(str(group), 12)}", type="report")
        for path in files:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return run.id
