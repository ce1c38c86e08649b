"""The runner on a tiny model: outputs, schedules, resume after a crash, skip, identities."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, compose_config

from editexp.config import ConfigError
from editexp.run_dir import RunDirError
from editexp.runner import SimulatedCrash, run
from editexp.task import use_slurm_cpus

FAST = [*TINY_RUN, "logger=none"]


def run_config(tmp_path, name, *overrides):
    cfg = compose_config(*FAST, *overrides)
    return run(cfg, tmp_path / name).to_json()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sequential_run_writes_all_outputs(tmp_path):
    summary = run_config(
        tmp_path, "seq", "mode=sequential", "n_edits=4", "batch_size=2", "algorithm=memit"
    )
    run_dir = tmp_path / "seq"
    for key in (
        "algorithm",
        "model",
        "layer",
        "mode",
        "batch_size",
        "n_edits",
        "lambda",
        "pre",
        "post",
        "timing",
        "eval_schedule",
    ):
        assert key in summary
    assert summary["layer"] == [1] and summary["batch_size"] == 2 and summary["edits_done"] == 4
    for block in ("pre", "post"):
        for metric in ("ES", "PS", "NS"):
            assert set(summary[block][metric]) >= {"mean", "std"}
        assert "S" in summary[block] and "GE" in summary[block]
    assert set(summary["timing"]) >= {"statistics", "keys_values", "solve", "evaluation", "total"}
    # where it ran, for editexp-report's CPU-hours
    assert summary["device"] == "cpu" and summary["threads"] == torch.get_num_threads()
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    facts = read_jsonl(run_dir / "facts.jsonl")
    assert len(facts) == 4 and {f["batch"] for f in facts} == {0, 1}
    assert all(f["pre"] is not None and "ES" in f["post"] for f in facts)
    batches = read_jsonl(run_dir / "batches.jsonl")
    assert [b["edits_done"] for b in batches] == [2, 4]
    assert (run_dir / "deltas.pt").is_file()


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    args = ["mode=sequential", "n_edits=4", "batch_size=2", "algorithm=emmet", "lambda=0.01"]
    with pytest.raises(SimulatedCrash):
        run_config(tmp_path, "killed", *args, "+debug.stop_after_updates=1")
    assert len(read_jsonl(tmp_path / "killed" / "batches.jsonl")) == 1
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = run_config(tmp_path, "killed", *args)
    straight = run_config(tmp_path, "straight", *args)
    for block in ("pre", "post"):
        for metric in ("ES", "PS", "NS", "S"):
            assert resumed[block][metric]["mean"] == pytest.approx(straight[block][metric]["mean"])
    resumed_deltas = torch.load(tmp_path / "killed" / "deltas.pt")["deltas"]
    straight_deltas = torch.load(tmp_path / "straight" / "deltas.pt")["deltas"]
    torch.testing.assert_close(resumed_deltas[1], straight_deltas[1], rtol=1e-5, atol=1e-7)


def test_sequential_with_one_batch_equals_batch_mode(tmp_path):
    batch = run_config(tmp_path, "batch", "mode=batch", "n_edits=3")
    sequential = run_config(tmp_path, "seq", "mode=sequential", "n_edits=3", "batch_size=3")
    assert batch["post"]["ES"] == sequential["post"]["ES"]
    torch.testing.assert_close(
        torch.load(tmp_path / "batch" / "deltas.pt")["deltas"][1],
        torch.load(tmp_path / "seq" / "deltas.pt")["deltas"][1],
    )


def test_singular_rome_evaluates_each_fact_and_keeps_no_deltas(tmp_path):
    summary = run_config(tmp_path, "rome", "algorithm=rome", "mode=singular", "n_edits=2")
    assert summary["batch_size"] == 1 and summary["lambda"] is None
    assert len(read_jsonl(tmp_path / "rome" / "batches.jsonl")) == 2
    assert not (tmp_path / "rome" / "deltas.pt").exists()


def test_every_k_schedule_scores_all_edited_facts(tmp_path):
    summary = run_config(
        tmp_path,
        "k",
        "mode=sequential",
        "n_edits=6",
        "batch_size=2",
        "eval.schedule=every_k",
        "eval.every_k=2",
    )
    batches = read_jsonl(tmp_path / "k" / "batches.jsonl")
    assert [b["evaluated_facts"] for b in batches] == [0, 4, 6]
    assert summary["eval_schedule"] == "every_k" and summary["every_k"] == 2


def test_generation_at_final_samples_ge_after_the_last_update_only(tmp_path):
    """eval.generation_at=final: the curve points before the last carry no GE; the last has the
    same GE as with GE at every scoring (the same facts, sampled on the same final model)."""
    args = ["mode=sequential", "n_edits=6", "batch_size=2", "eval.schedule=every_k"]
    args += ["eval.every_k=1", "eval.generation_facts=3"]
    every = run_config(tmp_path, "every", *args)
    final = run_config(tmp_path, "final", *args, "eval.generation_at=final")
    rows = {name: read_jsonl(tmp_path / name / "batches.jsonl") for name in ("every", "final")}
    assert ["GE" in row["edited_so_far"] for row in rows["every"]] == [True, True, True]
    assert ["GE" in row["edited_so_far"] for row in rows["final"]] == [False, False, True]
    assert final["post"]["GE"] == pytest.approx(every["post"]["GE"])
    assert final["post"]["GE"]["n"] == 3
    with pytest.raises(ConfigError, match="eval.generation_at='sometimes'; expected one of"):
        run_config(tmp_path, "bad", *args, "eval.generation_at=sometimes")
    each_batch = [*args, "eval.schedule=each_batch", "eval.generation_at=final"]
    with pytest.raises(ConfigError, match="GE would cover the last batch's facts only"):
        run_config(tmp_path, "each", *each_batch)


def test_every_k_run_also_gives_the_each_batch_schedule_numbers(tmp_path):
    """An every_k run's each_batch block equals a run on the each_batch schedule: every fact
    right after its own update (taken from the every_k scoring after updates 2 and 3, scored
    on its own after update 1), for the same updates; a run killed after update 2 keeps them."""
    sequential = ["mode=sequential", "n_edits=6", "batch_size=2", "eval.generation_facts=0"]
    every_2 = [*sequential, "eval.schedule=every_k", "eval.every_k=2"]
    with pytest.raises(SimulatedCrash):
        run_config(tmp_path, "k", *every_2, "+debug.stop_after_updates=2")
    every_k = run_config(tmp_path, "k", *every_2)
    each = run_config(tmp_path, "each", *sequential, "eval.schedule=each_batch")
    assert each["each_batch"] == each["post"]
    assert every_k["each_batch"].keys() == each["post"].keys()
    for metric, stats in each["post"].items():
        assert every_k["each_batch"][metric] == pytest.approx(stats, rel=1e-6, abs=1e-8), metric
    assert every_k["post"] != every_k["each_batch"]  # later updates moved the first facts
    right_after = {
        row["case_id"]: row["post"] for row in read_jsonl(tmp_path / "each" / "facts.jsonl")
    }
    for row in read_jsonl(tmp_path / "k" / "facts.jsonl"):
        expected = right_after[row["case_id"]]["scores"]
        torch.testing.assert_close(row["each_batch"]["scores"], expected, rtol=1e-6, atol=1e-7)
    evaluated = [b["evaluated_facts"] for b in read_jsonl(tmp_path / "k" / "batches.jsonl")]
    assert evaluated == [0, 4, 6]  # the extra scoring after update 1 is not every_k's


def test_finished_run_is_skipped_and_other_config_in_same_dir_refused(tmp_path, capsys):
    first = run_config(tmp_path, "once", "mode=batch", "n_edits=2")
    again = run_config(tmp_path, "once", "mode=batch", "n_edits=2")
    assert again == first
    assert "skipping" in capsys.readouterr().out
    (tmp_path / "once" / "summary.json").unlink()
    with pytest.raises(RunDirError, match="different config"):
        run_config(tmp_path, "once", "mode=batch", "n_edits=2", "seed=5")


def test_emmet_exact_with_more_facts_than_dk_fails_before_editing(tmp_path):
    with pytest.raises(ConfigError, match="d_k=128"):
        run_config(tmp_path, "big", "algorithm=emmet", "lambda=0", "mode=batch", "n_edits=130")


def test_a_slurm_job_runs_torch_on_the_cpus_it_was_given(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    try:
        assert use_slurm_cpus() == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins
        assert use_slurm_cpus() is None and torch.get_num_threads() == before
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")  # not a SLURM job
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert use_slurm_cpus() is None
    finally:
        torch.set_num_threads(before)
