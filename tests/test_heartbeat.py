"""A killed attempt's time after its last checkpoint counts in the run's timing: the heartbeat
(``attempt.json``) is written while an attempt runs, and a resumed run adds what it holds
beyond the checkpoint as ``interrupted``."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import TINY_RUN, compose_config

from editexp.heartbeat import Heartbeat, read_heartbeat
from editexp.run_state import RunState
from editexp.runner import SimulatedCrash, run

TWO_UPDATES = [*TINY_RUN, "logger=none", "mode=sequential", "n_edits=4", "batch_size=2"]
TWO_UPDATES += ["algorithm=memit"]


class Clock:
    """elapsed() for a heartbeat: 10, 20, 30, ... on each call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 10.0 * self.calls


def test_heartbeat_beats_while_running_once_more_on_an_error_and_is_removed_on_success(tmp_path):
    path = tmp_path / "attempt.json"
    clock = Clock()
    with pytest.raises(RuntimeError), Heartbeat(path, clock, interval=0.01):
        assert read_heartbeat(path) == 10.0  # the first beat, before the block runs
        deadline = time.monotonic() + 5
        while clock.calls < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("killed")
    assert clock.calls >= 4  # started, beat at least twice, and once more on the way out
    assert read_heartbeat(path) == 10.0 * clock.calls
    with Heartbeat(path, Clock(), interval=0.01):
        pass
    assert not path.exists()


def test_a_damaged_or_missing_heartbeat_counts_nothing(tmp_path, caplog):
    path = tmp_path / "attempt.json"
    assert read_heartbeat(path) is None
    path.write_text("{")
    assert read_heartbeat(path) is None
    assert "attempt.json" in caplog.text


def test_state_counts_only_what_the_heartbeat_holds_beyond_the_checkpoint():
    state = RunState("c", "d", elapsed_before=100.0)
    state.timing["keys_values"] = 60.0
    for heartbeat in (None, 90.0, 100.0):  # none, or written before the checkpoint
        state.count_interrupted(heartbeat)
        assert state.elapsed_before == 100.0 and state.timing["interrupted"] == 0.0
    state.count_interrupted(130.0)
    assert state.elapsed_before == 130.0 and state.timing["interrupted"] == 30.0


def killed_after_one_update(run_dir) -> float:
    """Run TWO_UPDATES into ``run_dir`` until it is killed after update 1; the checkpoint's
    seconds."""
    with pytest.raises(SimulatedCrash):
        run(compose_config(*TWO_UPDATES, "+debug.stop_after_updates=1"), run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert read_heartbeat(run_dir / "attempt.json") >= checkpoint["elapsed"]
    return checkpoint["elapsed"]


def test_resumed_run_counts_what_the_killed_attempt_ran_after_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    saved = killed_after_one_update(run_dir)
    # as if the attempt had computed values for 100 s more before it was killed
    (run_dir / "attempt.json").write_text(json.dumps({"elapsed": saved + 100.0}))
    timing = run(compose_config(*TWO_UPDATES), run_dir).timing
    assert timing["interrupted"] == pytest.approx(100.0)
    phases = sum(timing[p] for p in ("statistics", "keys_values", "solve", "evaluation"))
    assert timing["total"] >= saved + 100.0 and timing["total"] >= phases + 100.0
    assert not (run_dir / "attempt.json").exists()  # finished: nothing left to count


def test_force_moves_the_heartbeat_aside_with_the_attempt_it_timed(tmp_path):
    run_dir = tmp_path / "run"
    saved = killed_after_one_update(run_dir)
    (run_dir / "attempt.json").write_text(json.dumps({"elapsed": saved + 100.0}))
    timing = run(compose_config(*TWO_UPDATES, "force=true"), run_dir).timing
    assert timing["interrupted"] == 0.0
    assert timing["total"] < saved + 100.0
