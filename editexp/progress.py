"""Progress of long loops: a log line per update of a run (edits done, elapsed, estimated time
left; under Hydra it reaches ``<run dir>/runner.log``), and tqdm bars shown only on a terminal
so that logs and captured output stay clean."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

log = logging.getLogger("editexp")


def on_terminal() -> bool:
    """Whether stderr (where tqdm draws) is a terminal."""
    return sys.stderr.isatty()


def terminal_bar(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr, disabled unless stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not on_terminal())


def duration(seconds: float) -> str:
    """``42 s``, ``12 min 5 s``, ``3 h 20 min``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass
class UpdateProgress:
    """Logs each step of a run's update loop and moves its terminal bar. The estimate of the
    time left is this attempt's mean time per update times the updates left."""

    n_updates: int
    n_edits: int
    updates_before: int  # done by earlier attempts
    started: float = field(default_factory=time.perf_counter)
    bar: tqdm = field(init=False)

    def __post_init__(self) -> None:
        self.bar = terminal_bar(self.n_updates, "updates", "update", self.updates_before)

    def line(self, updates_done: int, edits_done: int, now: float | None = None) -> str:
        """The progress line after ``updates_done`` updates (``edits_done`` edits)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        done_now = updates_done - self.updates_before
        left = self.n_updates - updates_done
        estimate = duration(elapsed / done_now * left) if done_now > 0 else "unknown"
        return (
            f"update {updates_done}/{self.n_updates}: {edits_done}/{self.n_edits} edits done, "
            f"{duration(elapsed)} elapsed, about {estimate} left"
        )

    def step(self, updates_done: int, edits_done: int) -> None:
        log.info(self.line(updates_done, edits_done))
        self.bar.update(updates_done - self.bar.n)

    def __enter__(self) -> UpdateProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()
