"""The finished runs of a sweep directory, for ``editexp-report``: every ``summary.json`` below
it read as a :class:`~editexp.record.RunRecord`, the job directories without one, and the grid
that Hydra's ``multirun.yaml`` describes (expanded with Hydra's override parser, exactly as the
basic sweeper does: ``hydra.sweeper.params`` first, then ``hydra.overrides.task``, later keys
win).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

from editexp.record import BatchRecord, RunRecord
from editexp.run_dir import ATTEMPTS_DIR, summary_problem

# results.csv's metric blocks: before editing, after the run, and every fact right after its
# own update (the paper's each_batch schedule; the same as post except in sequential runs)
STAGES = ("pre", "post", "each_batch")
GRID_FIELDS = (
    "algorithm",
    "model",
    "layer",
    "mode",
    "batch_size",
    "n_edits",
    "lambda",
    "keep_edits",
    "eval_schedule",
    "precision",
)


@dataclass
class FinishedRun:
    """A job directory's run record, where it lies, and the overrides that made it."""

    directory: Path  # the directory holding summary.json
    record: RunRecord
    overrides: list[str] | None  # from the job's .hydra/overrides.yaml

    def field(self, name: str) -> Any:
        return self.record.field(name)

    def metric(self, stage: str, metric: str, stat: str = "mean") -> float | None:
        return self.record.metric(stage, metric, stat)

    def batches(self) -> list[BatchRecord]:
        """Rows of ``batches.jsonl`` beside the summary (unreadable lines skipped)."""
        path = self.directory / "batches.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(BatchRecord.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return rows


class MetricColumn(NamedTuple):
    """A results.csv column: one statistic of one metric at one stage."""

    stage: str  # pre, post, each_batch
    metric: str
    stat: str  # mean, std, se

    @property
    def name(self) -> str:
        return f"{self.stage}_{self.metric}_{self.stat}"

    def value(self, run: FinishedRun) -> float | None:
        """``run``'s value in this column (None: not measured)."""
        return run.metric(self.stage, self.metric, self.stat)


def metric_columns(runs: Iterable[FinishedRun], metrics: Iterable[str]) -> list[MetricColumn]:
    """results.csv's metric columns: every stage and metric, each with its mean and std, and
    its standard error where a run has one (S's, by the delta method: S has no std over
    facts)."""
    runs, metrics = list(runs), list(metrics)
    with_se = {
        m
        for m in metrics
        if any(run.metric(s, m, "se") is not None for run in runs for s in STAGES)
    }
    return [
        MetricColumn(stage, metric, stat)
        for stage in STAGES
        for metric in metrics
        for stat in ("mean", "std", "se")
        if stat != "se" or metric in with_se
    ]


