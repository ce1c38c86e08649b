"""``editexp-report``: tables and figures from the ``summary.json`` files of a Hydra sweep.

Usage: ``editexp-report <multirun dir> [--out DIR]`` (default ``<multirun dir>/report/``).

Every ``summary.json`` below the multirun directory (recursively) is one row, read as a
:class:`~editexp.record.RunRecord` (the type the runner writes). Written:

- ``results.csv``: the grid fields, pre/post mean and std of ES, PS, NS, S, GE (and S's
  standard error), and the directory holding the summary (relative to the multirun
  directory);
- ``results.md``: the same as Markdown tables (post-edit, then pre-edit), cells "mean (std)",
  S's "mean ± standard error" (delta method) where its summary has one; then what the sweep
  cost (:mod:`editexp.run_cost`: seconds per phase per run, wall/CPU/GPU-hours in all);
- figures (``editexp/figures.py``; each as PNG at 200 dpi and PDF): ``metric_vs_<axis>``
  for every axis that varies among the runs of a mode (layer, batch size, number of edits,
  lambda; suffixed ``_<mode>`` when the sweep mixes modes), and ``sequential`` (mode=
  sequential: the mean over all facts edited so far vs edits done, one line per batch
  size), and ``schedules`` (sequential runs scored after all edits that also kept the
  paper's each_batch numbers: both against batch size). Post-edit means with +-1 standard
  error over facts, the pre-edit value dashed; a series (e.g. "MEMIT, batch 256") has the
  same colour in every figure of the report;
- ``lambda_<algorithm>.md`` and ``.tex`` for every algorithm run with more than one lambda
  (the paper's Tables 3-4).

Lines in a figure are labelled by algorithm plus whichever other grid fields vary among the
plotted runs; runs that share a line and an x value (e.g. seeds) are averaged.

Partial sweeps are fine: job directories (with a ``.hydra/`` folder) that have no
``summary.json`` are listed with their overrides, and when ``multirun.yaml`` exists the grid
it describes is expanded with Hydra's override parser, exactly as the basic sweeper does
(``hydra.sweeper.params`` first, then ``hydra.overrides.task``, later keys win), to print
"k of n grid points complete" and the points that never got a job directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from matplotlib.colors import is_color_like
from matplotlib.figure import Figure

from editexp import figures
from editexp.cache import atomic_write_text
from editexp.errors import UserError, cli_errors
from editexp.figures import format_value
from editexp.metric_specs import metrics_in, spec
from editexp.record import BatchRecord
from editexp.run_cost import COST_HEADER, COST_NOTE, Cost, cost_rows
from editexp.sweep_runs import (
    GRID_FIELDS,
    FinishedRun,
    Sweep,
    collect,
    grid_status,
    metric_columns,
)

STAT_NOTE = (
    "Metric cells: mean (std) over facts, std = population standard deviation; ES, PS, NS, S "
    "in percent, GE in bits x 100; S is the harmonic mean of the ES, PS and NS means, with no "
    "std: its cells are mean ± standard error (delta method over the facts' ES, PS, NS).\n"
)
HEADERS = {
    "algorithm": "Algorithm",
    "model": "Model",
    "layer": "Layer",
    "mode": "Mode",
    "batch_size": "Batch size",
    "n_edits": "Edits",
    "lambda": "λ",
    "keep_edits": "Keep edits",
    "eval_schedule": "Eval",
    "precision": "Precision",
}


# --------------------------------------------------------------------------- tables


def report_metrics(runs: Sequence[FinishedRun]) -> tuple[str, ...]:
    """The metric columns: CounterFact's, then those any run measured (e.g. PPL)."""
    return metrics_in(block for run in runs for block in (run.record.pre, run.record.post))


def stat_note(metrics: Sequence[str]) -> str:
    """What the metric cells are, with a line for every metric beyond CounterFact's."""
    extra = [spec(m) for m in metrics if not spec(m).always]
    lines = [f"{s.name}: {s.description}" + (f" ({s.unit})" if s.unit else "") for s in extra]
    return STAT_NOTE + "".join(f"{line}; model-level, no std.\n" for line in lines)


