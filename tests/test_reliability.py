"""Reliability: a run directory never holds mixed or lost results, caches heal, and every user
error is one line on stderr with exit status 2 before the model loads (issue 11).

Each case runs the console script as a user does (in process, through Hydra, with its exit
status); real subprocesses only where a second process or a kill is the point. Tiny models;
SmolLM2 for one kill -9 and resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cached_model, compose_config

import editexp.runner as runner_module
import editexp.stats_cli as stats_cli
from editexp import report
from editexp.cache import load_or_compute
from editexp.layer_stats import StatsError, load_or_compute_stats
from editexp.models import model_shape
from editexp.run_dir import ATTEMPTS_DIR, RunDirectory

DATA_DIR = Path(os.environ["EDITEXP_DATA_DIR"])
COUNTERFACT = DATA_DIR / "counterfact" / "counterfact.json"
TINY = [
    "model=tiny-llama3",
    "logger=none",
    "stats.n_tokens=1000",
    "stats.seq_len=64",
    "eval.generation_facts=0",
    "eval.held_out_keys=16",
    "editing.prefixes.count=1",
    "editing.prefixes.length=4",
    "model.hparams.memit.v_steps=2",
    "model.hparams.emmet.v_steps=2",
    "model.hparams.rome.v_steps=2",
]
TWO_UPDATES = ["mode=sequential", "n_edits=2", "batch_size=1"]


# --------------------------------------------------------------------------- helpers


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def message(self) -> str:
        """stderr's one line (asserting that there is exactly one)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        return lines[0]


def cli(main, *args: str) -> Result:
    """Run a console script's ``main`` in this process as ``prog args``: exit status, stdout
    and stderr (an exception that escapes is a traceback, status 1, as Python exits)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["editexp", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception as error:  # noqa: BLE001 - reported like an uncaught exception
        code = 1
        err.write(f"Traceback (most recent call last):\n{type(error).__name__}: {error}\n")
    finally:
        sys.argv = argv
        logging.shutdown()
        for handler in list(logging.getLogger().handlers):  # Hydra's file handler, per run
            logging.getLogger().removeHandler(handler)
    return Result(code, out.getvalue(), err.getvalue())


def editexp(run_dir: Path, *overrides: str) -> Result:
    return cli(runner_module.main, *TINY, f"hydra.run.dir={run_dir}", *overrides)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the runner loads a model (user errors come before it)."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(runner_module, "load_model", must_not_load)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (statistics of tiny-llama3 take a second)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(path))
    return path


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (relative path -> bytes), Hydra's log and the lock file
    (which names its last holder) left out."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.suffix not in (".log", ".lock")
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_counterfact(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def records(n: int = 40) -> list[dict]:
    return json.loads(COUNTERFACT.read_text())[:n]


def error_line(result: Result, prog: str = "editexp") -> str:
    """The error message: the last line of stderr, with no traceback before it."""
    assert result.code == 2, f"exit {result.code}:\n{result.err[-3000:]}"
    assert "Traceback" not in result.err, result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), result.err
    return line


def user_error(result: Result, prog: str = "editexp") -> str:
    """A user error caught before any work: exit 2 and exactly one line on stderr."""
    assert result.code == 2, f"exit {result.code}:\n{result.err[-3000:]}"
    line = result.message
    assert line.startswith(f"{prog}: error: "), line
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished two-update run and the cache it filled (copy them before changing them)."""
    root = tmp_path_factory.mktemp("finished")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDITEXP_CACHE_DIR", str(cache))
        result = editexp(root / "run", *TWO_UPDATES)
    assert result.code == 0, result.err
    return root / "run", cache


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
    first = cli(runner_module.main, "-m", *args, "lambda=1,10")
    assert first.code == 0, first.err
    summaries = {path: path.read_bytes() for path in sweep.rglob("summary.json")}
    assert len(summaries) == 2
    second = cli(runner_module.main, "-m", *args, "lambda=100,1000")
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
    assert listing.code == 1 and "no summary.json found" in listing.err  # aside: not a result

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


# --------------------------------------------------------------------------- caches heal


