import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from editexp.evaluation.metrics import harmonic_mean
from editexp.record import BatchRecord, RunRecord, UpdateStats
from editexp.report import main, report_colors, schedule_figure
from editexp.sweep_runs import collect, expected_grid

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _stats(mean: float, std: float = 1.0, n: int = 8) -> dict:
    return {"mean": mean, "std": std, "n": n}


def _summary(
    algorithm: str = "memit",
    layer: list[int] | None = None,
    mode: str = "batch",
    batch_size: int = 16,
    n_edits: int = 16,
    lam: float | None = 15000.0,
    post: tuple[float, float, float] = (90.0, 80.0, 70.0),
    ge: float | None = 610.0,
) -> dict:
    def stage(es: float, ps: float, ns: float, ge_mean: float | None) -> dict:
        out = {
            "ES": _stats(es, 2.0),
            "PS": _stats(ps, 3.0),
            "NS": _stats(ns, 4.0),
            "S": {"mean": harmonic_mean([es, ps, ns])},
        }
        if ge_mean is not None:
            out["GE"] = _stats(ge_mean, 5.0)
        for key in ("ES", "PS", "NS"):
            out[f"{key}_magnitude"] = _stats(0.1)
        return out

    record = RunRecord(
        algorithm=algorithm,
        model="smollm2-135m",
        layer=layer if layer is not None else [1],
        mode=mode,
        batch_size=batch_size,
        n_edits=n_edits,
        lam=lam,
        keep_edits=False,
        nullspace_threshold=None,
        null_space_dim=None,
        eval_schedule="each_batch",
        every_k=None,
        edits_done=n_edits,
        seed=0,
        hparams={},
        pre=stage(10.0, 12.0, 88.0, 615.0),
        post=stage(*post, ge),
        update_mean=UpdateStats(delta_norm=1.3, preservation_error=0.02, value_steps=10.0),
        timing={"total": 45.0},
        run_dir="/elsewhere/not/used",
    )
    return record.to_json()


def _job(
    root: Path,
    num: int,
    overrides: list[str],
    summary: dict | None,
    batches: list[dict] | None = None,
) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    lines = "".join(f"- {item}\n" for item in overrides)
    (job / ".hydra" / "overrides.yaml").write_text(lines)
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if batches is not None:
        text = "".join(json.dumps(row) + "\n" for row in batches)
        (job / "batches.jsonl").write_text(text)
    return job


def _multirun_yaml(root: Path, params: dict[str, str], task: list[str]) -> None:
    """The parts of a real Hydra multirun.yaml the report reads (same layout)."""
    param_lines = "".join(f"      {key}: {value}\n" for key, value in params.items())
    task_lines = "".join(f"    - {item}\n" for item in task)
    (root / "multirun.yaml").write_text(
        "hydra:\n"
        "  run:\n    dir: outputs\n"
        "  sweep:\n    dir: multirun/x\n    subdir: ${hydra.job.num}\n"
        "  sweeper:\n"
        "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n"
        f"    params:\n{param_lines}"
        "  mode: MULTIRUN\n"
        "  overrides:\n"
        "    hydra:\n    - hydra.mode=MULTIRUN\n"
        f"    task:\n{task_lines}"
        "mode: batch\n"
    )


@pytest.fixture
def batch_sweep(tmp_path: Path) -> Path:
    """algorithm in {memit, emmet} x batch_size in {16, 64, 256}: 5 done, 1 incomplete."""
    root = tmp_path / "multirun"
    root.mkdir()
    _multirun_yaml(root, {"algorithm": "memit,emmet"}, ["mode=batch", "batch_size=16,64,256"])
    num = 0
    for algorithm in ("memit", "emmet"):
        for bs in (16, 64, 256):
            overrides = [f"algorithm={algorithm}", "mode=batch", f"batch_size={bs}"]
            done = not (algorithm == "emmet" and bs == 256)
            lam = 15000.0 if algorithm == "memit" else 0.0
            es = 100.0 - bs / 16 if algorithm == "memit" else 99.0 - bs / 16
            summary = _summary(algorithm, batch_size=bs, n_edits=bs, lam=lam, post=(es, 80, 70))
            if algorithm == "emmet" and bs == 64:
                del summary["post"]["GE"]
            _job(root, num, overrides, summary if done else None)
            num += 1
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_HEADER


