"""The run directory holds one config and one attempt: a second job on a locked directory fails
at once, a finished run is skipped or refused by its config (and the report refuses a summary
that is not its grid point), ``force=true`` moves earlier results aside, a damaged checkpoint
or summary is named, and a killed run resumes bit for bit (tiny models; SmolLM2 for one
kill -9).

Each case runs the console script as a user does (in process, through Hydra, with its exit
status); real subprocesses only where a second process or a kill is the point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from console_scripts import (
    TINY,
    TWO_UPDATES,
    cli,
    editexp,
    error_line,
    read_jsonl,
    records,
    user_error,
    write_counterfact,
)

import editexp.cli as editexp_cli
from editexp import report
from editexp.run_dir import ATTEMPTS_DIR, RunDirectory


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (relative path -> bytes), Hydra's log and the lock file
    (which names its last holder) left out."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.suffix not in (".log", ".lock")
    }


def copy_of(finished_run: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of the finished run directory."""
    target = tmp_path / name
    shutil.copytree(finished_run, target)
    return target


# --------------------------------------------------------------------------- the run directory


def test_a_second_job_on_a_locked_directory_fails_at_once_naming_the_holder(
    tmp_path, finished, no_model
):
    run_dir = copy_of(finished[0], tmp_path)
    (run_dir / "summary.json").unlink()  # would be resumed from its checkpoint if it ran
    before = files_of(run_dir)
    with RunDirectory(run_dir).locked():
        holder = (run_dir / ".editexp.lock").read_text()
        result = editexp(run_dir, *TWO_UPDATES)
    line = user_error(result)
    assert "is in use by another editexp run" in line and f"pid {os.getpid()} on" in line
    assert holder in line and "another directory" in line
    assert files_of(run_dir) == before  # .hydra/ put back as the owner wrote it, nothing else


def test_memit_and_emmet_started_at_once_on_one_directory(tmp_path, finished):
    """Two real processes: one runs, the other is refused with exit 2 (the lock, or, if it
    starts after the first finished, the other config); the results are one run's only."""
    run_dir = tmp_path / "shared"
    env = {**os.environ, "EDITEXP_CACHE_DIR": str(tmp_path / "cache")}
    shutil.copytree(finished[1], tmp_path / "cache")
    processes = {
        algorithm: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "editexp.runner",
                *TINY,
                *TWO_UPDATES,
                f"algorithm={algorithm}",
                "lambda=0.01",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for algorithm in ("memit", "emmet")
    }
    results = {name: (p.wait(timeout=600), *p.communicate()) for name, p in processes.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], {name: (code, err[-2000:]) for name, (code, _, err) in results.items()}
    (winner,) = [name for name, (code, _, _) in results.items() if code == 0]
    (loser,) = [name for name, (code, _, _) in results.items() if code == 2]
    line = results[loser][2].strip().splitlines()[-1]
    assert line.startswith("editexp: error: ")
    assert "in use by another editexp run" in line or "different config" in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == winner and summary["edits_done"] == 2
    assert json.loads((run_dir / "run.json").read_text())["config"]["algorithm"]["name"] == winner
    assert f"name: {winner}" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert len(read_jsonl(run_dir / "facts.jsonl")) == 2
    assert len(read_jsonl(run_dir / "batches.jsonl")) == 2
    assert not (run_dir / ATTEMPTS_DIR).exists()


def test_a_finished_run_of_another_config_is_refused_not_skipped(tmp_path, finished, no_model):
    run_dir = copy_of(finished[0], tmp_path)
    before = files_of(run_dir)
    line = user_error(editexp(run_dir, *TWO_UPDATES, "lambda=1000"))
    assert "holds a finished run of a different config (lambda: null -> 1000)" in line
    assert "force=true" in line and ATTEMPTS_DIR in line
    assert files_of(run_dir) == before  # the summary kept, and .hydra/ says its config again


def test_a_finished_run_of_the_same_config_is_skipped(tmp_path, finished, no_model):
    run_dir = copy_of(finished[0], tmp_path)
    results = lambda: {k: v for k, v in files_of(run_dir).items() if not k.startswith(".hydra")}  # noqa: E731
    before = results()
    result = editexp(run_dir, *TWO_UPDATES, "device=cpu", "save_deltas=false")  # not results
    assert result.code == 0 and "skipping" in result.out
    assert results() == before


