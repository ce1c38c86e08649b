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
    time left is the time per update since the previous line times the updates left: the
    latest updates, not the attempt's mean, since a run's first updates often read their
    values from the cache (a sweep's shared first batch, or a resumed attempt's) and take a
    fraction of the time the later ones do."""

    n_updates: int
    n_edits: int
    updates_before: int  # done by earlier attempts
    started: float = field(default_factory=time.perf_counter)
    bar: tqdm = field(init=False)
    previous: tuple[float, int] = field(init=False)  # (time, updates done) at the last line

    def __post_init__(self) -> None:
        self.bar = terminal_bar(self.n_updates, "updates", "update", self.updates_before)
        self.previous = (self.started, self.updates_before)

    def line(self, updates_done: int, edits_done: int, now: float) -> str:
        """The progress line after ``updates_done`` updates (``edits_done`` edits) at ``now``."""
        elapsed = now - self.started
        since, updates_then = self.previous
        done_since = updates_done - updates_then
        left = self.n_updates - updates_done
        per_update = (now - since) / done_since if done_since > 0 else None
        estimate = "unknown" if per_update is None else duration(per_update * left)
        return (
            f"update {updates_done}/{self.n_updates}: {edits_done}/{self.n_edits} edits done, "
            f"{duration(elapsed)} elapsed, about {estimate} left"
        )

    def step(self, updates_done: int, edits_done: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        log.info(self.line(updates_done, edits_done, now))
        self.previous = (now, updates_done)
        self.bar.update(updates_done - self.bar.n)

    def __enter__(self) -> UpdateProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()