def test_damaged_pre_edit_and_prefixes_caches_heal(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    (pre_edit,) = (tmp_path / "cache" / "pre_edit").glob("*.json")
    (prefixes,) = (tmp_path / "cache" / "prefixes").glob("*.json")
    good = {path: path.read_bytes() for path in (pre_edit, prefixes)}
    expected = read_jsonl(finished[0] / "facts.jsonl")
    damages = [
        (b'[{"case_id": 3, "sco', b'["cut'),  # truncated files
        (b'{"not": "a list"}', b'{"not": "a list"}'),  # wrong types
        (b"{}", b'[""]'),  # no facts, too few prefixes: {} was a KeyError after the whole edit
        (b"[]", b"[1, 2]"),
    ]
    for attempt, (bad_pre_edit, bad_prefixes) in enumerate(damages):
        pre_edit.write_bytes(bad_pre_edit)
        prefixes.write_bytes(bad_prefixes)
        result = editexp(tmp_path / f"run{attempt}", *TWO_UPDATES)
        assert result.code == 0, result.err
        for what in ("pre-edit score cache", "prefixes cache"):
            assert re.search(f"{what} .* is bad \\(.*\\); removing it and computing it", result.out)
        assert read_jsonl(tmp_path / f"run{attempt}" / "facts.jsonl") == expected
        assert {path: path.read_bytes() for path in good} == good  # healed, the same entries


def test_a_bad_entry_is_computed_again_and_a_good_one_is_read_without_a_lock(tmp_path):
    path = tmp_path / "entry.json"
    calls = []

    def compute():
        calls.append(1)
        return [1, 2, 3]

    def problem(value):
        return None if isinstance(value, list) and len(value) == 3 else "not three numbers"

    def get():
        return load_or_compute(
            path,
            load=lambda p: json.loads(p.read_text()),
            save=lambda p, v: p.write_text(json.dumps(v)),
            compute=compute,
            problem=problem,
        )

    path.write_text("[1, 2]")
    assert get() == [1, 2, 3] and len(calls) == 1
    Path(f"{path}.lock").unlink()
    assert get() == [1, 2, 3] and len(calls) == 1
    assert not Path(f"{path}.lock").exists()  # read: no lock file, nothing written


def test_a_populated_cache_is_read_without_writing_to_it(tmp_path, finished, monkeypatch):
    """No lock file, no write: a complete cache may be read-only (read-only for real when the
    tests do not run as root, who may write anyway)."""
    cache = tmp_path / "cache"
    shutil.copytree(finished[1], cache)
    for lock in cache.rglob("*.lock"):
        lock.unlink()
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache))
    before = {str(p): p.stat().st_mtime_ns for p in cache.rglob("*")}
    modes = {p: p.stat().st_mode for p in [cache, *cache.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        result = editexp(tmp_path / "run", *TWO_UPDATES)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert result.code == 0, result.err
    assert {str(p): p.stat().st_mtime_ns for p in cache.rglob("*")} == before


# --------------------------------------------------------------------------- user input


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["layer=1.5"], "layer=1.5; expected an int or a list of ints"),
        (["layer=true"], "layer=True; expected an int or a list of ints"),
        (["layer=[1,x]"], "layer=[1, 'x']; expected an int or a list of ints"),
        (["n_edits=2.0"], "n_edits=2.0; expected a positive integer"),
        (["editing.batch_size=0"], "editing.batch_size=0; expected a positive integer"),
        (["eval.batch_size=0"], "eval.batch_size=0; expected a positive integer"),
        (
            ["eval.generation_batch_size=-2"],
            "eval.generation_batch_size=-2; expected a positive integer",
        ),
        (["editing.cache=no"], "editing.cache='no'; expected true or false"),
        (["eval.layer_states_gb=abc"], "eval.layer_states_gb='abc'; expected a finite number >= 0"),
        (["eval.generation_facts=-1"], "eval.generation_facts=-1; expected a number of facts"),
        (["stats.n_tokens=abc"], "stats.n_tokens='abc'; expected a positive integer"),
        (["stats.dtype=float8"], "stats.dtype='float8'; expected one of"),
        (["seed=abc"], "seed='abc'; expected an integer"),
        (["device=foo"], "device='foo'; expected auto, cpu, cuda"),
        (["lambda=true"], "lambda=True; expected a float >= 0"),
        (["force=maybe"], "force='maybe'; expected true or false"),
        (["model.hparams.memit.v_lr=-1"], "model.hparams.memit.v_lr=-1; expected a finite"),
        (["data.case_ids=[3,3]"], "data.case_ids repeats [3]"),
        (["data.case_ids=[1,x]"], "data.case_ids has 'x'; expected a list of integer"),
        (["data.case_ids=[3]", "data.order=file"], "data.case_ids implies data.order=case_ids"),
        (["data.order=case_ids", "data.case_ids=[3,999999]"], "not in the data set: [999999]"),
        (["data.case_ids=[70,6698]"], "an earlier listed fact already has: case_ids [6698]"),
        (["model=nonexistent"], "Could not find 'model/nonexistent' Available options"),
        (["mode=sequential", "batch_size=3"], "mode=sequential needs n_edits divisible"),
    ],
)
def test_config_errors_are_one_line_before_the_model_loads(tmp_path, no_model, overrides, says):
    args = [*TWO_UPDATES, *overrides]
    line = user_error(editexp(tmp_path / "run", *args))
    assert says in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_message_names_the_grid_point_in_a_multirun(tmp_path, no_model):
    result = cli(
        runner_module.main,
        "-m",
        *TINY,
        *TWO_UPDATES,
        "layer=1.5",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    line = error_line(result)  # every point is checked before the first one starts
    assert "1 of 1 grid points would fail" in line and "#0 (" in line
    assert "layer=1.5; expected an int" in line


def bad_records(tmp_path: Path, change) -> Path:
    data = records(20)
    change(data)
    return write_counterfact(tmp_path / "bad.json", data)


def rewrite_prompt(index: int, prompt: str):
    def change(data):
        data[index]["requested_rewrite"]["prompt"] = prompt

    return change


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d.write_text(COUNTERFACT.read_text()[:5000]), "is not valid JSON (Unterminated"),
        (lambda d: d.write_bytes(b"\xff\xfe\x00binary"), "is not UTF-8 text"),
        (lambda d: d.write_text('{"case_id": 0}'), "expected a JSON list of CounterFact records"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{} and {} is in")), "exactly one '{}'"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{x} is located in")), "exactly one"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{}'s {0} is")), "no other brace"),
        (lambda d: bad_records(d.parent, lambda r: r[2].pop("requested_rewrite")), "missing field"),
        (lambda d: bad_records(d.parent, lambda r: r[4].update(case_id=r[5]["case_id"])), "twice"),
        (lambda d: bad_records(d.parent, lambda r: r[1].update(case_id="7")), "must be an integer"),
    ],
)
def test_bad_counterfact_files_are_one_line_naming_the_file(tmp_path, no_model, make, says):
    path = tmp_path / "bad.json"
    make(path)
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"data.counterfact={path}"))
    assert str(path) in line and says in line