def _sort_key(run: FinishedRun) -> tuple:
    def order(value: Any) -> tuple:
        return (0, 0) if value is None else (1, value)

    return (
        str(run.field("algorithm")),
        order(run.field("layer")),
        order(run.field("batch_size")),
        order(run.field("lambda")),
        str(run.field("model")),
        str(run.field("mode")),
        order(run.field("n_edits")),
        str(run.field("eval_schedule")),
        str(run.directory),
    )


def sorted_runs(runs: Sequence[FinishedRun]) -> list[FinishedRun]:
    return sorted(runs, key=_sort_key)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def results_csv(sweep: Sweep) -> str:
    columns = metric_columns(sweep.runs, report_metrics(sweep.runs))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*GRID_FIELDS, *(column.name for column in columns), "run_dir"])
    for run in sorted_runs(sweep.runs):
        row = [format_value(run.field(name)) for name in GRID_FIELDS]
        for column in columns:
            value = column.value(run)
            row.append("" if value is None else repr(value))
        row.append(_relative(run.directory, sweep.root))
        writer.writerow(row)
    return buffer.getvalue()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _metric_cells(run: FinishedRun, stage: str, metrics: Sequence[str]) -> list[str]:
    """ "mean (std)", or "mean ± se" for a metric with a standard error but no std (S)."""
    cells = []
    for metric in metrics:
        mean, std = run.metric(stage, metric), run.metric(stage, metric, "std")
        se = run.metric(stage, metric, "se")
        cell = spec(metric).format(mean, std)
        if mean is not None and std is None and se is not None:
            cell += f" ± {se:.{spec(metric).decimals}f}"
        cells.append(cell)
    return cells


def results_markdown(sweep: Sweep, status_lines: Sequence[str]) -> str:
    runs = sorted_runs(sweep.runs)
    metrics = report_metrics(runs)
    header = [HEADERS[name] for name in GRID_FIELDS] + list(metrics) + ["Run"]
    parts = [f"# Results: {sweep.root}\n"]
    parts += [line + "  " for line in status_lines]
    for stage, title in (("post", "Post-edit"), ("pre", "Pre-edit")):
        rows = [
            [format_value(run.field(name)) for name in GRID_FIELDS]
            + _metric_cells(run, stage, metrics)
            + [_relative(run.directory, sweep.root)]
            for run in runs
        ]
        parts.append(f"\n## {title}\n")
        parts.append(markdown_table(header, rows))
    both = scored_on_both_schedules(runs)
    if both:
        parts.append(EACH_BATCH_TITLE)
        rows = [
            [format_value(run.field(name)) for name in GRID_FIELDS]
            + _metric_cells(run, "each_batch", metrics)
            + [_relative(run.directory, sweep.root)]
            for run in both
        ]
        parts.append(markdown_table(header, rows))
    parts.append("\n" + stat_note(metrics))
    parts.append(cost_section(runs, sweep.root))
    return "\n".join(parts)


def cost_section(runs: Sequence[FinishedRun], root: Path) -> str:
    """What the runs cost: one line in all, then seconds per phase per run."""
    records = [run.record for run in runs]
    names = [_relative(run.directory, root) for run in runs]
    return (
        f"\n## Cost\n\n{Cost.of(records).line(len(runs))}\n\n"
        + markdown_table(COST_HEADER, cost_rows(records, names))
        + "\n"
        + COST_NOTE
    )


def scored_on_both_schedules(runs: Sequence[FinishedRun]) -> list[FinishedRun]:
    """The sequential runs scored on another schedule (every_k, final) that also measured the
    paper's each_batch numbers."""
    return [
        run
        for run in runs
        if run.field("mode") == "sequential"
        and run.field("eval_schedule") != "each_batch"
        and run.record.each_batch
    ]


EACH_BATCH_TITLE = (
    "\n## Sequential runs on the paper's schedule (each fact right after its own update)\n\n"
    "The same runs as above, every fact as scored right after the update that wrote it "
    "(`eval.schedule=each_batch`, the paper's code), not after the last update. GE is left "
    "out: those runs sampled it on their own schedule.\n"
)


def _varying(runs: Sequence[FinishedRun], names: Iterable[str]) -> list[str]:
    return [name for name in names if len({run.field(name) for run in runs}) > 1]