@dataclass
class Sweep:
    root: Path
    runs: list[FinishedRun] = field(default_factory=list)
    incomplete: list[tuple[Path, list[str] | None]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    grid: list[list[str]] | None = None  # expected points, each a list of "key=value"
    grid_note: str | None = None  # why the grid size is unknown


def read_overrides(job_dir: Path) -> list[str] | None:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        return [str(item) for item in OmegaConf.to_container(OmegaConf.load(path))]
    except Exception:
        return None


def _natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sort key putting job 2 before job 10."""
    parts = re.split(r"(\d+)", str(path))
    return [(0, int(part)) if part.isdigit() else (1, part) for part in parts]


def job_dir_of(path: Path, root: Path) -> Path | None:
    """The nearest directory at or above ``path`` (inside ``root``) with a ``.hydra`` folder."""
    for candidate in (path, *path.parents):
        if (candidate / ".hydra").is_dir():
            return candidate
        if candidate == root:
            break
    return None


def collect(root: Path) -> Sweep:
    """Completed runs, unfinished job directories and the expected grid of a sweep."""
    root = root.resolve()
    sweep = Sweep(root)
    summary_dirs: set[Path] = set()
    for path in sorted(root.rglob("summary.json")):
        if ATTEMPTS_DIR in path.relative_to(root).parts:  # earlier attempts moved aside
            continue
        job_dir = job_dir_of(path.parent, root)
        try:
            summary = json.loads(path.read_text())
            # not an object, or the result of another config than the job's grid point
            problem = summary_problem(summary, job_dir)
            record = RunRecord.from_json(summary) if problem is None else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            sweep.unreadable.append((path, str(error)))
            continue
        except (KeyError, TypeError, AttributeError) as error:
            sweep.unreadable.append((path, f"not a run record ({type(error).__name__}: {error})"))
            continue
        if record is None:
            sweep.unreadable.append((path, problem))
            continue
        overrides = read_overrides(job_dir) if job_dir is not None else None
        sweep.runs.append(FinishedRun(path.parent, record, overrides))
        summary_dirs.add(path.parent)
    for hydra_dir in sorted(root.rglob(".hydra"), key=_natural_key):
        job_dir = hydra_dir.parent
        if not hydra_dir.is_dir() or job_dir == root:
            continue
        if not any(d == job_dir or job_dir in d.parents for d in summary_dirs):
            sweep.incomplete.append((job_dir, read_overrides(job_dir)))
    # One multirun.yaml per Hydra multirun below the root (e.g. lambda_search runs one per
    # algorithm into sibling directories): the expected grid is their union.
    for multirun_yaml in sorted(root.rglob("multirun.yaml")):
        grid, note = expected_grid(multirun_yaml)
        if grid is None:
            sweep.grid, sweep.grid_note = None, note
            break
        sweep.grid = (sweep.grid or []) + grid
    return sweep


# --------------------------------------------------------------------------- the sweep grid


def expected_grid(multirun_yaml: Path) -> tuple[list[list[str]] | None, str | None]:
    """The job overrides Hydra's basic sweeper generates from ``multirun.yaml``.

    Returns ``(points, None)``, or ``(None, reason)`` when the grid cannot be expanded
    (a non-discrete sweep such as ``interval``, an unparsable override, no hydra-core).
    """
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return None, "hydra-core is not installed"
    try:
        config = OmegaConf.load(multirun_yaml)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        task = OmegaConf.select(config, "hydra.overrides.task") or []
        arguments = [f"{key}={value}" for key, value in params.items()] + [str(t) for t in task]
        overrides = OverridesParser.create().parse_overrides(arguments)
        axes: dict[str, list[str]] = {}
        for override in overrides:
            key = override.get_key_element()
            if not override.is_sweep_override():
                axes[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                return None, f"non-discrete sweep {key} in {multirun_yaml.name}"
    except Exception as error:  # bad YAML, glob() needs a config loader, bad syntax, ...
        return None, f"cannot expand the grid of {multirun_yaml.name}: {error}"
    return [list(point) for point in itertools.product(*axes.values())], None


def _normalise(overrides: Iterable[str]) -> frozenset[str]:
    return frozenset(item.replace(" ", "") for item in overrides)


@dataclass
class GridStatus:
    complete: int
    total: int
    not_started: list[list[str]]  # grid points without any job directory
    unmatched_runs: int  # completed runs whose overrides are not a grid point


def grid_status(sweep: Sweep) -> GridStatus | None:
    if sweep.grid is None:
        return None
    points = {_normalise(point): point for point in sweep.grid}
    done = {_normalise(run.overrides) for run in sweep.runs if run.overrides is not None}
    started = done | {_normalise(o) for _, o in sweep.incomplete if o is not None}
    unmatched = sum(
        1 for run in sweep.runs if run.overrides is None or _normalise(run.overrides) not in points
    )
    return GridStatus(
        complete=len(done & points.keys()),
        total=len(points),
        not_started=[point for key, point in points.items() if key not in started],
        unmatched_runs=unmatched,
    )