def test_a_prompt_longer_than_the_model_is_refused_naming_its_case(tmp_path, cache, no_model):
    data = records(4)
    data[0]["requested_rewrite"]["prompt"] = "{} " + "went on and on " * 200 + "to"
    path = write_counterfact(tmp_path / "long.json", data)
    args = [*TWO_UPDATES, f"data.counterfact={path}", "data.order=file"]
    line = user_error(editexp(tmp_path / "run", *args))
    case_id = data[0]["case_id"]
    assert f"case_id={case_id}" in line and "more than the model's 512 positions" in line
    assert not (cache / "stats").exists()  # before the model loads, so before any statistics


def test_data_case_ids_implies_their_order(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    wanted = [records(40)[i]["case_id"] for i in (7, 3)]
    result = editexp(tmp_path / "run", *TWO_UPDATES, f"data.case_ids=[{wanted[0]},{wanted[1]}]")
    assert result.code == 0, result.err
    assert [row["case_id"] for row in read_jsonl(tmp_path / "run" / "facts.jsonl")] == wanted


def test_no_network_and_no_data_dir_says_to_set_data_dir(tmp_path, cache, no_model):
    args = [*TWO_UPDATES, "data.dir=null", "data.download_url=http://editexp.invalid/cf.json"]
    line = user_error(editexp(tmp_path / "run", *args))
    assert "no CounterFact data: downloading http://editexp.invalid/cf.json failed" in line
    assert "no network?" in line and "set data.dir to a folder" in line
    assert not (cache / "data").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"\x00\x01\x02 binary \x00" * 100, "holds NUL bytes"), (b"\xff\xfeabc", "is not UTF-8 text")],
)
def test_a_binary_corpus_is_refused_before_the_model_loads(tmp_path, no_model, content, says):
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(content)
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"stats.corpus.files=[{corpus}]"))
    assert f"statistics corpus file {corpus} is not usable: it {says}" in line