def lambda_tables(sweep: Sweep) -> dict[str, str]:
    """Tables 3-4: ``lambda_<algorithm>.md`` and ``.tex`` (booktabs, best S in bold) for
    algorithms run with more than one lambda."""
    tables = {}
    for algorithm in sorted({str(run.field("algorithm")) for run in sweep.runs}):
        runs = [run for run in sweep.runs if str(run.field("algorithm")) == algorithm]
        metrics = report_metrics(runs)
        if len({run.field("lambda") for run in runs if run.field("lambda") is not None}) < 2:
            continue
        context = _varying(runs, [n for n in GRID_FIELDS if n not in ("algorithm", "lambda")])
        runs = sorted(runs, key=lambda r: (_sort_key(r)[3], _sort_key(r)))
        header = ["λ"] + [HEADERS[name] for name in context] + list(metrics)
        rows = [
            [format_value(run.field("lambda"))]
            + [format_value(run.field(name)) for name in context]
            + _metric_cells(run, "post", metrics)
            for run in runs
        ]
        title = f"# {algorithm}: post-edit metrics vs λ\n\n"
        tables[f"lambda_{algorithm}.md"] = title + markdown_table(header, rows) + stat_note(metrics)
        scores = [run.metric("post", "S") for run in runs]
        best = max(
            (i for i, score in enumerate(scores) if score is not None),
            key=lambda i: scores[i],
            default=None,
        )
        caption = (
            f"{algorithm.upper()}: post-edit metrics for each λ, mean (std) over facts, S "
            "mean ± standard error; ES, PS, NS, S in percent, GE in bits x 100; best S in bold."
        )
        tables[f"lambda_{algorithm}.tex"] = figures.latex_table(header, rows, caption, best)
    return tables


# --------------------------------------------------------------------------- figures


def run_result(run: FinishedRun) -> figures.RunResult:
    """What the figures need of a run: its axes and its pre / post metric statistics."""
    return figures.RunResult(
        axes={name: run.field(name) for name in GRID_FIELDS},
        pre=figures.summaries_of(run.record.pre),
        post=figures.summaries_of(run.record.post),
    )


def sequential_curve(run: FinishedRun) -> figures.Curve:
    """After each scored update, the mean over all facts edited so far.

    From ``edited_so_far`` in batches.jsonl; for runs written before it existed, the running
    mean of facts.jsonl (``each_batch``: each fact keeps its own batch's scoring) or the
    scoring's means (``every_k`` / ``final`` score every fact edited so far).
    """
    rows = run.batches()
    edits_done: list[int] = []
    so_far: list[dict[str, figures.MetricSummary]] = []
    if any(row.edited_so_far for row in rows):
        for row in rows:
            if row.edited_so_far:
                edits_done.append(row.edits_done)
                so_far.append(figures.summaries_of(row.edited_so_far))
    elif run.field("eval_schedule") == "each_batch" and (run.directory / "facts.jsonl").is_file():
        edits_done, so_far = _running_means(run, rows)
    else:
        for row in rows:
            if row.metrics:
                edits_done.append(row.edits_done)
                so_far.append({k: figures.MetricSummary(float(v)) for k, v in row.metrics.items()})
    return figures.Curve(
        axes={name: run.field(name) for name in GRID_FIELDS},
        edits_done=edits_done,
        so_far=so_far,
        pre=figures.summaries_of(run.record.pre),
    )


def _running_means(
    run: FinishedRun, rows: list[BatchRecord]
) -> tuple[list[int], list[dict[str, figures.MetricSummary]]]:
    from editexp.evaluation.metrics import aggregate

    by_update: dict[int, list[dict]] = {}
    for line in (run.directory / "facts.jsonl").read_text().splitlines():
        try:
            fact = json.loads(line)
        except json.JSONDecodeError:
            continue
        post = fact.get("post") or {}
        values = {k: v for k, v in post.items() if isinstance(v, int | float) and k != "case_id"}
        by_update.setdefault(int(fact.get("batch", 0)), []).append(values)
    edits_done, so_far, seen = [], [], []
    for row in rows:
        seen += by_update.get(row.batch, [])
        if seen:
            edits_done.append(row.edits_done)
            so_far.append(figures.summaries_of(aggregate(seen)))
    return edits_done, so_far