def test_a_fixed_sweep_dir_rerun_with_a_new_lambda_grid(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    sweep = tmp_path / "sweep"
    args = [*TINY, *TWO_UPDATES, f"hydra.sweep.dir={sweep}"]
    first = cli(editexp_cli.main, "-m", *args, "lambda=1,10")
    assert first.code == 0, first.err
    summaries = {path: path.read_bytes() for path in sweep.rglob("summary.json")}
    assert len(summaries) == 2
    second = cli(editexp_cli.main, "-m", *args, "lambda=100,1000")
    line = error_line(second)
    assert "different config (lambda: 1 -> 100)" in line and "force=true" in line
    assert {path: path.read_bytes() for path in sweep.rglob("summary.json")} == summaries
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report.main([str(sweep)]) == 0
    assert "0 of 2 grid points complete." in out.getvalue()
    assert "2 completed run(s) match no grid point." in out.getvalue()


def test_report_refuses_a_summary_that_is_not_its_grid_point(tmp_path, finished):
    """A summary whose config hash is not the one of its job's .hydra/config.yaml (as a
    directory reused by hand would hold) is not counted as that point's result."""
    sweep = tmp_path / "sweep"
    good = copy_of(finished[0], sweep, "0")
    bad = copy_of(finished[0], sweep, "1")
    config = bad / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("lambda: null", "lambda: 1000.0"))
    (sweep / "2").mkdir()
    (sweep / "2" / "summary.json").write_text("[1, 2]")  # not an object
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report.main([str(sweep)]) == 0
    text = out.getvalue()
    assert "1 completed run(s)" in text
    assert "1/summary.json: summary.json is for another config" in text
    assert "2/summary.json: summary.json holds a JSON list, not an object" in text
    rows = list(csv_rows(sweep / "report" / "results.csv"))
    assert [row["run_dir"] for row in rows] == [good.name]


def csv_rows(path: Path):
    import csv

    with path.open() as handle:
        yield from csv.DictReader(handle)


def test_a_killed_force_rerun_never_mixes_two_attempts(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    run_dir = copy_of(finished[0], tmp_path)
    old = {
        name: (run_dir / name).read_bytes()
        for name in ("summary.json", "facts.jsonl", "batches.jsonl", "deltas.pt")
    }
    killed = editexp(run_dir, *TWO_UPDATES, "force=true", "+debug.stop_after_updates=1")
    assert killed.code == 1 and "SimulatedCrash" in killed.err  # a crash, not a user error
    (attempt,) = (run_dir / ATTEMPTS_DIR).iterdir()
    assert {name: (attempt / name).read_bytes() for name in old} == old  # kept whole, aside
    assert not (run_dir / "summary.json").exists() and not (run_dir / "deltas.pt").exists()
    assert [row["batch"] for row in read_jsonl(run_dir / "batches.jsonl")] == [0]
    listing = cli(lambda: sys.exit(report.main([str(tmp_path)])))
    assert listing.code == 2 and "no finished run (summary.json)" in listing.err  # aside

    resumed = editexp(run_dir, *TWO_UPDATES)
    assert resumed.code == 0, resumed.err
    assert "Resuming after update 1 of 2" in resumed.out
    assert [row["batch"] for row in read_jsonl(run_dir / "batches.jsonl")] == [0, 1]
    assert json.loads((run_dir / "summary.json").read_text())["edits_done"] == 2


def test_resume_refuses_other_data_and_goes_on_when_it_is_back(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    data = write_counterfact(tmp_path / "cf.json", records(40))
    original = data.read_bytes()
    run_dir = tmp_path / "run"
    args = [*TWO_UPDATES, f"data.counterfact={data}"]
    assert editexp(run_dir, *args, "+debug.stop_after_updates=1").code == 1
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()

    write_counterfact(data, records(40)[20:])  # 20 facts, other ones
    line = user_error(editexp(run_dir, *args))
    assert "holds an unfinished run made with other data (counterfact: " in line
    assert "restore it to finish that run" in line and "force=true" in line
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint
    assert not (run_dir / "summary.json").exists()

    data.write_bytes(original)
    resumed = editexp(run_dir, *args)
    assert resumed.code == 0, resumed.err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["edits_done"] == 2 and summary["post"]["ES"]["n"] == 2
    assert len(read_jsonl(run_dir / "facts.jsonl")) == 2


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("checkpoint.pt", b"PK\x03\x04 cut short", "checkpoint.pt is damaged"),
        ("summary.json", b'{"algorithm": "mem', "summary.json is damaged (JSONDecodeError"),
        ("summary.json", b"[]", "summary.json is damaged (a JSON list, not an object)"),
    ],
)
def test_a_damaged_checkpoint_or_summary_is_named(
    tmp_path, finished, no_model, name, content, says
):
    run_dir = copy_of(finished[0], tmp_path)
    if name == "checkpoint.pt":
        (run_dir / "summary.json").unlink()
    (run_dir / name).write_bytes(content)
    line = user_error(editexp(run_dir, *TWO_UPDATES))
    assert f"{run_dir / name}" in line and says in line and "force=true" in line