def test_batch_sweep_report(batch_sweep: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(batch_sweep)]) == 0
    out = capsys.readouterr().out
    report = batch_sweep / "report"
    assert "5 of 6 grid points complete" in out
    assert "Missing/incomplete: 5: algorithm=emmet mode=batch batch_size=256" in out
    assert str(report) in out

    rows = _read_csv(report / "results.csv")
    assert len(rows) == 5
    # sorted by algorithm, then layer, batch size, lambda
    assert [(r["algorithm"], r["batch_size"]) for r in rows] == [
        ("emmet", "16"),
        ("emmet", "64"),
        ("memit", "16"),
        ("memit", "64"),
        ("memit", "256"),
    ]
    memit64 = rows[3]
    assert memit64["layer"] == "1"
    assert memit64["mode"] == "batch"
    assert memit64["n_edits"] == "64"
    assert memit64["lambda"] == "15000"
    assert memit64["eval_schedule"] == "each_batch"
    assert float(memit64["post_ES_mean"]) == 96.0
    assert float(memit64["post_ES_std"]) == 2.0
    assert float(memit64["post_NS_std"]) == 4.0
    assert float(memit64["post_S_mean"]) == pytest.approx(harmonic_mean([96.0, 80.0, 70.0]))
    assert memit64["post_S_std"] == ""
    assert float(memit64["pre_GE_mean"]) == 615.0
    assert float(memit64["post_GE_mean"]) == 610.0
    assert rows[1]["post_GE_mean"] == "" and rows[1]["post_GE_std"] == ""
    assert memit64["run_dir"] == "1"

    markdown = (report / "results.md").read_text()
    assert "| 96.00 (2.00) | 80.00 (3.00) | 70.00 (4.00) |" in markdown
    assert "| 610.00 (5.00) |" in markdown
    assert (
        "## Pre-edit" in markdown and "| 10.00 (2.00) | 12.00 (3.00) | 88.00 (4.00) |" in markdown
    )
    assert "5 of 6 grid points complete" in markdown

    assert _is_png(report / "metric_vs_batch_size.png")
    assert not (report / "metric_vs_layer.png").exists()
    assert not (report / "sequential.png").exists()
    assert not list(report.glob("lambda_*.md"))  # one lambda per algorithm


