"""Running the console scripts as a user does: in this process (through Hydra, with their exit
status, stdout and stderr), or ``editexp -m`` as a subprocess; and reading what a user reads:
the one error line, JSONL rows, the job directories of a sweep."""

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
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import editexp.cli as editexp_cli

DATA_DIR = Path(os.environ["EDITEXP_DATA_DIR"])
COUNTERFACT = DATA_DIR / "counterfact" / "counterfact.json"
# A whole run on the tiny Llama-3 in about a second: no GE, 2 value steps, small statistics.
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
# Two updates: the history of a run (and its W&B curve) has two points.
TWO_UPDATES = ["mode=sequential", "n_edits=2", "batch_size=1"]


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
    """``editexp`` on the tiny run (:data:`TINY`) in ``run_dir``."""
    return cli(editexp_cli.main, *TINY, f"hydra.run.dir={run_dir}", *overrides)


def editexp_here(*overrides: str) -> Result:
    """``editexp`` on one fact of the tiny run, in the working directory (Hydra's default
    ``outputs/...`` run directory below it)."""
    return cli(editexp_cli.main, *TINY, "n_edits=1", *overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_counterfact(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def records(n: int = 40) -> list[dict]:
    """The first ``n`` records of the shared CounterFact file."""
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


# --------------------------------------------------------------------------- multiruns

# The console script next to this Python (a venv's), as a user starts it.
EDITEXP = shutil.which("editexp", path=str(Path(sys.executable).parent)) or "editexp"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def sweep_environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / "wandb-home" / var.lower())
    return env


def cancel_slurm_jobs(sweep_dir: Path) -> None:
    """scancel the jobs this sweep submitted (submitit names its folders after the job ids)."""
    ids = {m.group(1) for p in sweep_dir.glob(".submitit/*") if (m := re.match(r"(\d+)", p.name))}
    for job_id in sorted(ids):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)


def run_command(args: list[str], tmp_path: Path, timeout: float, sweep_dir: Path | None = None):
    """Run a command in its own process group; on timeout stop the group (and its SLURM jobs)."""
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=sweep_environment(tmp_path),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate()
        if sweep_dir is not None:
            cancel_slurm_jobs(sweep_dir)
        pytest.fail(f"{' '.join(args[:3])} ... did not finish in {timeout} s:\n{tail(output)}")
    return subprocess.CompletedProcess(args, process.returncode, output)


def multirun(tmp_path: Path, *overrides: str, timeout: float = 600):
    sweep_dir = tmp_path / "sweep"
    args = [EDITEXP, "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return run_command(args, tmp_path, timeout, sweep_dir), sweep_dir


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    """Each job directory by the value of its swept override, e.g. {"1": <sweep>/0}."""
    jobs = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        jobs[tuple(OmegaConf.load(overrides_file))] = overrides_file.parents[1]
    return jobs
