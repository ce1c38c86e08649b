"""What a sweep cost: seconds per phase per run and CPU- or GPU-hours in all (results.md's
"Cost" section, written by ``editexp-report``).

A run's seconds are those it spent itself, over all its attempts: work it read from a cache
(statistics, values another grid point computed) costs it nothing, so summing a sweep's runs
gives what the sweep cost, shared work counted once. CPU-hours are a CPU run's seconds times
the torch threads it ran with (``threads`` in summary.json); a GPU run counts GPU-hours.
Summaries written before ``device``/``threads`` were recorded count as CPU runs of unknown
threads: their hours are shown as wall time only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editexp.record import RunRecord
from editexp.timing import INTERRUPTED, PHASES

COLUMNS = (*PHASES, INTERRUPTED, "total")


@dataclass(frozen=True)
class Cost:
    """Hours of wall time, of CPU (seconds x threads), and of GPU."""

    wall_hours: float
    cpu_hours: float | None  # None: some CPU run did not record its threads
    gpu_hours: float

    @classmethod
    def of(cls, records: Sequence[RunRecord]) -> Cost:
        wall = cpu = gpu = 0.0
        threads_known = True
        for record in records:
            hours = record.timing.get("total", 0.0) / 3600
            wall += hours
            if record.device is not None and record.device.startswith("cuda"):
                gpu += hours
            elif record.threads is None:
                threads_known = False
            else:
                cpu += hours * record.threads
        return cls(wall, cpu if threads_known else None, gpu)

    def line(self, n_runs: int) -> str:
        parts = [f"{n_runs} run(s), {self.wall_hours:.2f} h of wall time"]
        if self.cpu_hours is None:
            parts.append("CPU-hours unknown (some summaries do not record their threads)")
        elif self.cpu_hours:
            parts.append(f"{self.cpu_hours:.2f} CPU-hours")
        if self.gpu_hours:
            parts.append(f"{self.gpu_hours:.2f} GPU-hours")
        return ", ".join(parts) + "."


def cost_rows(records: Sequence[RunRecord], names: Sequence[str]) -> list[list[str]]:
    """One row per run (``names``: how the report calls each): where it ran, its seconds per
    phase and in total, and the facts whose values it computed / read from the cache."""
    rows = []
    for name, record in zip(names, records, strict=True):
        seconds = [f"{record.timing.get(phase, 0.0):.1f}" for phase in COLUMNS]
        where = record.device or "?"
        threads = "-" if record.threads is None else str(record.threads)
        values = f"{record.values.get('computed', 0)} / {record.values.get('read', 0)}"
        rows.append([name, where, threads, *seconds, values])
    return rows


COST_HEADER = ["Run", "Device", "Threads", *(f"{phase} (s)" for phase in COLUMNS), "Values"]
COST_NOTE = (
    "Seconds each run spent itself, over all its attempts; what it read from a cache "
    "(statistics, the values another grid point computed) is counted where it was computed. "
    "interrupted: what killed attempts ran after their last checkpoint (work redone, or "
    "read back from the value cache, on resume; included in total). "
    "Values: facts whose values the run computed / read from the sweep's value cache. "
    "CPU-hours: seconds x torch threads.\n"
)
