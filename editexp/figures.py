"""Paper-ready figures (and LaTeX tables) of a sweep, drawn from plain inputs.

The inputs are plain data, not files: `RunResult` (a run's axes and its pre / post metric
statistics) and `Curve` (a sequential run's mean over all facts edited so far, after each
update). `editexp-report` builds them from a sweep's outputs.

- `axis_figures(runs)`: for every axis that varies among the runs of a mode (layer, batch
  size, number of edits, lambda), the post-edit metrics against it: Fig. 1 (layer search),
  Figs. 2-3 (batch size, log2 x), lambda (Tables 3-4 as a figure, log x, one row per
  algorithm since their lambda ranges differ), and e.g. metric vs layer for a batch-mode
  sweep over layers. One line per algorithm and value of the other varying axes.
- `sequential_figure(curves)`: Figs. 4-5, the mean over all facts edited so far against the
  number of edits (log2 x), one line per batch size, one row per algorithm; model-level
  metrics scored along the run (held-out perplexity PPL: a forgetting curve) get a panel too.

Every panel: the metric with its unit on the y axis (and "lower is better" where it is), the
axis with its unit on the x axis, the pre-edit (unedited model) value as a dashed line, error
bars (bands for curves) of +-1 standard error over facts (for S, a harmonic mean of three
means, by the delta method; none in summaries written before S had one, nor for model-level
metrics), the legend outside the axes. Percent metrics (ES, PS, NS, S) span 0-100 in every
panel, so that equal changes look equal; the others scale to their data. A series has one
colour in every figure drawn with the same ``colors`` mapping (:func:`series_colors` of
:func:`series_labels`, as ``editexp-report`` does). `save` writes PNG at 200 dpi and PDF.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps, ticker
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullLocator

from editexp.cache import atomic_write
from editexp.metric_specs import headline_metrics, spec

AXIS_LABELS = {
    "layer": "edited layer (index)",
    "batch_size": "batch size (edits per update)",
    "n_edits": "number of edits (facts)",
    "lambda": "λ (regularisation weight)",
    "edits_done": "number of edits so far (facts)",
}
AXIS_NAMES = {
    "algorithm": "",
    "layer": "layer",
    "batch_size": "batch",
    "n_edits": "edits",
    "lambda": "λ",
    "model": "",
    "mode": "",
    "eval_schedule": "eval",
    "keep_edits": "keep edits",
}
X_AXES = ("layer", "batch_size", "n_edits", "lambda")
CONTEXT_AXES = (
    "algorithm",
    "model",
    "layer",
    "batch_size",
    "n_edits",
    "lambda",
    "keep_edits",
    "eval_schedule",
)
LOG_BASE = {"batch_size": 2, "n_edits": 2, "edits_done": 2, "lambda": 10}
ERROR_LABEL = "±1 standard error over facts\n(S: delta method)"
PRE_LABEL = "pre-edit (unedited model)"
DPI = 200
# tab10, tab20's lighter halves, then tab20b and tab20c: 60 distinct colours, then repeated
PALETTE = tuple(
    dict.fromkeys(
        to_hex(color)
        for name in ("tab10", "tab20", "tab20b", "tab20c")
        for color in colormaps[name].colors
    )
)
PERCENT_LIMITS = (-3.0, 103.0)  # 0-100 with room for the markers


@dataclass(frozen=True)
class MetricSummary:
    """A metric over facts: mean, population std (as the reference reports), count, and a
    standard error where it is not the mean's (S's, by the delta method)."""

    mean: float
    std: float | None = None
    n: int | None = None
    se: float | None = None

    @property
    def sem(self) -> float | None:
        """``se`` when given, else the standard error of the mean: the sample std over
        sqrt(n) = std / sqrt(n - 1)."""
        if self.se is not None:
            return self.se
        if self.std is None or self.n is None or self.n < 2:
            return None
        return self.std / math.sqrt(self.n - 1)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> MetricSummary | None:
        if not block or block.get("mean") is None:
            return None
        return cls(float(block["mean"]), block.get("std"), block.get("n"), block.get("se"))


def summaries_of(blocks: Mapping[str, Any] | None) -> dict[str, MetricSummary]:
    """{"ES": {"mean", "std", "n"}, ...} (summary.json's pre / post) -> {"ES": MetricSummary,
    ...}, for every headline metric (``editexp.metric_specs``) in ``blocks``."""
    out = {}
    for metric in headline_metrics(blocks or {}):
        stat = MetricSummary.from_dict((blocks or {}).get(metric))
        if stat is not None:
            out[metric] = stat
    return out


@dataclass(frozen=True)
class RunResult:
    """One run: its axes (algorithm, model, layer as a tuple, mode, batch_size, n_edits,
    lambda, eval_schedule) and its pre- and post-edit metrics."""

    axes: Mapping[str, Any]
    pre: Mapping[str, MetricSummary]
    post: Mapping[str, MetricSummary]


@dataclass(frozen=True)
class Curve:
    """A sequential run: after each update, the mean over all facts edited so far."""

    axes: Mapping[str, Any]
    edits_done: Sequence[int]
    so_far: Sequence[Mapping[str, MetricSummary]]
    pre: Mapping[str, MetricSummary] = field(default_factory=dict)


# --------------------------------------------------------------------------- labels


def _label(axes: Mapping[str, Any], names: Sequence[str]) -> str:
    parts = []
    for name in names:
        value = axes.get(name)
        text = value.upper() if name == "algorithm" and isinstance(value, str) else None
        prefix = AXIS_NAMES.get(name, name)
        shown = _shown(value)
        parts.append(text or (f"{prefix} {shown}" if prefix else shown))
    return ", ".join(parts) or "post-edit"


def format_value(value: Any) -> str:
    """A grid value in a table cell, tick or label: lists as "4,5,6", whole floats as ints,
    None as ""."""
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _shown(value: Any) -> str:
    """A value in a legend or title: :func:`format_value`, with "on"/"off" and "none"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return format_value(value) or "none"