def test_a_corpus_shorter_than_d_k_is_refused_before_the_model_loads(tmp_path, cache, no_model):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"stats.corpus.files=[{corpus}]"))
    assert re.search(r"tiny.txt\) holds \d tokens, fewer than d_k=128, so C0 would be", line)
    assert not (cache / "stats").exists()


def test_statistics_refuse_a_corpus_shorter_than_d_k_and_cache_nothing(
    tiny_llama3, tmp_path, cache
):
    """The check the statistics themselves make (for a datasets corpus, counted only as it is
    read): a singular C0 is an error, never a cache entry."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    cfg = compose_config(
        "model=tiny-llama3", f"stats.corpus.files=[{corpus}]", "stats.n_tokens=300"
    )
    with pytest.raises(StatsError, match=r"gave \d tokens, fewer than d_k=128 at layer 1"):
        load_or_compute_stats(tiny_llama3, [1], cfg.stats, cfg.data, held_out_keys=0)
    assert not list((cache / "stats").rglob("*.pt"))


def test_n_tokens_below_d_k_is_refused_before_the_model_loads(tmp_path, cache, no_model):
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, "stats.n_tokens=100"))
    assert "stats.n_tokens=100 is less than d_k=128" in line
    assert not (cache / "stats").exists()


def test_emmet_lambda_0_refuses_a_batch_of_d_k_facts_before_the_model_loads(
    tmp_path, cache, no_model
):
    args = ["algorithm=emmet", "lambda=0", "mode=batch", "n_edits=128"]
    line = user_error(editexp(tmp_path / "run", *args))
    assert "EMMET with lambda=0 needs fewer than d_k=128 facts per update" in line
    assert "lambda > 0" in line and not (cache / "stats").exists()


def test_emmet_lambda_0_warns_above_condition_1e8_and_refuses_e_equal_d_k(caplog):
    from editexp.editing.emmet import emmet_delta
    from editexp.editing.linalg import CovarianceFactor, EditingError

    generator = torch.Generator().manual_seed(0)
    d_k = 16
    covariance = CovarianceFactor(torch.eye(d_k, dtype=torch.float64))
    keys = torch.randn(d_k, 4, generator=generator, dtype=torch.float64)
    residuals = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    for spread, warns in ((1e-2, False), (1e-4, True)):  # cond about 1e5 and 1e9
        near = keys[:, :1] + spread * torch.randn(d_k, 1, generator=generator, dtype=torch.float64)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="editexp.editing.emmet"):
            emmet_delta(torch.cat([keys, near], 1), residuals, covariance, 0.0)
        assert ("consider lambda > 0" in caplog.text) == warns
    square = torch.randn(d_k, d_k, generator=generator, dtype=torch.float64)
    with pytest.raises(EditingError, match=r"fewer than d_k=16 facts per batch, got E=16"):
        emmet_delta(square, torch.randn(8, d_k, dtype=torch.float64), covariance, 0.0)


# --------------------------------------------------------------------------- disks and tools


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, finished, monkeypatch):
    """torch.save reports a full disk as ``RuntimeError: ... unexpected pos``; the checkpoint
    write fails here, after the first update's rows were kept."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".checkpoint.pt."):
            real_save(obj, path, *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    run_dir = tmp_path / "run"
    line = error_line(editexp(run_dir, *TWO_UPDATES))
    assert f"cannot write {run_dir / 'checkpoint.pt'}: the write was cut short" in line
    assert "is the disk full?" in line
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "checkpoint.pt").exists()


