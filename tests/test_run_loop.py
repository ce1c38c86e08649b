"""The runner's loop with stand-ins for the steps and the recorder: every step's updates are
booked in order and saved once per step, singular chunks included; the steps of each mode
start where the state stands; debug.stop_after_updates stops after a saved step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from editexp.record import UpdateStats
from editexp.run_state import RunState
from editexp.run_steps import Booking, Steps
from editexp.runner import SimulatedCrash, edit_all


class FakeSteps:
    """Steps of ``per_step`` updates each, ``n_updates`` in all."""

    def __init__(self, n_updates: int, per_step: int) -> None:
        self.settings = SimpleNamespace(n_updates=n_updates)
        self.per_step = per_step

    def starts(self) -> range:
        return range(0, self.settings.n_updates, self.per_step)

    def take(self, first: int) -> list[Booking]:
        last = min(first + self.per_step, self.settings.n_updates)
        return [Booking(index, [], UpdateStats(1.0, 0.0, 1.0)) for index in range(first, last)]


class FakeRecorder:
    def __init__(self) -> None:
        self.state = SimpleNamespace(updates_done=0)
        self.events: list[str] = []

    def book(self, booking: Booking) -> None:
        self.state.updates_done += 1
        self.events.append(f"book {booking.index}")

    def save(self) -> None:
        self.events.append("save")


def test_loop_books_every_update_and_saves_once_per_step():
    recorder = FakeRecorder()
    edit_all(FakeSteps(n_updates=5, per_step=2), recorder)
    assert recorder.events == [
        "book 0", "book 1", "save", "book 2", "book 3", "save", "book 4", "save",
    ]  # fmt: skip


def test_stop_after_updates_raises_after_the_step_is_saved_but_never_after_the_last():
    recorder = FakeRecorder()
    with pytest.raises(SimulatedCrash):
        edit_all(FakeSteps(n_updates=5, per_step=2), recorder, stop_after=3)
    assert recorder.events[-1] == "save" and recorder.state.updates_done == 4
    finished = FakeRecorder()
    edit_all(FakeSteps(n_updates=2, per_step=2), finished, stop_after=2)
    assert finished.state.updates_done == 2


@pytest.mark.parametrize(
    ("mode", "n_edits", "batch_size", "done", "expected"),
    [
        ("singular", 7, 1, 0, [0, 3, 6]),  # chunks of editing.batch_size=3 facts
        ("singular", 7, 1, 3, [3, 6]),
        ("sequential", 6, 2, 1, [1, 2]),  # one update of batch_size facts per step
        ("batch", 4, 4, 0, [0]),
    ],
)
def test_steps_start_where_the_state_stands(mode, n_edits, batch_size, done, expected):
    settings = SimpleNamespace(mode=mode, n_updates=n_edits // batch_size)
    state = RunState("c", "d")
    state.batches = [None] * done
    facts = list(range(n_edits))
    steps = Steps(settings, facts, None, None, state, None, set(), chunk_size=3)
    assert list(steps.starts()) == expected