def _varying(
    items: Iterable[Mapping[str, Any]], names: Iterable[str], within_algorithm: bool = False
) -> list[str]:
    """The names whose value differs among the runs: lambda (or, ``within_algorithm``, every
    name) only where it differs among the runs of one algorithm, so that each algorithm's own
    default lambda does not label the lines, while e.g. two algorithms' runs of different
    numbers of edits are told apart."""
    items = list(items)
    by_algorithm: dict[Any, list[Mapping[str, Any]]] = {}
    for item in items:
        by_algorithm.setdefault(item.get("algorithm"), []).append(item)

    def differs(name: str) -> bool:
        groups = by_algorithm.values() if within_algorithm or name == "lambda" else [items]
        return any(len({_hashable(i.get(name)) for i in group}) > 1 for group in groups)

    return [name for name in names if differs(name)]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _title(axes_list: Sequence[Mapping[str, Any]], skip: Sequence[str]) -> str:
    """What every plotted run shares: model, mode, number of edits, layer..."""
    modes = {axes.get("mode") for axes in axes_list}
    if modes != {"sequential"}:  # the schedule only matters for sequential runs
        skip = [*skip, "eval_schedule"]
    if modes <= {"singular", "batch"}:  # batch size 1, or the number of edits
        skip = [*skip, "batch_size"]
    parts = []
    names = ("model", "mode", "n_edits", "batch_size", "layer", "lambda", "eval_schedule")
    for name in (*names, "keep_edits"):
        values = {_hashable(axes.get(name)) for axes in axes_list}
        plain = name == "keep_edits" and values == {False}  # named only where it was on
        if name in skip or len(values) != 1 or None in values or plain:
            continue
        (value,) = values
        parts.append(
            {
                "model": str(value),
                "mode": f"{value} editing",
                "n_edits": f"{value} edits",
                "eval_schedule": f"scored {value}",
            }.get(name)
            or f"{AXIS_NAMES[name]} {_shown(value)}"
        )
    return ", ".join(parts)