def test_out_option_and_not_started_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "sweep"
    root.mkdir()
    _multirun_yaml(root, {}, ["algorithm=rome", "layer=[0],[1],[2]", "mode=singular"])
    for num, layer in enumerate((0, 2)):
        overrides = ["algorithm=rome", f"layer=[{layer}]", "mode=singular"]
        summary = _summary("rome", [layer], "singular", 1, 8, None, (100.0, 60 + layer, 80))
        _job(root, num, overrides, summary)
    out_dir = tmp_path / "elsewhere"
    assert main([str(root), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 grid points complete" in out
    assert "Not started (no job directory): algorithm=rome layer=[1] mode=singular" in out
    assert _is_png(out_dir / "metric_vs_layer.png")
    rows = _read_csv(out_dir / "results.csv")
    assert [r["lambda"] for r in rows] == ["", ""]
    assert not (root / "report").exists()


def test_expected_grid_matches_hydra_product(tmp_path: Path):
    _multirun_yaml(
        tmp_path,
        {"algorithm": "memit,emmet", "batch_size": "1,2"},
        ["batch_size=16,64,256", "layer=[1],[2]", "lambda=1"],
    )
    points, note = expected_grid(tmp_path / "multirun.yaml")
    assert note is None
    # batch_size on the command line replaces the sweeper param: 2 x 3 x 2 x 1
    assert len(points) == 12
    assert ["algorithm=memit", "batch_size=16", "layer=[1]", "lambda=1"] in points


def test_grid_of_non_discrete_sweep_is_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _multirun_yaml(tmp_path, {}, ["lambda=interval(0,1)"])
    points, note = expected_grid(tmp_path / "multirun.yaml")
    assert points is None and "non-discrete" in note
    _job(tmp_path, 0, ["lambda=0.5"], _summary())
    assert main([str(tmp_path)]) == 0
    assert "Grid size unknown: non-discrete sweep lambda" in capsys.readouterr().out


def test_lambda_tables(tmp_path: Path):
    root = tmp_path / "lam"
    for num, lam in enumerate((1000.0, 10.0, 100000.0)):
        summary = _summary(
            "memit", lam=lam, batch_size=1024, n_edits=1024, post=(90, 80, lam / 2e3)
        )
        _job(root, num, ["algorithm=memit", f"lambda={lam}"], summary)
    assert main([str(root)]) == 0
    table = (root / "report" / "lambda_memit.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| λ | ES | PS | NS | S | GE |")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| 10", "| 1000", "| 100000"]
    assert "| 90.00 (2.00) | 80.00 (3.00) | 50.00 (4.00) |" in lines[3]


def test_sequential_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "seq"
    num = 0
    for algorithm in ("memit", "emmet"):
        for bs in (16, 32):
            batches = [
                BatchRecord(
                    batch=b,
                    edits_done=bs * (b + 1),
                    evaluated_facts=bs,
                    metrics={"ES": 95.0 - b, "PS": 80.0, "NS": 70.0, "S": 80.4},
                    update=UpdateStats(delta_norm=1.0, preservation_error=0.01, value_steps=3.0),
                    timing={"solve": 0.1},
                ).to_json()
                for b in range(64 // bs)
            ]
            summary = _summary(algorithm, mode="sequential", batch_size=bs, n_edits=64)
            _job(root, num, [f"algorithm={algorithm}", f"batch_size={bs}"], summary, batches)
            num += 1
    (root / "3" / "batches.jsonl").open("a").write('{"batch": 2, "edits_do')  # torn last line
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "No multirun.yaml" in out
    assert _is_png(root / "report" / "sequential.png")
    # figures follow the axes that vary, whatever the mode: the final result vs batch size
    assert _is_png(root / "report" / "metric_vs_batch_size.png")


def test_no_summaries_fails_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "empty"
    _job(root, 0, ["algorithm=memit"], None)
    with pytest.raises(SystemExit) as exit_:
        main([str(root)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no finished run (summary.json)" in err
    assert "1 grid point(s) started but not finished" in err and len(err.splitlines()) == 1
    assert not (root / "report").exists()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "does-not-exist")])
    assert exit_.value.code == 2


def test_module_entry_point_exit_code(tmp_path: Path):
    """The process exit code is main()'s return value (success is covered in-process)."""
    empty = subprocess.run(
        [sys.executable, "-m", "editexp.report", str(tmp_path)], capture_output=True, text=True
    )
    assert empty.returncode == 2
    assert "no finished run (summary.json)" in empty.stderr


def test_sibling_sweeps_grids_are_combined(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """lambda_search runs one multirun per algorithm below one directory: both grids count."""
    root = tmp_path / "lambda_search"
    for algorithm, lambdas in (("memit", ("10", "1000")), ("emmet", ("0", "0.01", "0.1"))):
        sweep = root / algorithm
        sweep.mkdir(parents=True)
        _multirun_yaml(sweep, {"lambda": ",".join(lambdas)}, [f"algorithm={algorithm}"])
        for num, lam in enumerate(lambdas[:2]):
            summary = _summary(algorithm, lam=float(lam), batch_size=1024, n_edits=1024)
            _job(sweep, num, [f"lambda={lam}", f"algorithm={algorithm}"], summary)
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "4 of 5 grid points complete" in out
    assert "algorithm=emmet" in out and "lambda=0.1" in out


def test_every_k_runs_also_report_the_each_batch_schedule(tmp_path: Path):
    root = tmp_path / "seq"
    for num, bs in enumerate((16, 32)):
        summary = _summary("memit", mode="sequential", batch_size=bs, n_edits=64)
        summary.update(eval_schedule="every_k", every_k=1)
        summary["each_batch"] = {
            "ES": _stats(99.0 - bs / 16),
            "PS": _stats(91.0),
            "NS": _stats(72.0),
            "S": {"mean": harmonic_mean([99.0 - bs / 16, 91.0, 72.0])},
        }
        _job(root, num, [f"batch_size={bs}"], summary)
    assert main([str(root)]) == 0
    rows = list(csv.DictReader((root / "report" / "results.csv").open()))
    assert [row["each_batch_ES_mean"] for row in rows] == ["98.0", "97.0"]
    assert [row["post_ES_mean"] for row in rows] == ["90.0", "90.0"]
    text = (root / "report" / "results.md").read_text()
    section = text.split("## Sequential runs on the paper's schedule")[1]
    assert "| 98.00 (1.00) | 91.00 (1.00) | 72.00 (1.00) |" in section
    assert "| 97.00 (1.00) | 91.00 (1.00) | 72.00 (1.00) |" in section
    assert _is_png(root / "report" / "schedules.png")


def test_schedule_figure_plots_the_papers_numbers_beside_after_all_edits(tmp_path: Path):
    """schedules: per batch size, the each_batch means (the paper's) and the post-edit means
    (after the last update) of the same runs, as two lines of one colour each."""
    root = tmp_path / "seq"
    for num, bs in enumerate((16, 64)):
        summary = _summary("memit", mode="sequential", batch_size=bs, n_edits=64,
                           post=(80.0 + num, 70.0, 60.0))  # fmt: skip
        summary.update(eval_schedule="every_k", every_k=1)
        summary["each_batch"] = {"ES": _stats(95.0 + num), "PS": _stats(91.0),
                                 "NS": _stats(72.0)}  # fmt: skip
        _job(root, num, [f"batch_size={bs}"], summary)
    runs = collect(root).runs
    figure = schedule_figure(runs)
    es = figure.axes[0]
    assert es.get_title() == "ES"
    legend = figure.legends[0] if figure.legends else figure.axes[-1].get_legend()
    color = {text.get_text(): handle.get_color()
             for text, handle in zip(legend.get_texts(), legend.legend_handles)}  # fmt: skip
    paper = color["MEMIT, eval after its own update (paper)"]
    after = color["MEMIT, eval after all edits"]
    assert paper != after
    means = {line.get_color(): list(line.get_ydata()) for line in es.get_lines()
             if line.get_marker() == "o"}  # fmt: skip
    assert means[paper] == [95.0, 96.0] and means[after] == [80.0, 81.0]
    colors = report_colors(runs)  # what --colors records: the schedules' series too
    figure = schedule_figure(runs, colors)
    legend = figure.legends[0] if figure.legends else figure.axes[-1].get_legend()
    drawn = {text.get_text(): handle.get_color()
             for text, handle in zip(legend.get_texts(), legend.legend_handles)}  # fmt: skip
    for label in ("MEMIT, eval after its own update (paper)", "MEMIT, eval after all edits"):
        assert drawn[label] == colors[label]
    each_batch_only = [r for r in runs if r.field("batch_size") == 16]
    object.__setattr__(each_batch_only[0].record, "eval_schedule", "each_batch")
    assert schedule_figure(each_batch_only) is None  # nothing to compare


def test_s_cells_give_the_standard_error(tmp_path: Path):
    """S has no std: its cells are "mean ± se" where summary.json has the delta method's se."""
    root = tmp_path / "lam"
    for num, lam in enumerate((10.0, 1000.0)):
        summary = _summary("memit", lam=lam, post=(90.0, 80.0, 70.0))
        summary["post"]["S"]["se"] = 1.25
        _job(root, num, ["algorithm=memit", f"lambda={lam}"], summary)
    assert main([str(root)]) == 0
    s_mean = f"{harmonic_mean([90.0, 80.0, 70.0]):.2f}"
    markdown = (root / "report" / "results.md").read_text()
    assert f"| 70.00 (4.00) | {s_mean} ± 1.25 | 610.00 (5.00) |" in markdown  # post-edit
    pre_s = f"{harmonic_mean([10.0, 12.0, 88.0]):.2f}"
    assert f"| 88.00 (4.00) | {pre_s} | 615.00 (5.00) |" in markdown  # pre-edit: no se
    assert "mean ± standard error (delta method" in markdown
    tex = (root / "report" / "lambda_memit.tex").read_text()
    assert f"{s_mean} $\\pm$ 1.25" in tex
    rows = list(csv.DictReader((root / "report" / "results.csv").open()))
    assert [row["post_S_se"] for row in rows] == ["1.25", "1.25"]
    assert [row["pre_S_se"] for row in rows] == ["", ""]
    assert "post_ES_se" not in rows[0]  # ES has a std: no se column


def test_cost_section_sums_cpu_and_gpu_hours(tmp_path: Path):
    """results.md ends with what the sweep cost: CPU-hours are seconds x threads, GPU runs
    count GPU-hours, and each run's seconds per phase and value-cache counts are listed."""
    root = tmp_path / "cost"
    runs = [  # (device, threads, seconds)
        ("cpu", 2, 1800.0),
        ("cpu", 1, 3600.0),
        ("cuda:0", 16, 900.0),
    ]
    for num, (device, threads, seconds) in enumerate(runs):
        summary = _summary("memit", n_edits=16 * (num + 1))
        summary.update(device=device, threads=threads, values={"computed": 7, "read": 9})
        summary["timing"] = {"statistics": 1.5, "keys_values": 2.5, "solve": 0.25,
                             "evaluation": 4.0, "total": seconds}  # fmt: skip
        _job(root, num, [f"n_edits={16 * (num + 1)}"], summary)
    assert main([str(root)]) == 0
    section = (root / "report" / "results.md").read_text().split("## Cost")[1]
    # wall 0.5 + 1 + 0.25 h; CPU 0.5 x 2 + 1 x 1 = 2 h; GPU 0.25 h
    assert "3 run(s), 1.75 h of wall time, 2.00 CPU-hours, 0.25 GPU-hours." in section
    assert "| 0 | cpu | 2 | 1.5 | 2.5 | 0.2 | 4.0 | 0.0 | 1800.0 | 7 / 9 |" in section
    assert "| 2 | cuda:0 | 16 |" in section


def test_cost_of_summaries_without_threads_is_wall_time_only(tmp_path: Path):
    root = tmp_path / "old"
    _job(root, 0, ["n_edits=16"], _summary("memit"))  # no device/threads: an older summary
    assert main([str(root)]) == 0
    section = (root / "report" / "results.md").read_text().split("## Cost")[1]
    assert "1 run(s), 0.01 h of wall time, CPU-hours unknown" in section
    assert "| 0 | ? | - |" in section


def test_colors_file_gives_a_series_one_colour_across_reports(tmp_path: Path, capsys):
    """--colors: the second report keeps the colours the first wrote. Alone it would colour
    its sorted labels MEMIT, ROME with the palette's first two colours; MEMIT had the second."""
    shared = tmp_path / "colors.json"
    for root, algorithms in (("first", ("emmet", "memit")), ("second", ("memit", "rome"))):
        for num, (algorithm, size) in enumerate((a, n) for a in algorithms for n in (16, 64)):
            overrides = [f"algorithm={algorithm}", f"n_edits={size}"]
            summary = _summary(algorithm, n_edits=size, batch_size=size)
            _job(tmp_path / root, num, overrides, summary)
    assert main([str(tmp_path / "first"), "--colors", str(shared)]) == 0
    first = json.loads(shared.read_text())
    assert list(first) == ["EMMET", "MEMIT"]
    alone = report_colors(collect(tmp_path / "second").runs)
    assert alone["MEMIT"] != first["MEMIT"]  # what the option is for
    assert main([str(tmp_path / "second"), "--colors", str(shared)]) == 0
    both = json.loads(shared.read_text())
    assert both["MEMIT"] == first["MEMIT"] and both["EMMET"] == first["EMMET"]
    assert both["ROME"] not in first.values()  # a free colour
    shared.write_text('{"MEMIT": "not-a-colour"}')
    with pytest.raises(SystemExit) as refused:  # one line, before any figure is drawn
        main([str(tmp_path / "second"), "--colors", str(shared)])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "'MEMIT' has colour 'not-a-colour'; expected a matplotlib colour" in err
