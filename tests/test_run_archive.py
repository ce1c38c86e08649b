"""editexp.run_archive: a study's finished runs copied, records only, to another directory and
back; restored runs are reported as before and skipped by the same command; a copy never
overwrites a different result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from console_scripts import TWO_UPDATES, editexp
from test_report import _job, _multirun_yaml, _summary

from editexp.errors import UserError
from editexp.run_archive import copy_records, main
from editexp.sweep_runs import collect


def files_below(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def a_sweep(root: Path) -> None:
    """Two finished grid points with everything a run leaves, an unfinished one with its
    checkpoint, and an earlier attempt moved aside."""
    root.mkdir()
    _multirun_yaml(root, {"lambda": "1,10,100"}, ["algorithm=memit"])
    for num, lam in enumerate((1.0, 10.0)):
        job = _job(root, num, [f"lambda={lam:g}"], _summary(lam=lam), batches=[{"batch": 0}])
        (job / ".hydra" / "config.yaml").write_text(f"lambda: {lam}\n")
        (job / "facts.jsonl").write_text('{"case_id": 1}\n')
        (job / "run.json").write_text("{}\n")
        (job / "runner.log").write_text("Results:\n")
        (job / "deltas.pt").write_bytes(b"\0" * 64)
        (job / "wandb" / "run-1").mkdir(parents=True)
        (job / "wandb" / "run-1" / "run.wandb").write_bytes(b"\1")
        (job / ".attempts" / "old").mkdir(parents=True)
        (job / ".attempts" / "old" / "summary.json").write_text("{}")
    unfinished = _job(root, 2, ["lambda=100"], None)
    (unfinished / "checkpoint.pt").write_bytes(b"\0")


def test_only_finished_runs_records_are_copied_and_read_back_the_same(tmp_path):
    sweep, archive = tmp_path / "sweep", tmp_path / "archive"
    a_sweep(sweep)
    assert copy_records(sweep, archive) == (2, 0)
    run_files = [".hydra/config.yaml", ".hydra/overrides.yaml", "batches.jsonl", "facts.jsonl"]
    run_files += ["run.json", "runner.log", "summary.json"]
    expected = {"multirun.yaml"} | {f"{num}/{name}" for num in (0, 1) for name in run_files}
    assert set(files_below(archive)) == expected  # no deltas, W&B, attempts, unfinished job
    assert all(files_below(archive)[name] == (sweep / name).read_bytes() for name in expected)
    before, after = collect(sweep), collect(archive)
    assert [run.record for run in after.runs] == [run.record for run in before.runs]
    assert [run.overrides for run in after.runs] == [run.overrides for run in before.runs]
    assert after.grid == before.grid and not after.unreadable


def test_a_run_there_is_left_alone_and_a_different_result_refused(tmp_path):
    sweep, archive = tmp_path / "sweep", tmp_path / "archive"
    a_sweep(sweep)
    copy_records(sweep, archive)
    (sweep / "0" / "runner.log").write_text("Results:\n... exists; skipping\n")  # a rerun
    _multirun_yaml(sweep, {"lambda": "1,10,100,1000"}, ["algorithm=memit"])  # a wider grid
    assert copy_records(sweep, archive) == (0, 2)
    assert (archive / "0" / "runner.log").read_text() == "Results:\n"
    assert b"1,10,100,1000" in (archive / "multirun.yaml").read_bytes()

    summary = archive / "1" / "summary.json"
    summary.write_text(json.dumps(_summary(lam=10.0, post=(50.0, 50.0, 50.0))))
    (sweep / "multirun.yaml").write_text("changed")
    before = files_below(archive)
    with pytest.raises(UserError, match=r"archive/1 holds another result than .*sweep/1"):
        copy_records(sweep, archive)
    assert files_below(archive) == before  # not even the changed grid was copied


def test_a_copy_killed_before_the_summary_is_done_again(tmp_path):
    sweep, archive = tmp_path / "sweep", tmp_path / "archive"
    a_sweep(sweep)
    copy_records(sweep, archive)
    (archive / "1" / "summary.json").unlink()  # as a copy killed before its last file
    (archive / "1" / "facts.jsonl").write_text("half")
    assert copy_records(sweep, archive) == (1, 1)
    assert (archive / "1" / "facts.jsonl").read_bytes() == (
        sweep / "1" / "facts.jsonl"
    ).read_bytes()


def test_a_sweep_with_no_finished_run_leaves_no_grid_in_the_archive(tmp_path):
    study, archive = tmp_path / "study", tmp_path / "archive"
    study.mkdir()
    a_sweep(study / "finished")
    (study / "started").mkdir()
    _multirun_yaml(study / "started", {"lambda": "1"}, ["algorithm=emmet"])
    _job(study / "started", 0, ["lambda=1"], None)  # stopped before its summary
    assert copy_records(study, archive) == (2, 0)
    assert (archive / "finished" / "multirun.yaml").is_file()
    assert not (archive / "started").exists()


def test_a_missing_source_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), str(tmp_path / "archive")])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("run_archive: error: ") and "nowhere is not a directory" in line


def test_a_restored_run_is_skipped_by_the_same_command(tmp_path, finished, monkeypatch):
    """A real tiny run saved to an archive and restored on "another machine" (a new directory
    with a fresh cache): the runner finds it finished and leaves its results as they were."""
    run, cache = finished
    archive, restored = tmp_path / "archive", tmp_path / "restored"
    copy_records(run.parent, archive)
    main([str(archive), str(restored)])
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "fresh-cache"))

    def results() -> dict[str, bytes]:  # Hydra rewrites .hydra/ and the log on every start
        files = files_below(restored / "run").items()
        return {
            k: v for k, v in files if not k.startswith(".hydra") and k[-4:] not in (".log", "lock")
        }

    before = results()
    result = editexp(restored / "run", *TWO_UPDATES)
    assert result.code == 0 and "skipping" in result.out, result.err
    assert results() == before