# --------------------------------------------------------------------------- drawing


@dataclass
class Line:
    """One plotted line: x values with their metric statistics, and the pre-edit values."""

    label: str
    points: list[tuple[Any, Mapping[str, MetricSummary]]] = field(default_factory=list)
    pre: list[tuple[Any, Mapping[str, MetricSummary]]] = field(default_factory=list)


def _combine(stats: Sequence[MetricSummary]) -> MetricSummary:
    """Average of several runs' means at one x (e.g. seeds); their standard errors combined
    as independent: sqrt(sum sem^2) / k."""
    mean = sum(s.mean for s in stats) / len(stats)
    sems = [s.sem for s in stats]
    if len(stats) == 1 or any(sem is None for sem in sems):
        return stats[0] if len(stats) == 1 else MetricSummary(mean)
    sem = math.sqrt(sum(sem * sem for sem in sems)) / len(stats)
    return MetricSummary(mean, n=sum(s.n or 0 for s in stats), se=sem)


def _collapse(points: Sequence[tuple[Any, Mapping[str, MetricSummary]]]) -> list[tuple[Any, dict]]:
    """Points sharing an x averaged, sorted by x."""
    grouped: dict[Any, list[Mapping[str, MetricSummary]]] = {}
    for x, stats in points:
        grouped.setdefault(x, []).append(stats)
    out = []
    for x in sorted(grouped, key=lambda v: (isinstance(v, str), v)):
        metrics = {m for stats in grouped[x] for m in stats}
        out.append(
            (x, {m: _combine([s[m] for s in grouped[x] if m in s]) for m in sorted(metrics)})
        )
    return out


def _set_x_scale(ax, axis: str, xs: Sequence[Any]) -> None:
    """Log x for batch sizes, edits (base 2) and lambda (base 10; symlog when 0 is among the
    values, as EMMET's lambda grid has), ticks at the data or at powers of the base."""
    numeric = sorted({float(x) for x in xs if isinstance(x, int | float)})
    if not numeric:
        return
    base = LOG_BASE.get(axis)
    positive = [x for x in numeric if x > 0]
    if not base or not positive or numeric[0] < 0:
        if len(numeric) <= 12 and all(x.is_integer() for x in numeric):
            ax.set_xticks(numeric, labels=[format_value(x) for x in numeric])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return
    margin = base**0.3 if base == 10 else base**0.4  # the log-space room beside the data
    if numeric[0] == 0:
        ax.set_xscale("symlog", base=base, linthresh=positive[0], linscale=1.0)
        ax.set_xlim(-0.5 * positive[0], positive[-1] * margin)
    else:
        ax.set_xscale("log", base=base)
        ax.set_xlim(positive[0] / margin, positive[-1] * margin)
    low = math.floor(math.log(positive[0], base) + 1e-9)
    high = math.floor(math.log(positive[-1], base) + 1e-9)
    if base == 2 and len(numeric) <= 8:
        ticks, labels = numeric, [format_value(x) for x in numeric]
    else:
        step = max(1, math.ceil((high - low + 1) / (7 if base == 2 else 4)))
        powers = [k for k in range(low, high + 1) if (k - low) % step == 0]
        ticks = [float(base) ** k for k in powers]
        labels = [format_value(t) if base == 2 else f"$10^{{{k}}}$" for t, k in zip(ticks, powers)]
        if numeric[0] == 0:
            ticks, labels = [0.0, *ticks], ["0", *labels]
    ax.set_xticks(ticks, labels=labels)
    ax.xaxis.set_minor_locator(NullLocator())
    if base == 2 and max(len(label) for label in labels) >= 4:  # 1024 and 2048 would touch
        ax.tick_params(axis="x", labelrotation=45)


