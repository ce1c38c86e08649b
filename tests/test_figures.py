"""Paper-ready figures: which figures a sweep gets, and what every panel shows (units, the
pre-edit baseline, standard-error bars, log axes, the legend outside the data), the
sequential curves' running mean, PNG at 200 dpi plus PDF, the LaTeX lambda tables."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from editexp import figures as F
from editexp.metric_specs import spec
from editexp.record import RunRecord
from editexp.report import main, sequential_curve
from editexp.sweep_runs import FinishedRun

METRICS = ("ES", "PS", "NS", "S", "GE")
S_SE = 1.5  # S's standard error (delta method), as summary.json gives it


def stats(
    es: float, ns: float = 80.0, n: int = 16, pre: bool = False
) -> dict[str, F.MetricSummary]:
    ps = es - 10
    out = {
        "ES": F.MetricSummary(es, 20.0, n),
        "PS": F.MetricSummary(ps, 10.0, n),
        "NS": F.MetricSummary(ns, 5.0, n),
        "S": F.MetricSummary(3 / (1 / es + 1 / ps + 1 / ns), se=S_SE),
    }
    if not pre:
        out["GE"] = F.MetricSummary(600.0, 8.0, 4)
    return out


PRE = stats(15.0, 90.0, pre=True)


def result(**axes) -> F.RunResult:
    base = {
        "algorithm": "memit",
        "model": "tiny",
        "layer": (1,),
        "mode": "batch",
        "batch_size": 16,
        "n_edits": 16,
        "lambda": 100.0,
        "eval_schedule": "each_batch",
    }
    base.update(axes)
    es = 90.0 - base["layer"][0] - math.log2(base["batch_size"]) + (base["lambda"] or 0) / 1e4
    return F.RunResult(base, PRE, stats(es))


def data_axes(figure) -> list:
    return [ax for ax in figure.axes if ax.axison]


# --------------------------------------------------------------------------- which figures


def test_figures_follow_the_axes_that_vary() -> None:
    layer_search = [result(algorithm=a, layer=(i,), mode="singular", batch_size=1, n_edits=8,
                           **{"lambda": None if a == "rome" else 100.0})
                    for a in ("rome", "memit") for i in range(3)]  # fmt: skip
    assert set(F.axis_figures(layer_search)) == {"metric_vs_layer"}

    # batch mode: batch size = number of edits; each algorithm has its own default lambda
    batch = [
        result(algorithm=a, batch_size=b, n_edits=b, **{"lambda": lam})
        for a, lam in (("memit", 100.0), ("emmet", 0.0))
        for b in (16, 64, 256)
    ]
    assert set(F.axis_figures(batch)) == {"metric_vs_batch_size"}

    # the case: a batch-mode sweep over two layers gets metric vs layer
    two_layers = [result(layer=(layer,)) for layer in (1, 2)]
    assert set(F.axis_figures(two_layers)) == {"metric_vs_layer"}

    lambdas = [result(**{"lambda": lam}) for lam in (1.0, 10.0, 100.0)]
    lambdas += [result(algorithm="emmet", **{"lambda": lam}) for lam in (0.0, 1e-3)]
    assert set(F.axis_figures(lambdas)) == {"metric_vs_lambda"}

    mixed = two_layers + [result(layer=(layer,), mode="singular") for layer in (1, 2)]
    assert set(F.axis_figures(mixed)) == {"metric_vs_layer_batch", "metric_vs_layer_singular"}

    assert F.axis_figures([result()]) == {}


# --------------------------------------------------------------------------- what a panel shows


def test_axis_figure_panels_are_labelled_with_baseline_and_standard_errors() -> None:
    runs = [result(algorithm=a, batch_size=b, n_edits=b) for a in ("memit", "emmet")
            for b in (16, 64, 256, 1024)]  # fmt: skip
    figure = F.axis_figures(runs)["metric_vs_batch_size"]
    axes = data_axes(figure)
    assert [ax.get_title() for ax in axes] == list(METRICS)
    for ax, metric in zip(axes, METRICS):
        assert ax.get_xlabel() == "batch size (edits per update)"
        assert ax.get_ylabel() == spec(metric).label and "(" in ax.get_ylabel()
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64", "256", "1024"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        if metric in PRE:
            (baseline,) = dashed  # every run shares the pre-edit value: one dashed line
            assert set(baseline.get_ydata()) == {PRE[metric].mean}
        else:
            assert not dashed  # GE has no pre-edit value here
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 2  # one per algorithm
        memit = next(b for b in bars if b.lines[0].get_color() == F.PALETTE[1])
        means = memit.lines[0].get_ydata()
        expected = [result(batch_size=b).post[metric].mean for b in (16, 64, 256, 1024)]
        assert np.allclose(means, expected)
        (segments,) = memit.lines[2]
        half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()]
        if metric == "S":  # the delta method's, from summary.json
            assert np.allclose(half, S_SE)
        else:
            sem = result().post[metric].std / math.sqrt(result().post[metric].n - 1)
            assert np.allclose(half, sem)

    legend_texts = [t.get_text() for t in figure.axes[-1].get_legend().get_texts()]
    assert legend_texts[:2] == ["EMMET", "MEMIT"]
    assert F.PRE_LABEL in legend_texts
    assert any("standard error" in text for text in legend_texts)
    _assert_legend_outside_data(figure)


def _assert_legend_outside_data(figure) -> None:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend()] + figure.legends
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data_axes(figure):
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_pre_edit_baseline_per_line_when_runs_differ() -> None:
    """Batch scaling edits different fact sets: each line's own dashed pre-edit values."""
    runs = []
    for b, pre_es in ((16, 10.0), (64, 20.0)):
        pre = {**PRE, "ES": F.MetricSummary(pre_es, 1.0, b)}
        runs.append(F.RunResult({**result().axes, "batch_size": b, "n_edits": b}, pre, stats(90)))
    ax = data_axes(F.axis_figures(runs)["metric_vs_batch_size"])[0]
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(dashed.get_ydata()) == [10.0, 20.0]
    assert dashed.get_color() == "0.35"  # one line's: the legend's grey pre-edit dashes

    # two algorithms on the same facts share the values: still one grey line
    emmet = [F.RunResult({**r.axes, "algorithm": "emmet"}, r.pre, stats(80)) for r in runs]
    ax = data_axes(F.axis_figures(runs + emmet)["metric_vs_batch_size"])[0]
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(dashed.get_ydata()) == [10.0, 20.0] and dashed.get_color() == "0.35"

    # other facts for EMMET: a dashed line per algorithm, in its colour
    emmet = [
        F.RunResult(r.axes, {**r.pre, "ES": F.MetricSummary(30.0, 1.0, 16)}, r.post) for r in emmet
    ]
    ax = data_axes(F.axis_figures(runs + emmet)["metric_vs_batch_size"])[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(tuple(line.get_ydata()) for line in dashed) == [(10.0, 20.0), (30.0, 30.0)]
    assert {line.get_color() for line in dashed} == {F.PALETTE[0], F.PALETTE[1]}


def test_s_without_a_standard_error_gets_no_bar() -> None:
    """summary.json files written before S had "se" still draw, without a bar for S."""
    assert F.MetricSummary.from_dict({"mean": 50.0, "se": 2.0}).sem == 2.0
    assert F.MetricSummary.from_dict({"mean": 50.0}).sem is None
    old = {**stats(80.0), "S": F.MetricSummary.from_dict({"mean": 70.0})}
    runs = [F.RunResult({**result().axes, "layer": (layer,)}, PRE, old) for layer in (1, 2)]
    ax = data_axes(F.axis_figures(runs)["metric_vs_layer"])[3]
    assert ax.get_title() == "S"
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert not bars.has_yerr


def _solid_colors(ax) -> dict[tuple, str]:
    """The y values of each solid data line of ``ax`` -> its colour."""
    lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    return {tuple(line.get_ydata()): line.get_color() for line in lines}


def test_a_series_has_one_colour_in_every_figure() -> None:
    batch = [result(algorithm=a, batch_size=b, n_edits=b, **{"lambda": lam})
             for a, lam in (("memit", 100.0), ("emmet", 0.0)) for b in (16, 64)]  # fmt: skip
    layers = [result(layer=(layer,), mode="singular", batch_size=1) for layer in (1, 2)]
    runs = batch + layers
    memit_layers = tuple(r.post["ES"].mean for r in layers)
    memit_batch = tuple(result(batch_size=b).post["ES"].mean for b in (16, 64))

    def memit_colors(colors):
        figures = F.axis_figures(runs, colors)
        by_batch = _solid_colors(data_axes(figures["metric_vs_batch_size_batch"])[0])
        by_layer = _solid_colors(data_axes(figures["metric_vs_layer_singular"])[0])
        assert len(by_batch) == 2 and len(by_layer) == 1  # EMMET and MEMIT; MEMIT alone
        return by_batch[memit_batch], by_layer[memit_layers]

    in_batch, in_layer = memit_colors(None)
    assert in_batch != in_layer  # each figure on its own: MEMIT is its first or second series
    colors = F.series_colors(F.series_labels(runs))
    assert set(colors) == {"EMMET", "MEMIT"}
    assert memit_colors(colors) == (colors["MEMIT"], colors["MEMIT"])

    # sequential curves' labels join the mapping; numbers inside labels sort by value
    curve = F.Curve({**result().axes, "mode": "sequential", "batch_size": 4}, [4], [stats(80)])
    curves = [curve, F.Curve({**curve.axes, "batch_size": 16}, [16], [stats(70)])]
    assert F.series_labels([], curves) == ["batch 4", "batch 16"]
    colors = F.series_colors(["batch 16", "batch 4", "MEMIT"])
    assert [colors[k] for k in ("MEMIT", "batch 4", "batch 16")] == list(F.PALETTE[:3])
    assert F.series_colors(["a", "b"], {"b": F.PALETTE[0]}) == {
        "a": F.PALETTE[1],
        "b": F.PALETTE[0],
    }
    assert len(set(F.PALETTE)) == len(F.PALETTE) == 60
    # a study's 25th series: no colour another series already has (the palette has 60)
    taken = {f"series {i}": color for i, color in enumerate(F.PALETTE[:24])}
    assert F.series_colors(["new"], taken)["new"] not in taken.values()


def test_runs_of_different_numbers_of_edits_are_told_apart_across_algorithms() -> None:
    # the study's sequential schedules: EMMET's 1024 edits beside MEMIT's 2048; each
    # algorithm's own lambda still labels nothing
    runs = [result(algorithm="emmet", mode="sequential", batch_size=256, n_edits=1024,
                   **{"lambda": 1e-4})]  # fmt: skip
    runs += [result(mode="sequential", batch_size=b, n_edits=2048, **{"lambda": 1000.0})
             for b in (256, 1024)]  # fmt: skip
    labels = ["EMMET, edits 1024", "MEMIT, edits 2048"]
    assert F.line_labels(runs, "batch_size", "sequential") == labels
    assert set(F.axis_figures(runs)) == {"metric_vs_batch_size"}  # not vs n_edits: one each


def test_batch_sizes_to_2048_get_ticks_that_do_not_touch() -> None:
    runs = [result(batch_size=n, n_edits=n) for n in (16, 64, 256, 1024, 2048)]
    ax = data_axes(F.axis_figures(runs)["metric_vs_batch_size"])[0]
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == ["16", "64", "256", "1024", "2048"]
    assert {t.get_rotation() for t in labels} == {45.0}
    small = data_axes(F.axis_figures(runs[:3])["metric_vs_batch_size"])[0]
    assert {t.get_rotation() for t in small.get_xticklabels()} == {0.0}


def test_percent_panels_span_0_to_100_whatever_the_data() -> None:
    runs = [F.RunResult({**result().axes, "layer": (layer,)}, PRE, stats(70.0 + layer, ns=61.0))
            for layer in (1, 2, 3)]  # fmt: skip
    for ax in data_axes(F.axis_figures(runs)["metric_vs_layer"]):
        low, high = ax.get_ylim()
        if ax.get_title() == "GE":  # bits x 100: scaled to its data
            assert high - low < 100
        else:
            assert -5 <= low <= 0 and 100 <= high <= 105, ax.get_title()


def test_sequential_figure_draws_perplexity_against_edits() -> None:
    """A run with eval.metrics=[perplexity] records PPL pre and at every scored update: a
    forgetting curve, without a band (one value for the model, no spread over facts)."""
    xs = [4, 8, 12, 16]
    ppl = [20.0, 22.0, 25.0, 31.0]
    so_far = [{**stats(90.0 - x, n=x), "PPL": F.MetricSummary(p)} for x, p in zip(xs, ppl)]
    axes = {**result().axes, "mode": "sequential", "batch_size": 4}
    curve = F.Curve(axes, xs, so_far, {**PRE, "PPL": F.MetricSummary(18.0)})
    figure = F.sequential_figure([curve])
    (panel,) = [ax for ax in data_axes(figure) if ax.get_title() == "PPL: MEMIT"]
    assert panel.get_ylabel() == spec("PPL").label + "\n(lower is better)"
    (line,) = [line for line in panel.get_lines() if line.get_linestyle() == "-"]
    assert list(line.get_xdata()) == xs and list(line.get_ydata()) == ppl
    assert not any(isinstance(c, PolyCollection) for c in panel.collections)
    (dashed,) = [line for line in panel.get_lines() if line.get_linestyle() == "--"]
    assert set(dashed.get_ydata()) == {18.0}
    assert panel.get_ylim()[1] < 50  # not a percent: scaled to its data
    assert panel.get_yscale() == "log"  # one damaging edit can multiply it a hundredfold
    assert spec("ES").log_axis is False and all(ax.get_yscale() == "linear"
        for ax in data_axes(figure) if not ax.get_title().startswith("PPL"))  # fmt: skip
    _assert_legend_outside_data(figure)


def test_lambda_figure_rows_per_algorithm_with_symlog_for_zero() -> None:
    runs = [result(**{"lambda": lam}) for lam in (1.0, 100.0, 1e4)]
    runs += [result(algorithm="emmet", **{"lambda": lam}) for lam in (0.0, 1e-6, 1e-3)]
    figure = F.axis_figures(runs)["metric_vs_lambda"]
    axes = data_axes(figure)
    assert len(axes) == 10  # 2 algorithms x 5 metrics
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "ES: EMMET" and titles[5] == "ES: MEMIT"
    assert axes[0].get_xscale() == "symlog" and axes[5].get_xscale() == "log"
    assert axes[0].get_xticklabels()[0].get_text() == "0"
    assert axes[0].get_xlim()[0] < 0 < 1e-6 < 1e-3 < axes[0].get_xlim()[1]  # nothing clipped
    _assert_legend_outside_data(figure)


def test_layer_axis_is_linear_with_integer_ticks_and_title_names_the_setting() -> None:
    runs = [result(layer=(layer,), mode="singular", batch_size=1, n_edits=8) for layer in range(4)]
    figure = F.axis_figures(runs)["metric_vs_layer"]
    ax = data_axes(figure)[0]
    assert ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert figure.get_suptitle() == "tiny, singular editing, 8 edits, λ 100"


def test_sequential_title_says_when_every_run_kept_the_earlier_edits_keys() -> None:
    def title(keep_edits: bool, layer: tuple[int, ...] = (0,)) -> str:
        axes = {**result().axes, "mode": "sequential", "layer": layer, "keep_edits": keep_edits}
        return F.sequential_figure(
            [F.Curve(axes, [4, 8], [stats(80), stats(70)], PRE)]
        ).get_suptitle()

    assert "keep edits on" in title(True)
    assert "keep edits" not in title(False)  # the default goes unsaid
    assert "layer 0" in title(False)  # layer 0 is not mistaken for keep_edits=false


def test_multi_layer_runs_get_a_categorical_axis() -> None:
    runs = [result(layer=(1, 2)), result(layer=(2, 3))]
    ax = data_axes(F.axis_figures(runs)["metric_vs_layer"])[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1,2", "2,3"]


def test_sequential_figure_one_line_per_batch_size_with_bands() -> None:
    curves = []
    for algorithm in ("memit", "emmet"):
        for bs in (1, 4, 16):
            xs = list(range(bs, 17, bs))
            so_far = [stats(90.0 - x, n=x) for x in xs]
            axes = {**result().axes, "algorithm": algorithm, "mode": "sequential"}
            curves.append(F.Curve({**axes, "batch_size": bs}, xs, so_far, PRE))
    figure = F.sequential_figure(curves)
    axes = data_axes(figure)
    assert len(axes) == 10
    es = axes[5]  # MEMIT row
    assert es.get_title() == "ES: MEMIT" and es.get_xscale() == "log"
    assert es.get_xlabel() == F.AXIS_LABELS["edits_done"]
    solid = [line for line in es.get_lines() if line.get_linestyle() == "-"]
    assert len(solid) == 3  # one line per batch size (16: one point, with an error bar)
    assert list(solid[1].get_xdata()) == [4, 8, 12, 16]
    assert np.allclose(solid[1].get_ydata(), [86.0, 82.0, 78.0, 74.0])
    assert sum(isinstance(c, PolyCollection) for c in es.collections) == 2  # s.e. bands
    (single,) = [c for c in es.containers if isinstance(c, ErrorbarContainer)]  # batch 16
    assert list(single.lines[0].get_xdata()) == [16]
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels[:3] == ["batch 1", "batch 4", "batch 16"]  # lambda differs only by algorithm
    _assert_legend_outside_data(figure)
    assert F.sequential_figure([]) is None


# --------------------------------------------------------------------------- from a run's files


def record_json(**fields) -> dict:
    """A summary.json (RunRecord layout) with the given fields."""
    row = {
        "algorithm": "memit", "model": "tiny", "layer": [1], "mode": "batch", "batch_size": 8,
        "n_edits": 8, "lambda": 10.0, "keep_edits": False, "nullspace_threshold": None,
        "null_space_dim": None, "eval_schedule": "each_batch", "every_k": None,
        "edits_done": 8, "seed": 0, "hparams": {}, "pre": {}, "post": {},
        "update_mean": None, "timing": {}, "run_dir": "",
    }  # fmt: skip
    row.update(fields)
    return row


def batch_row(index: int, edits_done: int, **fields) -> dict:
    update = {"delta_norm": 1.0, "preservation_error": 0.1, "value_steps": 3.0}
    row = {"batch": index, "edits_done": edits_done, "evaluated_facts": 2, "metrics": {},
           "update": update, "timing": {}}  # fmt: skip
    row.update(fields)
    return row


def _write_run(directory: Path, batches: list[dict], facts: list[dict] | None) -> FinishedRun:
    directory.mkdir(parents=True)
    (directory / "batches.jsonl").write_text("".join(json.dumps(b) + "\n" for b in batches))
    if facts is not None:
        (directory / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    summary = record_json(mode="sequential", batch_size=2, n_edits=4, pre={"ES": {"mean": 5.0}})
    return FinishedRun(directory, RunRecord.from_json(summary), None)


def test_sequential_curve_is_the_running_mean_of_facts_edited_so_far(tmp_path: Path) -> None:
    """each_batch scores each batch's own facts; the curve is the mean over all facts edited
    so far (the sawtooth of per-batch means is what the issue saw)."""
    batches = [batch_row(0, 2, metrics={"ES": 100.0}), batch_row(1, 4, metrics={"ES": 0.0})]
    facts = [
        {"case_id": 1, "batch": 0, "post": {"case_id": 1, "ES": 1.0, "GE": 6.0}},
        {"case_id": 2, "batch": 0, "post": {"case_id": 2, "ES": 1.0}},
        {"case_id": 3, "batch": 1, "post": {"case_id": 3, "ES": 0.0}},
        {"case_id": 4, "batch": 1, "post": {"case_id": 4, "ES": 0.0}},
    ]
    curve = sequential_curve(_write_run(tmp_path / "old", batches, facts))
    assert curve.edits_done == [2, 4]
    assert [point["ES"].mean for point in curve.so_far] == [100.0, 50.0]
    assert [point["ES"].n for point in curve.so_far] == [2, 4]
    assert [point["GE"].mean for point in curve.so_far] == [600.0, 600.0]  # GE on fact 1 only

    # runs that record edited_so_far (the runner does) are read from batches.jsonl
    recorded = [
        {**batches[0], "edited_so_far": {"ES": {"mean": 100.0, "std": 0.0, "n": 2}}},
        {**batches[1], "edited_so_far": {"ES": {"mean": 50.0, "std": 50.0, "n": 4}}},
    ]
    curve = sequential_curve(_write_run(tmp_path / "new", recorded, None))
    assert [point["ES"].mean for point in curve.so_far] == [100.0, 50.0]
    assert curve.so_far[1]["ES"].sem == pytest.approx(50.0 / math.sqrt(3))
    assert curve.pre["ES"].mean == 5.0


# --------------------------------------------------------------------------- files


def _png_dpi(path: Path) -> float:
    data = path.read_bytes()
    index = data.index(b"pHYs")
    per_metre, _, unit = struct.unpack(">IIB", data[index + 4 : index + 13])
    assert unit == 1
    return per_metre * 0.0254


def test_save_writes_png_at_200_dpi_and_pdf(tmp_path: Path) -> None:
    figure = F.axis_figures([result(layer=(layer,)) for layer in (1, 2)])["metric_vs_layer"]
    png, pdf = F.save(figure, tmp_path / "metric_vs_layer")
    assert (png.name, pdf.name) == ("metric_vs_layer.png", "metric_vs_layer.pdf")
    assert _png_dpi(png) == pytest.approx(200, abs=0.5)
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_latex_table() -> None:
    text = F.latex_table(["λ", "ES"], [["1", "90.00 (2.00)"], ["10", "95.00 (1.00)"]], "A_b", 1)
    assert "\\toprule" in text and "\\bottomrule" in text
    assert "$\\lambda$ & ES \\\\" in text
    assert "\\textbf{10} & \\textbf{95.00 (1.00)} \\\\" in text
    assert "\\caption{A\\_b}" in text


def test_report_writes_every_figure_as_png_and_pdf(tmp_path: Path) -> None:
    """editexp-report on a batch-mode sweep over two layers and two lambdas."""
    root = tmp_path / "sweep"
    for num, (layer, lam) in enumerate([(1, 10.0), (2, 10.0), (1, 1000.0), (2, 1000.0)]):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        block = {m: {"mean": 50.0 + layer + lam / 100, "std": 5.0, "n": 8} for m in METRICS}
        summary = record_json(layer=[layer], pre=block, post=block, **{"lambda": lam})
        (job / "summary.json").write_text(json.dumps(summary))
    assert main([str(root)]) == 0
    report = root / "report"
    for stem in ("metric_vs_layer", "metric_vs_lambda"):
        assert (report / f"{stem}.png").stat().st_size > 1000
        assert (report / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    tex = (report / "lambda_memit.tex").read_text()
    (bold,) = [line for line in tex.splitlines() if "\\textbf" in line]  # the best S
    assert bold.startswith("\\textbf{1000} & \\textbf{2} & ")


def test_sequential_figure_with_ge_after_the_last_update_only() -> None:
    """eval.generation_at=final: GE exists at the last curve point only; its panel shows that
    one point (a marker, not an invisible one-point line), the other panels every point."""
    xs = [4, 8, 12, 16]
    so_far = [stats(90.0 - x, n=x) for x in xs]
    for point in so_far[:-1]:
        point.pop("GE", None)
    so_far[-1]["GE"] = F.MetricSummary(590.0, 8.0, 4)
    axes = {**result().axes, "mode": "sequential", "batch_size": 4}
    figure = F.sequential_figure([F.Curve(axes, xs, so_far, PRE)])
    (ge,) = [ax for ax in data_axes(figure) if ax.get_title() == "GE: MEMIT"]
    (line,) = [line for line in ge.get_lines() if line.get_linestyle() == "-"]
    assert list(line.get_xdata()) == [16] and list(line.get_ydata()) == [590.0]
    assert line.get_marker() not in (None, "", "None")
    (es,) = [ax for ax in data_axes(figure) if ax.get_title() == "ES: MEMIT"]
    (line,) = [line for line in es.get_lines() if line.get_linestyle() == "-"]
    assert list(line.get_xdata()) == xs
