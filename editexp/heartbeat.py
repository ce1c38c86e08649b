"""``attempt.json``: how long a run has run, over all its attempts, written every minute while
an attempt runs, so that a killed attempt's time after its last checkpoint still counts.

A checkpoint holds the seconds spent up to its update. An attempt killed between two updates
(a SLURM time limit, a preempted node, a session's end) has spent more: its values are read
back from the value cache on resume, and would otherwise cost the run nothing. On resume the
runner adds what the last heartbeat holds beyond the checkpoint to the run's timing as
``interrupted`` (summary.json; the report's cost table), at most one ``interval`` short.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from editexp.cache import atomic_write_json

log = logging.getLogger("editexp")

HEARTBEAT_SECONDS = 60.0


class Heartbeat:
    """While the ``with`` block runs, a daemon thread writes ``{"elapsed": elapsed()}`` to
    ``path`` every ``interval`` seconds, and once more on the way out; a block that ends
    without an exception removes the file (its run is finished: nothing was lost)."""

    def __init__(
        self, path: Path, elapsed: Callable[[], float], interval: float = HEARTBEAT_SECONDS
    ) -> None:
        self.path, self.elapsed, self.interval = path, elapsed, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        if kind is None:
            self.path.unlink(missing_ok=True)
        else:
            self.beat()

    def beat(self) -> None:
        """Write the seconds so far (a heartbeat that cannot be written is skipped)."""
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, {"elapsed": self.elapsed()})

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


def read_heartbeat(path: Path) -> float | None:
    """The seconds the last heartbeat at ``path`` holds; None without one (or a damaged one:
    it only counts time, so a warning, not an error)."""
    if not path.is_file():
        return None
    try:
        elapsed = float(json.loads(path.read_text())["elapsed"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring %s (%s): time lost to a killed attempt not counted", path, error)
        return None
    return elapsed
