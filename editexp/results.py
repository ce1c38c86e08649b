"""A sweep's finished runs as a pandas DataFrame, for notebooks::

    import editexp
    df = editexp.load_results("multirun/lambda_search/llama3")
    df.groupby("algorithm")["post_S_mean"].max()

The runs are those ``editexp-report`` reads (:func:`editexp.sweep_runs.collect`: every
``summary.json`` below the directory that belongs to its job's grid point; earlier attempts
and unfinished jobs left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from editexp.metric_specs import metrics_in
from editexp.sweep_runs import GRID_FIELDS, FinishedRun, MetricColumn, collect, metric_columns


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per finished run below ``sweep_dir``, ordered by directory: the axes
    (``algorithm``, ``model``, ``layer`` as a tuple of ints, ``mode``, ``batch_size``,
    ``n_edits``, ``lambda``, ``keep_edits``, ``eval_schedule``), then
    ``<stage>_<metric>_<stat>`` for every stage (pre, post, each_batch), every metric any run
    measured and mean and std, and ``se`` where a run has a standard error (S's; NaN where a
    run has none, e.g. S's std), then ``edits_done``,
    ``total_seconds`` and ``run_dir`` (the directory holding the summary)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = sorted(collect(root).runs, key=lambda run: str(run.directory))
    metrics = metrics_in(block for run in runs for block in (run.record.pre, run.record.post))
    measured = metric_columns(runs, metrics)
    names = [column.name for column in measured]
    columns = [*GRID_FIELDS, *names, "edits_done", "total_seconds", "run_dir"]
    return pd.DataFrame([_row(run, measured) for run in runs], columns=columns)


def _row(run: FinishedRun, measured: list[MetricColumn]) -> dict[str, Any]:
    row: dict[str, Any] = {name: run.field(name) for name in GRID_FIELDS}
    for column in measured:
        value = column.value(run)
        row[column.name] = float("nan") if value is None else value
    row["edits_done"] = run.record.edits_done
    row["total_seconds"] = run.record.timing.get("total")
    row["run_dir"] = str(run.directory)
    return row
