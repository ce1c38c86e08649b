"""docs/study_smollm2.py: the numbers it publishes (S, differences, their standard errors)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "docs" / "study_smollm2.py"
spec = importlib.util.spec_from_file_location("study_smollm2", SCRIPT)
study = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = study  # dataclasses look their module up there
spec.loader.exec_module(study)


def test_s_is_the_harmonic_mean_of_the_metric_means():
    values = np.array([[100.0, 50.0, 50.0], [0.0, 50.0, 100.0]])  # means 50, 50, 75
    assert study.s_of(values) == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 75))
    assert study.s_of(np.array([[0.0, 50.0, 50.0]])) == 0.0


def test_paired_difference_of_the_same_facts_has_no_error_and_unpaired_has():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, (64, 3)) * 100.0
    b = a.copy()
    b[:, 2] -= 10  # the same facts, NS 10 points lower on every one
    paired = study.bootstrap_se(a, b, paired=True)
    assert paired[:2] == pytest.approx([0, 0]) and paired[2] == pytest.approx(0, abs=1e-9)
    assert study.bootstrap_se(a, b, paired=False)[2] > 5  # independent resamples: +-sqrt(2) SE
    se = study.bootstrap_se(a)[0]  # a mean's bootstrap SE is about std / sqrt(n)
    assert se == pytest.approx(a[:, 0].std() / np.sqrt(64), rel=0.1)


def test_difference_of_nested_runs_is_paired_over_the_smaller_runs_facts():
    def run(case_ids, values):
        return study.Run(None, np.array(case_ids), {"post": np.array(values, dtype=float)})

    small = run([7, 3], [[100, 100, 50], [100, 0, 50]])
    large = run([3, 9, 7], [[100, 0, 40], [0, 0, 0], [100, 100, 40]])  # fact 9 not in small
    diff, se = study.difference(large, small)
    assert diff[:3] == pytest.approx([0, 0, -10])  # facts 3 and 7 only, each NS 10 lower
    assert se[:3] == pytest.approx([0, 0, 0], abs=1e-9)


def fake_run(values, case_ids=None, overrides=(), each_batch=None, **fields):
    """A Run of hand-made per-fact (ES, PS, NS) values and grid fields."""
    fields = {"mode": "sequential", "lambda": None, "keep_edits": False, **fields}
    values = np.array(values, dtype=float)
    finished = SimpleNamespace(
        field=fields.__getitem__,
        overrides=list(overrides),
        batches=lambda: [],
        metric=lambda *args: None,
    )
    case_ids = np.arange(len(values)) if case_ids is None else np.array(case_ids)
    each = values if each_batch is None else np.array(each_batch, dtype=float)
    return study.Run(finished, case_ids, {"post": values, "each_batch": each})


def test_sequential_findings_compare_smaller_batches_and_romes_singular_edits_to_one_batch():
    def run(algorithm, batch_size, ns, mode="sequential"):
        values = [[100.0, 100.0, ns]] * 4
        return fake_run(values, algorithm=algorithm, n_edits=4, batch_size=batch_size, mode=mode)

    runs = [run("memit", 2, 60), run("rome", 1, 40)]
    one_batch = run("memit", 4, 50, mode="batch")  # stage 3's batch run is the comparator
    lines = "\n".join(study.sequential_findings({"sequential": runs, "batch_scaling": [one_batch]}))
    assert "- MEMIT 2x2 − MEMIT 1x4 (post): S" in lines and "NS +10.0 ± 0.0" in lines
    assert "- ROME 4x1 − MEMIT 1x4 (each_batch): S" in lines and "NS -10.0 ± 0.0" in lines
    assert "ES +0.0 ± 0.0, PS +0.0 ± 0.0, NS +10.0 ± 0.0" in lines  # each metric, not only S
    assert "EMMET" not in lines  # no EMMET run, no EMMET comparison


def test_schedule_figure_draws_each_schedule_against_one_batch_on_both_scorings():
    def run(batch_size, ns, each_ns, mode="sequential"):
        values, each = [[100.0, 100.0, ns]] * 4, [[100.0, 100.0, each_ns]] * 4
        fields = {"algorithm": "memit", "n_edits": 4, "batch_size": batch_size, "mode": mode}
        return fake_run(values, each_batch=each, **fields)

    one_batch = run(4, 50, 50, mode="batch")
    figure = study.schedule_figure({"sequential": [run(2, 60, 66)], "batch_scaling": [one_batch]})
    ns_panel = figure.axes[2]
    plotted = [float(c.lines[0].get_ydata()[0]) for c in ns_panel.containers]
    assert plotted == pytest.approx([10.0, 16.0])  # after all edits, after its own update
    assert ns_panel.get_xticklabels()[0].get_text() == "MEMIT 2x2\n− 1x4"
    assert study.schedule_figure({"sequential": [one_batch]}) is None  # nothing to compare


def test_sequential_emmet_is_compared_with_memits_one_batch_of_the_same_edits():
    def run(algorithm, batch_size, ns, mode="sequential"):
        values = [[100.0, 100.0, ns]] * 4
        return fake_run(values, algorithm=algorithm, n_edits=4, batch_size=batch_size, mode=mode)

    memit = run("memit", 4, 70, mode="batch")
    lines = study.emmet_against_memit([run("emmet", 2, 55), run("memit", 2, 60)], [memit])
    assert len(lines) == 2 and all(x.startswith("- EMMET 2x2 − MEMIT 1x4") for x in lines)
    assert "NS -15.0 ± 0.0" in lines[0]


def test_sequential_findings_name_the_best_batch_size_and_compare_the_others_paired():
    """1x8 (a batch-scaling run), 2x4 and 4x2 of the same 8 facts: 2x4 has the best S after
    the last update; on the paper's schedule 4x2 does. An EMMET one batch at another lambda
    is neither the comparator nor part of the ranking."""

    def run(batch_size, ns, each_ns=None, mode="sequential", algorithm="memit", lam=1000.0):
        values = [[100.0, 100.0, ns]] * 8
        each = None if each_ns is None else [[100.0, 100.0, each_ns]] * 8
        fields = {"n_edits": 8, "batch_size": batch_size, "mode": mode, "lambda": lam}
        return fake_run(values, each_batch=each, algorithm=algorithm, **fields)

    runs = [run(4, 70, each_ns=72), run(2, 60, each_ns=80)]
    batch = [run(8, 65, mode="batch"), run(8, 90, mode="batch", algorithm="emmet", lam=0.0)]
    lines = study.sequential_findings({"sequential": runs, "batch_scaling": batch})
    best = [line for line in lines if line.startswith("- ") and " best " in line]
    assert len(best) == 2  # MEMIT after the last update and on the paper's schedule
    assert best[0].startswith("- MEMIT λ=1000, 8 edits (post): best 2x4 (S ")
    assert "4x2 -5." in best[0] and "1x8 -2." in best[0]
    assert "4x2 -5.7 ± 0.0 (NS -10.0 ± 0.0)" in best[0]  # NS 60 against the best's 70
    assert best[1].startswith("- MEMIT λ=1000, 8 edits (each_batch): best 4x2 (S ")
    assert not any("EMMET" in line for line in best)


def test_sequential_runs_are_compared_with_one_batch_at_their_own_lambda():
    def run(batch_size, ns, lam, mode="sequential"):
        values = [[100.0, 100.0, ns]] * 8
        fields = {"n_edits": 8, "batch_size": batch_size, "mode": mode, "lambda": lam}
        return fake_run(values, algorithm="emmet", **fields)

    batch = [run(8, 90, 0.0, mode="batch"), run(8, 50, 1e-4, mode="batch")]
    lines = study.sequential_findings({"sequential": [run(2, 60, 1e-4)], "batch_scaling": batch})
    compared = [line for line in lines if " − " in line and "(post)" in line]
    assert compared == [line for line in compared if "1x8 (post): S" in line]
    assert len(compared) == 1 and "− EMMET λ=0.0001 1x8" in compared[0]
    assert "NS +10.0 ± 0.0" in compared[0]


def test_by_s_and_tie_break_by_s_and_by_the_ns_tie_break():
    rng = np.random.default_rng(0)
    es = rng.integers(0, 2, 200) * 100.0
    best_s = np.stack([es, es, np.full(200, 60.0)], axis=1)

    def worse(flips: int, ns: float) -> np.ndarray:
        """``flips`` successful edits fail (ES and PS 0), NS ``ns`` on every fact."""
        values = best_s.copy()
        values[np.flatnonzero(es == 100)[:flips], :2] = 0.0
        values[:, 2] = ns
        return values

    tied = worse(2, 61.0)  # S 0.4 below the best, within its paired SE 0.5; NS 1 higher
    far = worse(8, 62.0)  # S 2.6 below, 2.6 SE: out, although its NS is the highest
    runs = [
        fake_run(v, algorithm="memit", n_edits=200, **{"lambda": lam})
        for v, lam in ((best_s, 1.0), (tied, 10.0), (far, 100.0))
    ]
    by_s, by_ns = study.by_s_and_tie_break(runs)
    assert (by_s.field("lambda"), by_ns.field("lambda")) == (1.0, 10.0)


def test_remedies_meet_the_target_only_with_s_5_higher_and_ns_at_most_3_lower():
    def run(ns, es, algorithm="memit", **fields):
        values = [[es, es, ns]] * 8
        return fake_run(values, n_edits=8, batch_size=2, algorithm=algorithm, **fields)

    plain = run(ns=70, es=50)
    keep = run(ns=68, es=80, keep_edits=True)  # S up a lot, NS 2 lower: met
    alpha = run(ns=60, es=90, algorithm="alphaedit", keep_edits=True)  # NS 10 lower: missed
    lines = study.remedies_findings({"sequential": [plain], "remedies": [keep, alpha]})
    (keep_line,) = [x for x in lines if x.startswith("- MEMIT 4x2, keep_edits") and "(post)" in x]
    (alpha_line,) = [x for x in lines if x.startswith("- ALPHAEDIT") and "(post)" in x]
    assert keep_line.endswith("target met") and "NS -2.0 ± 0.0" in keep_line
    assert alpha_line.endswith("target missed")


def test_remedies_figure_draws_each_remedy_against_plain_memit_with_the_target_and_ppl():
    def run(es, algorithm="memit", keep_edits=False, curve=((2, 40.0), (4, 50.0))):
        values = [[es, es, 60.0]] * 4
        fields = {"algorithm": algorithm, "n_edits": 4, "batch_size": 2, "keep_edits": keep_edits}
        edited = fake_run(values, **fields)
        rows = [SimpleNamespace(edits_done=n, edited_so_far={"PPL": {"mean": p}}) for n, p in curve]
        edited.finished.batches = lambda: rows
        edited.finished.metric = lambda stage, name: 33.5 if stage == "pre" else None
        return edited

    plain = run(50.0)
    keep = run(80.0, keep_edits=True, curve=((2, 38.0), (4, 41.0)))
    alpha = run(70.0, algorithm="alphaedit", keep_edits=True)
    figure = study.remedies_figure({"sequential": [plain], "remedies": [keep, alpha]})
    es_panel, s_panel, ppl_panel = figure.axes[0], figure.axes[3], figure.axes[4]
    plotted = [float(c.lines[0].get_ydata()[0]) for c in es_panel.containers]
    assert plotted == pytest.approx([20.0, 20.0, 30.0, 30.0])  # AlphaEdit, keep_edits; 2 scorings
    assert s_panel.lines[-1].get_ydata()[0] == 5.0  # the target: S at least plain's + 5
    curves = {line.get_label(): list(line.get_ydata()) for line in ppl_panel.lines}
    assert curves["MEMIT 2x2, keep_edits"] == [33.5, 38.0, 41.0]
    assert len(curves) == 3  # plain MEMIT, the comparator, beside both remedies
    assert study.remedies_figure({"sequential": [], "remedies": [keep]}) is None


def test_repeats_give_the_mean_difference_and_its_spread_between_draws():
    runs = []
    for fact_set, gain in (("0", 2.0), ("1", 4.0), ("2", 6.0)):
        overrides = [f"data.fact_set={fact_set}", "editing.prefixes.seed=0"]
        for size, ns in ((4, 50.0), (2, 50.0 + gain)):
            values = [[100.0, 100.0, ns]] * 4
            runs.append(fake_run(values, overrides=overrides, n_edits=4, batch_size=size))
    lines = study.repeats_findings({"repeats": runs})
    (summary,) = [x for x in lines if x.startswith("- 2x2 − 1x4 over 3 runs")]
    s_gain = [
        study.s_of(np.array([[100.0, 100.0, 50.0 + g]])) - study.s_of(np.array([[100, 100, 50.0]]))
        for g in (2.0, 4.0, 6.0)
    ]
    assert f"mean {np.mean(s_gain):+.1f}" in summary
    assert f"between-run SD {np.std(s_gain, ddof=1):.1f}" in summary
    assert summary.endswith("3 of 3 positive")


def test_repeats_figure_draws_each_draws_paired_difference_and_their_mean():
    runs, gains = [], (2.0, 4.0, 9.0)
    for fact_set, gain in zip("012", gains):
        overrides = [f"data.fact_set={fact_set}", "editing.prefixes.seed=0"]
        for size, ns in ((4, 50.0), (2, 50.0 + gain)):
            values = [[100.0, 100.0, ns]] * 4
            runs.append(fake_run(values, overrides=overrides, n_edits=4, batch_size=size))
    figure = study.repeats_figure(runs)
    ns_panel, s_panel = figure.axes[2], figure.axes[3]
    plotted = lambda ax: [float(c.lines[0].get_ydata()[0]) for c in ax.containers]  # noqa: E731
    assert plotted(ns_panel) == pytest.approx([*gains, np.mean(gains)])
    s_gain = [
        study.s_of(np.array([[100, 100, 50 + g]])) - study.s_of(np.array([[100, 100, 50]]))
        for g in gains
    ]
    assert plotted(s_panel) == pytest.approx([*s_gain, np.mean(s_gain)])
    mean_bar = s_panel.containers[-1].lines[2][0].get_segments()[0][:, 1]  # the mean's +-1 SE
    half = np.std(s_gain, ddof=1) / np.sqrt(3)
    assert mean_bar == pytest.approx([np.mean(s_gain) - half, np.mean(s_gain) + half])
    assert s_panel.get_ylim()[1] >= max(s_gain) and s_panel.get_ylim()[0] == -s_panel.get_ylim()[1]


def test_batch_findings_keep_each_lambda_of_an_algorithm_a_series_of_its_own():
    def run(n, lam, ns):
        values = [[100.0, 100.0, ns]] * n
        return fake_run(values, algorithm="emmet", n_edits=n, mode="batch", **{"lambda": lam})

    runs = [run(2, 0.0, 60), run(4, 0.0, 50), run(4, 10.0, 70), run(8, 10.0, 65)]
    lines = study.batch_findings({"batch_scaling": runs})
    nested = [x for x in lines if "instead (paired)" in x]
    assert [x.split(",")[0] for x in nested] == ["- EMMET λ=0", "- EMMET λ=10"]
    assert "NS -10.0 ± 0.0" in nested[0] and "NS -5.0 ± 0.0" in nested[1]
    assert "perplexity (PPL) of the unedited model: not scored." in "\n".join(lines)


def test_batch_findings_give_held_out_perplexity_before_and_after_each_batch():
    def run(n, post_ppl):
        scored = {("pre", "PPL"): 33.5, ("post", "PPL"): post_ppl}
        edited = fake_run([[100.0, 90.0, 60.0]] * n, algorithm="memit", n_edits=n, mode="batch")
        edited.finished.metric = lambda stage, name: scored[(stage, name)]
        return edited

    lines = study.batch_findings({"batch_scaling": [run(2, 34.0), run(4, 45.25)]})
    assert "Held-out perplexity (PPL) of the unedited model: 33.50." in lines
    rows = [line for line in lines if line.startswith("| MEMIT |")]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == ["34.00", "45.25"]


def test_forgetting_gives_perplexity_at_every_curve_point_of_each_run():
    def run(size, curve):
        edited = fake_run([[100.0, 100.0, 60.0]] * 4, algorithm="memit", n_edits=4, batch_size=size)
        rows = [SimpleNamespace(edits_done=n, edited_so_far={"PPL": {"mean": p}}) for n, p in curve]
        edited.finished.batches = lambda: rows
        edited.finished.metric = lambda stage, name: (
            33.5 if (stage, name) == ("pre", "PPL") else None
        )
        return edited

    lines = study.forgetting_lines([run(2, [(2, 40.0), (4, 51.0)]), run(1, [(4, 45.5)])])
    assert "| run | before | 2 edits | 4 edits |" in lines
    assert "| MEMIT 4x1 | 33.50 | - | 45.50 |" in lines
    assert "| MEMIT 2x2 | 33.50 | 40.00 | 51.00 |" in lines


def test_the_studys_main_series_keep_their_colours_and_no_other_label_shares_one(tmp_path):
    path = tmp_path / "colors.json"
    path.write_text(json.dumps({"MEMIT": "#2ca02c", "batch 64": "#1f77b4", "λ 10": "#aec7e8"}))
    study.seed_colors(path)
    colors = json.loads(path.read_text())
    assert colors["MEMIT"] == "#1f77b4" and colors["EMMET"] == "#2ca02c"
    assert "batch 64" not in colors  # it had MEMIT's colour: a free one at its next report
    assert colors["λ 10"] == "#aec7e8"
    study.seed_colors(path)  # again: the same file
    assert json.loads(path.read_text()) == colors


def test_findings_keep_the_experiments_whose_runs_are_not_on_this_machine(tmp_path, monkeypatch):
    """findings.md is assembled from every experiment's committed findings and cost: the
    experiments reported now replace theirs, the others (runs lost with a machine) stay."""
    out = tmp_path / "study-smollm2"
    (out / "layer_search").mkdir(parents=True)
    (out / "layer_search" / "findings.md").write_text("### Layer search\n\nlayer 3 best\n")
    cost = {"runs": 60, "wall_hours": 1.65, "cpu_hours": 1.65, "paper_hours": 39.1}
    (out / "layer_search" / "cost.json").write_text(json.dumps(cost))
    (out / "batch_scaling").mkdir()
    (out / "batch_scaling" / "findings.md").write_text("### Batch scaling\n\nold numbers\n")
    monkeypatch.setitem(study.FINDINGS, "batch_scaling", lambda s: ["### Batch scaling", "", "new"])
    measured = SimpleNamespace(wall_hours=0.5, cpu_hours=None)
    monkeypatch.setattr(study, "Cost", SimpleNamespace(of=lambda records: measured))
    monkeypatch.setattr(study, "paper_hours", lambda runs: 2.0)
    runs = [SimpleNamespace(finished=SimpleNamespace(record=None))] * 3
    study.write_findings(out, {"batch_scaling": runs})
    text = (out / "findings.md").read_text()
    assert text.index("layer 3 best") < text.index("### Batch scaling\n\nnew") < text.index("Cost")
    assert "old numbers" not in text
    assert "| layer_search | 60 | 1.65 | 1.65 | 39.1 |" in text
    assert "| batch_scaling | 3 | 0.50 | ? | 2.0 |" in text


def test_an_experiment_keeps_its_report_files_less_those_it_does_not_keep(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "report_main", lambda args: 0)
    names = ["results.md", "results.csv", "metric_vs_batch_size.png", "metric_vs_lambda.png"]
    names += ["lambda_emmet.md", "metric_vs_batch_size.pdf"]
    for experiment in ("batch_scaling", "lambda_search"):
        (tmp_path / experiment / "report").mkdir(parents=True)
        for name in names:
            (tmp_path / experiment / "report" / name).write_text(name)
        study.report(tmp_path / experiment, tmp_path / "out" / experiment, False, tmp_path / "c")
    kept = lambda name: sorted(p.name for p in (tmp_path / "out" / name).iterdir())  # noqa: E731
    assert kept("batch_scaling") == ["metric_vs_batch_size.png", "results.csv", "results.md"]
    assert "metric_vs_lambda.png" in kept("lambda_search") and "lambda_emmet.md" in kept(
        "lambda_search"
    )