def test_a_summary_without_its_fields_is_named_not_a_key_error(tmp_path, finished, no_model):
    run_dir = copy_of(finished[0], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["lambda"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    line = user_error(editexp(run_dir, *TWO_UPDATES))
    assert f"{run_dir / 'summary.json'} is damaged (KeyError('lambda')" in line


def test_resume_is_bit_exact(tmp_path, finished, monkeypatch):
    """Killed after each of its updates in turn and resumed, a run ends with the same weights,
    deltas and rows, bit for bit, as a run that never stopped.

    eval.layer_states_gb=0: scoring from stored layer states differs from a full forward pass
    in the last bit, and states are stored only when the pre-edit scores are computed (not when
    they come from the cache, as they do for a resumed run); that is not resume's doing."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    args = [
        "mode=sequential",
        "n_edits=3",
        "batch_size=1",
        "layer=[1,2]",
        "algorithm=emmet",
        "lambda=0.01",
        "eval.layer_states_gb=0",
    ]
    assert editexp(tmp_path / "straight", *args).code == 0
    for stop in (1, 2):
        crashed = editexp(tmp_path / "resumed", *args, f"+debug.stop_after_updates={stop}")
        assert crashed.code == 1 and "SimulatedCrash" in crashed.err
    assert editexp(tmp_path / "resumed", *args).code == 0
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for name in ("deltas.pt", "checkpoint.pt"):
        a, b = torch.load(straight / name), torch.load(resumed / name)
        for key in ("deltas", "weights"):
            for layer in a.get(key, {}):
                assert torch.equal(a[key][layer], b[key][layer]), (name, key, layer)
    assert read_jsonl(straight / "facts.jsonl") == read_jsonl(resumed / "facts.jsonl")
    assert without_timing(straight / "batches.jsonl") == without_timing(resumed / "batches.jsonl")


def without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "timing"} for row in read_jsonl(path)]


# --------------------------------------------------------------------------- SmolLM2: kill -9


SMOLLM2 = [
    "model=smollm2-135m",
    "logger=none",
    "algorithm=memit",
    "mode=sequential",
    "n_edits=3",
    "batch_size=1",
    "stats.n_tokens=4096",
    "stats.seq_len=128",
    "eval.generation_facts=0",
    "eval.held_out_keys=16",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.memit.v_steps=4",
    "eval.layer_states_gb=0",  # see test_resume_is_bit_exact
]


@pytest.mark.slow
def test_smollm2_killed_with_sigkill_resumes_bit_exact(tmp_path):
    """kill -9 after the first update; the resumed run equals one that never stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def start(run_dir: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "editexp", *SMOLLM2, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    straight = start(tmp_path / "straight")
    _, err = straight.communicate(timeout=1200)
    assert straight.returncode == 0, err[-3000:]

    killed_dir = tmp_path / "killed"
    killed = start(killed_dir)
    deadline = time.monotonic() + 1200
    while not (killed_dir / "batches.jsonl").is_file() and killed.poll() is None:
        assert time.monotonic() < deadline, "no update within the time limit"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len(read_jsonl(killed_dir / "batches.jsonl"))
    assert 1 <= done < 3 and not (killed_dir / "summary.json").exists()

    resumed = start(killed_dir)
    out, err = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, err[-3000:]
    assert f"Resuming after update {done} of 3" in out + err
    a = torch.load(tmp_path / "straight" / "deltas.pt")["deltas"]
    b = torch.load(killed_dir / "deltas.pt")["deltas"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(tmp_path / "straight" / "facts.jsonl") == read_jsonl(
        killed_dir / "facts.jsonl"
    )