def _dodge(axis: str, xs: Sequence[Any], n_lines: int) -> Callable[[Any, int], Any]:
    """Shift line ``i`` of ``n_lines`` sideways by a few percent of the spacing of the x
    values, so that error bars of lines with equal values stay apart (log axes: a factor)."""
    numeric = sorted({float(x) for x in xs if isinstance(x, int | float)})
    if n_lines < 2 or len(numeric) < 1:
        return lambda x, i: x
    base = LOG_BASE.get(axis)
    logarithmic = base is not None and numeric[0] > 0
    points = [math.log(x, base) for x in numeric] if logarithmic else numeric
    gaps = [b - a for a, b in zip(points, points[1:])]
    width = 0.12 * (min(gaps) if gaps else 1.0)

    def shift(x: Any, i: int) -> Any:
        offset = (i / (n_lines - 1) - 0.5) * width
        if not isinstance(x, int | float):
            return x
        return x * base**offset if logarithmic else x + offset

    return shift


def _panel(
    ax, axis: str, metric: str, lines: Sequence[Line], colors: Mapping[str, str], band: bool
) -> None:
    xs_all: list[Any] = []
    categorical = any(isinstance(x, str) for line in lines for x, _ in line.points)
    order = sorted({x for line in lines for x, _ in line.points}, key=str) if categorical else []

    def position(x: Any) -> Any:
        return order.index(x) if categorical else x

    pre_lines: dict[str, list[tuple[Any, float]]] = {}
    drawn = [line for line in lines if any(metric in s for _, s in line.points)]
    shift = _dodge(axis, [position(x) for line in drawn for x, _ in line.points], len(drawn))
    for index, line in enumerate(drawn):
        points = [(x, s[metric]) for x, s in _collapse(line.points) if metric in s]
        xs = [position(x) for x, _ in points]
        xs_all += [x for x, _ in points]
        means = [stat.mean for _, stat in points]
        sems = [stat.sem for _, stat in points]
        color = colors[line.label]
        marker = "o" if len(points) <= 30 else None
        if band and len(points) > 1:
            ax.plot(xs, means, color=color, marker=marker, markersize=3, lw=1.5)
            known = [sem is not None for sem in sems]  # none for one fact, or model-level
            if any(known):
                low = [m - (s or 0.0) for m, s in zip(means, sems)]
                high = [m + (s or 0.0) for m, s in zip(means, sems)]
                ax.fill_between(xs, low, high, where=known, color=color, alpha=0.2, lw=0)
        else:
            yerr = [s if s is not None else 0.0 for s in sems] if any(sems) else []
            ax.errorbar(
                xs if band else [shift(x, index) for x in xs], means, yerr=yerr or None,
                color=color, marker=marker, markersize=4, capsize=3, lw=1.5,
            )  # fmt: skip
        pre = [(position(x), s[metric].mean) for x, s in _collapse(line.pre) if metric in s]
        if pre:
            pre_lines[line.label] = pre
    _pre_edit(ax, pre_lines, colors)
    if categorical:
        ax.set_xticks(range(len(order)), labels=[format_value(x) for x in order])
    else:
        _set_x_scale(ax, axis, xs_all)
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    _set_y_axis(ax, metric)
    ax.grid(alpha=0.3)


def _pre_edit(
    ax, pre_lines: Mapping[str, Sequence[tuple[Any, float]]], colors: Mapping[str, str]
) -> None:
    """The pre-edit baseline: one grey dashed line when every run shares it (a level, or the
    same values at the same x: the same facts), else one per line in the line's colour."""
    pre_values = {round(v, 9): v for pre in pre_lines.values() for _, v in pre}
    shared = {tuple((x, round(v, 9)) for x, v in pre) for pre in pre_lines.values()}
    if len(pre_values) == 1:
        ax.axhline(*pre_values.values(), color="0.35", ls="--", lw=1.2, zorder=1)
    elif len(shared) == 1:
        pre = next(iter(pre_lines.values()))
        ax.plot([p[0] for p in pre], [p[1] for p in pre], color="0.35", ls="--", lw=1.2, zorder=1)
    else:
        for label, pre in pre_lines.items():
            ax.plot([p[0] for p in pre], [p[1] for p in pre], color=colors[label], ls="--",
                    lw=1.0, alpha=0.8)  # fmt: skip


