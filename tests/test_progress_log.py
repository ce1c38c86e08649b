"""Progress of a run: one log line per update in runner.log (edits done, elapsed, time left),
an estimate from this attempt's mean time per update, bars only on a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TINY_RUN

from editexp.progress import UpdateProgress, duration, terminal_bar

PROJECT = Path(__file__).resolve().parents[1]


def test_runner_log_holds_one_progress_line_per_update(tmp_path):
    env = {**os.environ, "EDITEXP_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    run_dir = tmp_path / "run"
    args = ["mode=sequential", "n_edits=6", "batch_size=2", "algorithm=memit", "logger=none"]
    done = subprocess.run(
        [sys.executable, "-m", "editexp", *TINY_RUN, *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    log = (run_dir / "runner.log").read_text()
    lines = re.findall(r"update (\d+)/3: (\d+)/6 edits done, \d+ s elapsed, about .* left", log)
    assert lines == [("1", "2"), ("2", "4"), ("3", "6")], log
    assert "sampling" not in done.stderr and "updates" not in done.stderr  # no bars: no tty


def test_time_left_is_the_time_per_update_since_the_last_line_times_the_updates_left():
    progress = UpdateProgress(n_updates=10, n_edits=20, updates_before=4, started=100.0)
    line = progress.line(updates_done=6, edits_done=12, now=130.0)  # 2 updates in 30 s
    assert line == "update 6/10: 12/20 edits done, 30 s elapsed, about 1 min 0 s left"
    assert progress.line(4, 8, now=100.0).endswith("about unknown left")
    assert progress.line(10, 20, now=190.0).endswith("about 0 s left")


def test_time_left_follows_the_latest_updates_not_a_fast_cached_first_one():
    progress = UpdateProgress(n_updates=4, n_edits=8, updates_before=0, started=0.0)
    progress.step(1, 2, now=10.0)  # the first batch's values read from the cache
    line = progress.line(2, 4, now=610.0)  # the second computed its own: 600 s
    assert line.endswith("10 min 10 s elapsed, about 20 min 0 s left")  # the mean: 10 min 10 s
    progress.step(2, 4, now=610.0)
    assert progress.line(3, 6, now=1210.0).endswith("about 10 min 0 s left")


def test_durations_read_as_seconds_minutes_hours():
    assert [duration(s) for s in (0.4, 59, 61, 3600 * 3 + 60 * 20 + 5)] == [
        "0 s",
        "59 s",
        "1 min 1 s",
        "3 h 20 min",
    ]


def test_bars_are_off_when_stderr_is_not_a_terminal(capsys):
    with terminal_bar(5, "sampling", "prompt") as bar:
        bar.update(5)
    assert bar.disable and capsys.readouterr().err == ""
