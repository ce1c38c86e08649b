"""Seconds per phase of a run (statistics, keys_values, solve, evaluation), added in one place."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

PHASES = ("statistics", "keys_values", "solve", "evaluation")
INTERRUPTED = "interrupted"  # seconds killed attempts ran after their last checkpoint (heartbeat)


class PhaseTimer:
    """Adds seconds to the phases of ``seconds`` (a run's timing, kept in its checkpoint)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def add(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        self.seconds[phase] += seconds

    def add_all(self, seconds: Mapping[str, float], phases: tuple[str, ...]) -> None:
        """Add ``phases`` of ``seconds`` (e.g. the keys_values and solve of an editor's update)."""
        for phase in phases:
            self.add(phase, seconds[phase])

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)
