"""The run's recorder: books each update into the run's state, logs it to the tracker, and
after every step writes the checkpoint and the rows (facts.jsonl, batches.jsonl)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from editexp.data.counterfact import Fact
from editexp.editing.value_cache import CacheCounts
from editexp.record import BatchRecord
from editexp.run_dir import RunDirectory
from editexp.run_records import PreEdit, batch_record, write_rows
from editexp.run_state import RunState
from editexp.run_steps import Booking
from editexp.tracking import Tracker


def log_update(tracker: Tracker, batch: BatchRecord) -> None:
    tracker.log_update(
        step=batch.batch + 1,
        edits_done=batch.edits_done,
        scored=batch.metrics,
        so_far={key: stats["mean"] for key, stats in batch.edited_so_far.items()},
        update=asdict(batch.update),
    )


@dataclass
class Recorder:
    """Books a run's updates (``value_counts``: the editor's counts of this attempt)."""

    state: RunState
    tracker: Tracker
    directory: RunDirectory
    facts: list[Fact]
    pre: PreEdit
    batch_size: int
    value_counts: CacheCounts
    started: float  # time.perf_counter() when this attempt started
    values_before: dict[str, int] = field(init=False)  # of earlier attempts

    def __post_init__(self) -> None:
        self.values_before = dict(self.state.values)

    def elapsed(self) -> float:
        """Seconds over all attempts so far."""
        return self.state.elapsed(self.started)

    def book(self, booking: Booking) -> None:
        """Book one update: the facts it scored (their scoring now counts), its record line."""
        state = self.state
        state.values = {
            kind: self.values_before[kind] + getattr(self.value_counts, kind)
            for kind in ("computed", "read")
        }
        for result in booking.results:
            state.post[result.case_id] = (booking.index, result)
        batch = batch_record(state, booking, self.batch_size)
        state.batches.append(batch)
        log_update(self.tracker, batch)

    def save(self) -> None:
        """The checkpoint and the rows as they stand (after each step)."""
        self.state.save(self.directory.checkpoint_path, self.elapsed())
        write_rows(self.directory.path, self.facts, self.pre.facts, self.state)

    def relog(self) -> None:
        """Log the updates done by earlier attempts (when no earlier attempt logged them)."""
        if not self.tracker.continues:  # the curve starts at 1
            for batch in self.state.batches:
                log_update(self.tracker, batch)