def _set_y_axis(ax, metric: str) -> None:
    """The metric's label (noting when lower is better); a percent metric spans 0-100."""
    metric_spec = spec(metric)
    better = "" if metric_spec.higher_is_better else "\n(lower is better)"
    ax.set_ylabel(metric_spec.label + better)
    if metric_spec.unit == "%":
        ax.set_ylim(*PERCENT_LIMITS)
        ax.set_yticks(range(0, 101, 20))
    if metric_spec.log_axis:  # plain numbers on the ticks, the minor ones too within a decade
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(
            ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5))
        )


def _natural(label: str) -> tuple:
    """A sort key that orders the numbers inside labels by value ("batch 4" < "batch 16")."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def series_colors(labels: Iterable[str], taken: Mapping[str, str] | None = None) -> dict[str, str]:
    """A colour for every series label: the labels sorted (numbers by value) take the
    :data:`PALETTE` in turn, after the colours already ``taken`` (which are kept)."""
    taken = dict(taken or {})
    free = [color for color in PALETTE if color not in set(taken.values())] or list(PALETTE)
    new = sorted({label for label in labels if label not in taken}, key=_natural)
    return {**taken, **{label: free[i % len(free)] for i, label in enumerate(new)}}


def _draw(
    rows: Mapping[str, Sequence[Line]],
    axis: str,
    title: str,
    band: bool = False,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """One row of panels per key of ``rows`` (e.g. algorithm), one column per metric; a
    single row of 5 metrics is folded into 2 x 3 with the legend in the free cell. The legend
    (lines, the pre-edit dashes, what the error bars are) is outside every data panel.
    ``colors``: series label -> colour (labels missing from it get free colours)."""
    present = [m for lines in rows.values() for line in lines for _, s in line.points for m in s]
    metrics = [m for m in headline_metrics(present) if m in present]
    labels = list(dict.fromkeys(line.label for lines in rows.values() for line in lines))
    colors = series_colors(labels, colors)
    cells: list[tuple[str, str]] = [(row, metric) for row in rows for metric in metrics]
    if len(rows) == 1 and len(metrics) > 3:
        n_rows, n_cols = 2, math.ceil(len(metrics) / 2)
    else:
        n_rows, n_cols = len(rows), len(metrics)
    legend_in_cell = n_rows * n_cols > len(cells)
    width = 3.4 * n_cols + (0 if legend_in_cell else 2.6)
    figure = Figure(figsize=(width, 3.0 * n_rows + 0.5), layout="constrained")
    grid = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (row_name, metric) in zip(grid, cells):
        _panel(ax, axis, metric, rows[row_name], colors, band)
        ax.set_title(metric + (f": {row_name}" if row_name else ""), fontsize="medium")

    handles: list[Any] = [Line2D([], [], color=colors[lab], marker="o", lw=1.5) for lab in labels]
    handles.append(Line2D([], [], color="0.35", ls="--", lw=1.2))
    if band:
        handles.append(Patch(color="0.5", alpha=0.3))
    else:
        handles.append(Line2D([], [], color="0.35", marker="|", markersize=10, ls="none"))
    legend_labels = [*labels, PRE_LABEL, ERROR_LABEL]
    if legend_in_cell:
        for ax in grid[len(cells) :]:
            ax.axis("off")
        grid[len(cells)].legend(handles, legend_labels, loc="center", frameon=False)
    else:
        figure.legend(
            handles, legend_labels, loc="outside right center", fontsize="small", frameon=False
        )
    if title:
        figure.suptitle(title)
    return figure


# --------------------------------------------------------------------------- the figures


def _x_value(run: RunResult, axis: str) -> Any:
    value = run.axes.get(axis)
    if axis == "layer" and isinstance(value, tuple | list):
        return value[0] if len(value) == 1 else ",".join(str(v) for v in value)
    return value


def _figure_axes(mode: str) -> list[str]:
    skip = {"batch": {"n_edits"}, "singular": {"batch_size"}}.get(mode, set())
    return [axis for axis in X_AXES if axis not in skip]


def _axis_plans(runs: Sequence[RunResult]) -> dict[str, tuple[list[RunResult], str, str]]:
    """``metric_vs_<axis>`` (suffixed ``_<mode>`` when the runs have several modes) -> its
    runs, axis and mode, for every axis that varies among the runs of one algorithm in a
    mode."""
    plans: dict[str, tuple[list[RunResult], str, str]] = {}
    modes = sorted({str(run.axes.get("mode")) for run in runs})
    for mode in modes:
        group = [run for run in runs if str(run.axes.get("mode")) == mode]
        for axis in _figure_axes(mode):
            plotted = [run for run in group if _x_value(run, axis) is not None]
            points = [{**r.axes, axis: _x_value(r, axis)} for r in plotted]
            if not _varying(points, [axis], within_algorithm=True):
                continue
            name = f"metric_vs_{axis}" + (f"_{mode}" if len(modes) > 1 else "")
            plans[name] = (plotted, axis, mode)
    return plans


def axis_figures(
    runs: Sequence[RunResult], colors: Mapping[str, str] | None = None
) -> dict[str, Figure]:
    """``metric_vs_<axis>`` for every axis that varies among the runs of one algorithm in a
    mode (suffixed ``_<mode>`` when the runs have several modes)."""
    return {
        name: axis_figure(plotted, axis, mode, colors)
        for name, (plotted, axis, mode) in _axis_plans(runs).items()
    }


def axis_figure(
    runs: Sequence[RunResult], axis: str, mode: str, colors: Mapping[str, str] | None = None
) -> Figure:
    """Post-edit metrics of ``runs`` against ``axis``: a line per algorithm and value of the
    other varying axes (for lambda, a row of panels per algorithm)."""
    rows, title = _axis_rows(runs, axis, mode)
    return _draw(rows, axis, title, colors=colors)


def _axis_rows(
    runs: Sequence[RunResult], axis: str, mode: str
) -> tuple[dict[str, list[Line]], str]:
    """The lines of :func:`axis_figure` by row, and its title."""
    same = {"batch": ("batch_size", "n_edits")}.get(mode, ())  # one follows the other
    excluded = {axis, "mode", *(same if axis in same else ())}
    by_row = axis == "lambda"  # each algorithm has its own lambda range
    context = [n for n in CONTEXT_AXES if n not in excluded and n != "algorithm"]
    label_names = [] if by_row else ["algorithm"]
    label_names += _varying([r.axes for r in runs], context)
    rows: dict[str, dict[str, Line]] = {}
    for run in sorted(runs, key=lambda r: _sort(r.axes)):
        row = str(run.axes.get("algorithm")).upper() if by_row else ""
        label = _label(run.axes, label_names)
        line = rows.setdefault(row, {}).setdefault(label, Line(label))
        x = _x_value(run, axis)
        line.points.append((x, run.post))
        line.pre.append((x, run.pre))
    skip = [axis, *(excluded - {"mode"}), *label_names, *(["algorithm"] if by_row else [])]
    title = _title([run.axes for run in runs], skip=skip)
    return {row: list(lines.values()) for row, lines in rows.items()}, title


def sequential_figure(
    curves: Sequence[Curve], colors: Mapping[str, str] | None = None
) -> Figure | None:
    """Mean over the facts edited so far vs edits done: a line per batch size (and per value
    of the other axes that vary), a row per algorithm; a panel per metric scored along the
    runs, model-level ones (PPL) included."""
    planned = _sequential_rows(curves)
    if planned is None:
        return None
    rows, title = planned
    return _draw(rows, "edits_done", title, band=True, colors=colors)


def _sequential_rows(curves: Sequence[Curve]) -> tuple[dict[str, list[Line]], str] | None:
    """The lines of :func:`sequential_figure` by row, and its title; None without a curve."""
    curves = [curve for curve in curves if curve.edits_done]
    if not curves:
        return None
    names = [n for n in CONTEXT_AXES if n not in ("algorithm", "batch_size")]
    label_names = ["batch_size", *_varying([c.axes for c in curves], names)]
    rows: dict[str, list[Line]] = {}
    for curve in sorted(curves, key=lambda c: (str(c.axes.get("algorithm")), _sort(c.axes))):
        line = Line(_label(curve.axes, label_names))
        line.points = [(x, stats) for x, stats in zip(curve.edits_done, curve.so_far) if stats]
        line.pre = [(x, curve.pre) for x, _ in line.points] if curve.pre else []
        rows.setdefault(str(curve.axes.get("algorithm")).upper(), []).append(line)
    title = _title([c.axes for c in curves], skip=["algorithm", *label_names])
    return rows, "mean over all facts edited so far" + (f" ({title})" if title else "")


def series_labels(runs: Sequence[RunResult], curves: Sequence[Curve] = ()) -> list[str]:
    """Every series label of :func:`axis_figures` of ``runs`` and :func:`sequential_figure`
    of ``curves``: the keys of one ``colors`` mapping for all of them."""
    labels = [label for plan in _axis_plans(runs).values() for label in line_labels(*plan)]
    sequential = _sequential_rows(curves)
    if sequential is not None:
        labels += [line.label for lines in sequential[0].values() for line in lines]
    return list(dict.fromkeys(labels))


def line_labels(runs: Sequence[RunResult], axis: str, mode: str) -> list[str]:
    """The series labels of :func:`axis_figure` of ``runs`` against ``axis``."""
    rows, _ = _axis_rows(runs, axis, mode)
    return [line.label for lines in rows.values() for line in lines]


def _sort(axes: Mapping[str, Any]) -> tuple:
    return tuple(
        (0, axes[n]) if isinstance(axes.get(n), int | float) else (1, str(axes.get(n)))
        for n in CONTEXT_AXES
    )


# --------------------------------------------------------------------------- files


def save(figure: Figure, stem: Path) -> list[Path]:
    """``<stem>.png`` (200 dpi) and ``<stem>.pdf``, each written atomically."""
    stem = Path(stem)
    paths = []
    for fmt, kwargs in (("png", {"dpi": DPI}), ("pdf", {})):
        path = stem.with_name(f"{stem.name}.{fmt}")
        paths.append(atomic_write(path, _saver(figure, fmt, kwargs)))
    return paths


def _saver(figure: Figure, fmt: str, kwargs: dict) -> Callable[[Path], None]:
    return lambda tmp: figure.savefig(tmp, format=fmt, bbox_inches="tight", **kwargs)


def latex_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, bold_row: int | None = None
) -> str:
    """A booktabs LaTeX table (``\\usepackage{booktabs}``); ``bold_row`` is set in bold."""

    def escape(text: str) -> str:
        text = text.replace("λ", "$\\lambda$").replace("±", "$\\pm$")
        for char in ("%", "&", "_", "#"):
            text = text.replace(char, "\\" + char)
        return text

    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\begin{{tabular}}{{{'l' + 'r' * (len(header) - 1)}}}",
        "\\toprule",
        " & ".join(escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    for index, row in enumerate(rows):
        cells = [escape(cell) for cell in row]
        if index == bold_row:
            cells = [f"\\textbf{{{cell}}}" if cell else cell for cell in cells]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{escape(caption)}}}", "\\end{table}"]
    return "\n".join(lines) + "\n"
