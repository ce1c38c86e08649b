"""docs/study_smollm2.py: the numbers it publishes (S, differences, their standard errors)."""

from __future__ import annotations

import importlib.util
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


def test_sequential_findings_compare_smaller_batches_and_romes_singular_edits_to_one_batch():
    def run(algorithm, batch_size, ns):
        fields = {"algorithm": algorithm, "n_edits": 4, "batch_size": batch_size}
        values = np.array([[100.0, 100.0, ns]] * 4)
        return study.Run(
            SimpleNamespace(field=fields.__getitem__),
            np.arange(4),
            {"post": values, "each_batch": values},
        )

    runs = [run("memit", 4, 50), run("memit", 2, 60), run("rome", 1, 40)]
    lines = "\n".join(study.sequential_findings(runs))
    assert "- MEMIT 2x2 − MEMIT 1x4 (post): S" in lines and "NS +10.0 ± 0.0" in lines
    assert "- ROME 4x1 − MEMIT 1x4 (each_batch): S" in lines and "NS -10.0 ± 0.0" in lines
    assert "EMMET" not in lines  # no EMMET run, no EMMET comparison