def report_colors(
    runs: Sequence[FinishedRun], taken: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A colour for every series of the sweep's figures, keeping the colours ``taken`` (those
    of other reports: ``--colors``)."""
    results = [run_result(run) for run in runs]
    sequential = [sequential_curve(run) for run in runs if run.field("mode") == "sequential"]
    labels = figures.series_labels(results, sequential)
    labels += figures.line_labels(schedule_results(runs), "batch_size", "sequential")
    return figures.series_colors(labels, taken)


def report_figures(
    runs: Sequence[FinishedRun], colors: Mapping[str, str] | None = None
) -> dict[str, Figure]:
    """Every figure of the sweep by file stem: metric vs each varying axis, and the
    sequential runs' curves; a series has one colour in all of them (``colors``, default
    :func:`report_colors`)."""
    results = [run_result(run) for run in runs]
    sequential = [sequential_curve(run) for run in runs if run.field("mode") == "sequential"]
    colors = dict(colors) if colors is not None else report_colors(runs)
    out = figures.axis_figures(results, colors)
    figure = figures.sequential_figure(sequential, colors)
    if figure is not None:
        out["sequential"] = figure
    figure = schedule_figure(runs, colors)
    if figure is not None:
        out["schedules"] = figure
    return out


AFTER_OWN_UPDATE = "after its own update (paper)"
AFTER_ALL_EDITS = "after all edits"


def schedule_figure(
    runs: Sequence[FinishedRun], colors: dict[str, str] | None = None
) -> Figure | None:
    """The headline of sequential editing, against batch size: every fact scored right after
    its own update (the paper's each_batch numbers) beside every fact scored after the last
    update, for the sequential runs that measured both (eval.schedule every_k or final);
    None without such a run."""
    results = schedule_results(runs)
    if not results:
        return None
    return figures.axis_figure(results, "batch_size", "sequential", colors)


def schedule_results(runs: Sequence[FinishedRun]) -> list[figures.RunResult]:
    """Each run of :func:`scored_on_both_schedules` twice, as the series of the schedules
    figure: post-edit = its each_batch numbers, and post-edit = after the last update."""
    results = []
    for run in scored_on_both_schedules(runs):
        result = run_result(run)
        own_update = figures.summaries_of(run.record.each_batch)
        results.append(replace(result, axes={**result.axes, "eval_schedule": AFTER_OWN_UPDATE},
                               post=own_update))  # fmt: skip
        results.append(replace(result, axes={**result.axes, "eval_schedule": AFTER_ALL_EDITS}))
    return results


# --------------------------------------------------------------------------- the command


def status_lines(sweep: Sweep) -> list[str]:
    lines = [f"{len(sweep.runs)} completed run(s) under {sweep.root}."]
    status = grid_status(sweep)
    if status is not None:
        lines.append(f"{status.complete} of {status.total} grid points complete.")
        if status.unmatched_runs:
            lines.append(f"{status.unmatched_runs} completed run(s) match no grid point.")
    elif sweep.grid_note:
        lines.append(f"Grid size unknown: {sweep.grid_note}.")
    else:
        lines.append("No multirun.yaml: grid size unknown.")
    for job_dir, overrides in sweep.incomplete:
        shown = " ".join(overrides) if overrides else "(no overrides recorded)"
        lines.append(f"Missing/incomplete: {_relative(job_dir, sweep.root)}: {shown}")
    if status is not None:
        for point in status.not_started:
            lines.append(f"Not started (no job directory): {' '.join(point)}")
    for path, error in sweep.unreadable:
        lines.append(f"Unreadable: {_relative(path, sweep.root)}: {error}")
    return lines


def no_runs(sweep: Sweep) -> str:
    """Why a sweep without a finished run has nothing to report, in one line."""
    waiting = len(sweep.incomplete)
    started = f"; {waiting} grid point(s) started but not finished" if waiting else ""
    return (
        f"no finished run (summary.json) under {sweep.root}{started}; expected the directory "
        "of an editexp sweep (hydra.sweep.dir) or of a run"
    )


def write_report(
    sweep: Sweep, out: Path, colors: Mapping[str, str] | None = None
) -> tuple[list[Path], list[str]]:
    """Write every table and figure (series in ``colors``, default :func:`report_colors`);
    returns the files written and the status lines."""
    lines = status_lines(sweep)
    written = [
        atomic_write_text(out / "results.csv", results_csv(sweep)),
        atomic_write_text(out / "results.md", results_markdown(sweep, lines)),
    ]
    for stem, figure in report_figures(sweep.runs, colors).items():
        written += figures.save(figure, out / stem)
    for name, text in lambda_tables(sweep).items():
        written.append(atomic_write_text(out / name, text))
    return written, lines


def main(argv: Sequence[str] | None = None) -> int:
    with cli_errors("editexp-report"):  # a user error (e.g. an unwritable --out): one line
        return _main(argv)


class ReportError(UserError):
    """A directory ``editexp-report`` cannot report on."""


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="editexp-report",
        description="editexp-report: the tables and figures of an editexp sweep (the "
        "summary.json of every grid point under a multirun directory), written into "
        "<multirun dir>/report/; it also says which grid points are missing.",
        epilog="Example: editexp-report multirun/layer_search/model=llama3-8b",
    )
    parser.add_argument("multirun_dir", type=Path, help="the sweep directory (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, help="output directory (default: <dir>/report)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the figures and tables to W&B, in the sweep's group ($WANDB_MODE, "
        "default offline: upload with `wandb sync <out>/wandb/offline-run-*`)",
    )
    parser.add_argument("--wandb-project", help="W&B project (default: the runs' project)")
    parser.add_argument("--wandb-group", help="W&B group (default: the runs' group)")
    parser.add_argument(
        "--colors",
        type=Path,
        help="a JSON file of series label -> colour that several reports share: its colours "
        "are kept, new series get free ones, and it is written back (a study's reports then "
        "draw each series in one colour)",
    )
    args = parser.parse_args(argv)
    root: Path = args.multirun_dir
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; expected a sweep's directory")
    sweep = collect(root)
    if not sweep.runs:
        raise ReportError(no_runs(sweep))
    out = (args.out or root / "report").resolve()
    colors = report_colors(sweep.runs, read_colors(args.colors) if args.colors else None)
    written, lines = write_report(sweep, out, colors)
    if args.colors:
        atomic_write_text(args.colors, json.dumps(colors, indent=1, sort_keys=True) + "\n")
    for line in lines:
        print(line)
    print(f"Wrote {', '.join(path.name for path in written)} to {out}")
    if args.wandb:
        log_to_wandb(sweep, out, written, args.wandb_project, args.wandb_group)
    return 0


def read_colors(path: Path) -> dict[str, str]:
    """``--colors``: label -> colour from ``path`` ({} while it does not exist yet)."""
    if not path.exists():
        return {}
    try:
        colors = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"--colors {path}: {error}; expected a JSON object") from None
    if not isinstance(colors, dict):
        raise ReportError(f"--colors {path}: expected a JSON object of label -> colour")
    for label, color in colors.items():
        if not isinstance(color, str) or not is_color_like(color):
            raise ReportError(
                f"--colors {path}: {label!r} has colour {color!r}; expected a matplotlib "
                "colour such as '#1f77b4'"
            )
    return colors


def log_to_wandb(
    sweep: Sweep, out: Path, written: list[Path], project: str | None, group: str | None
) -> None:
    """The report's figures and tables in a W&B run of the sweep's group."""
    from editexp import tracking

    identities = [tracking.read_identity(run.directory) or {} for run in sweep.runs]
    project = project or next((i["project"] for i in identities if i.get("project")), None)
    if group is None:
        group = tracking.report_group([run.directory for run in sweep.runs], sweep.root)
    reader = csv.reader(io.StringIO(results_csv(sweep)))
    header, *rows = list(reader)
    tables = {"results": (header, [[_number(cell) for cell in row] for row in rows])}
    for name, text in lambda_tables(sweep).items():
        if name.endswith(".md"):
            lines = [line for line in text.splitlines() if line.startswith("| ")]
            cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
            tables[name.removesuffix(".md")] = (cells[0], cells[1:])
    run_id = tracking.log_report(out, written, tables, group, project)
    print(f"Logged the report to W&B run {run_id} (group {group})")


def _number(cell: str) -> float | str | None:
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


if __name__ == "__main__":
    sys.exit(main())