def test_a_real_full_disk(tmp_path, finished, monkeypatch):
    """The run directory on a 160 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
        shutil.copytree(finished[1], tmp_path / "cache")
        result = editexp(mount / "run", *TWO_UPDATES, "hydra/job_logging=stdout")
        line = error_line(result)
        assert f"cannot write {mount / 'run'}" in line
        assert "no space left on the device" in line or "is the disk full?" in line
        assert not list((mount / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_editexp_stats_errors_are_one_line_and_leave_no_outputs_tree(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stats_cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for args, says in (
        (["layer=[1,9]"], "layer=[9] is outside model 'tiny-llama3'"),
        (["stats.n_tokens=abc"], "stats.n_tokens='abc'; expected a positive integer"),
        (["stats.corpus.files=[/nonexistent.txt]"], "/nonexistent.txt does not exist"),
    ):
        line = user_error(cli(stats_cli.main, "model=tiny-llama3", *args), "editexp-stats")
        assert says in line
    assert list(tmp_path.iterdir()) == [cache] or not list(tmp_path.iterdir())


def test_editexp_stats_refuses_too_few_tokens_before_the_model_loads(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stats_cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    for args, says in (
        (["stats.n_tokens=100"], "stats.n_tokens=100 is less than d_k=128 of model 'tiny-llama3'"),
        ([f"stats.corpus.files=[{corpus}]"], "tokens, fewer than d_k=128, so C0 would be singular"),
    ):
        line = user_error(
            cli(stats_cli.main, "model=tiny-llama3", "layer=1", *args), "editexp-stats"
        )
        assert says in line
    assert not (cache / "stats").exists()


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gpt2", "smollm2-135m"])
def test_the_shape_checked_before_loading_is_the_loaded_models(name):
    """d_k and the context length read from the config (modules built on the meta device)
    are the loaded model's: the checks before loading see the model that then runs."""
    loaded = cached_model(name)
    model_cfg = compose_config(f"model={name}").model
    for layer in (0, model_cfg.n_layers - 1):
        shape = model_shape(model_cfg, layer)
        assert shape.d_k == loaded.weight(layer).shape[1]
        config = loaded.model.config
        positions = getattr(config, "max_position_embeddings", None)
        assert shape.positions == (positions or config.n_positions) > 0
        text = "The Eiffel Tower is in"
        assert shape.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids


def test_editexp_stats_writes_only_the_cache(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    result = cli(
        stats_cli.main, "model=tiny-llama3", "layer=1", "stats.n_tokens=300", "eval.held_out_keys=8"
    )
    assert result.code == 0, result.err
    assert "layer 1: computed and cached" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_editexp_report_user_errors(tmp_path):
    missing = cli(lambda: sys.exit(report.main([str(tmp_path / "nowhere")])))
    assert missing.code == 2 and "is not a directory" in missing.message


def test_editexp_debug_shows_the_traceback(tmp_path, no_model, monkeypatch):
    monkeypatch.setenv("EDITEXP_DEBUG", "1")
    result = editexp(tmp_path / "run", *TWO_UPDATES, "layer=1.5")
    assert result.code == 1 and "Traceback" in result.err and "ConfigError" in result.err


def test_hydra_verbose_shows_the_traceback(tmp_path, no_model):
    result = editexp(tmp_path / "run", *TWO_UPDATES, "layer=1.5", "hydra.verbose=true")
    assert result.code == 1 and "Traceback" in result.err and "ConfigError" in result.err


@pytest.mark.parametrize("left_behind", ["no output_dir", "another job's output_dir"])
def test_a_python_run_ignores_a_hydra_config_left_in_the_process(tmp_path, cache, left_behind):
    """A Hydra job that failed in this process (``hydra.verbose=true`` leaves its config set)
    or any earlier job must not be taken for this run: the run succeeds and writes no
    ``.hydra/`` files, neither in its own directory nor in the other job's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from editexp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        stale = compose("config", return_hydra_config=True)
    other = tmp_path / "other-job"
    if left_behind != "no output_dir":
        with open_dict(stale):
            stale.hydra.runtime.output_dir = str(other)
    HydraConfig.instance().set_config(stale)
    try:
        record = runner_module.run(compose_config(*TINY, *TWO_UPDATES), tmp_path / "api")
    finally:
        HydraConfig.instance().cfg = None
    assert record.edits_done == 2
    assert not (tmp_path / "api" / ".hydra").exists() and not other.exists()


def test_the_console_script_exits_2_with_one_line(tmp_path):
    """The real entry point, as a shell sees it."""
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "from editexp.runner import main; main()",
            *TINY,
            "seed=abc",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == "editexp: error: seed='abc'; expected an integer"


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
            [sys.executable, "-m", "editexp.runner", *SMOLLM2, f"hydra.run.dir={run_dir}"],
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
