"""Copy a sweep's finished runs, their records only, to another directory and back.

A study outlives the machine it runs on: a cluster's scratch disk is wiped, a session moves
to a fresh machine. What a finished run's results are made of is small text: ``summary.json``,
``facts.jsonl``, ``batches.jsonl``, ``run.json``, ``runner.log`` and the Hydra config of its
grid point (``.hydra/*.yaml``), and the sweep's ``multirun.yaml``. This copies exactly those,
for runs with a ``summary.json`` (never earlier attempts, unfinished runs, checkpoints,
``deltas.pt`` or W&B files), keeping the layout below the root::

    python -m editexp.run_archive multirun/paper_scale docs/study-smollm2/runs   # save
    python -m editexp.run_archive docs/study-smollm2/runs multirun/paper_scale   # restore

Restored runs are what they were: ``editexp-report`` reads them, and the same sweep command
skips them (the runner checks their config and data hashes as for any finished run).

- **A run is copied whole or not at all**: only where the target has no ``summary.json`` for
  it, with ``summary.json`` written last, so a copy that was killed leaves no summary and the
  next copy does the run again. Every file is written atomically.
- **A result is never overwritten**: where the target has the run's summary it must be the same
  (else nothing is copied and the run is named); the run's other files there are left as they
  are (a skipped rerun appends to ``runner.log`` and rewrites ``.hydra/``).
- **A sweep's ``multirun.yaml``** (its grid, which a later command may extend) is copied
  wherever it differs, for sweeps with at least one finished run: the source's is the newer
  one (restore before a study runs, save after).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from editexp.cache import atomic_write
from editexp.errors import UserError, cli_errors
from editexp.run_dir import ATTEMPTS_DIR, SUMMARY_NAME
from editexp.sweep_runs import job_dir_of

RUN_FILES = ("run.json", "facts.jsonl", "batches.jsonl", "runner.log")  # and the summary, last
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")
SWEEP_FILE = "multirun.yaml"


@dataclass(frozen=True)
class Records:
    """What a copy reads below a root (paths relative to it)."""

    runs: list[Path]  # directories holding a finished run's summary.json
    sweeps: list[Path]  # the multirun.yaml files of sweeps with at least one finished run

    @classmethod
    def below(cls, root: Path) -> Records:
        runs, sweeps = [], []
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if ATTEMPTS_DIR in relative.parts or path.is_symlink() or not path.is_file():
                continue
            if path.name == SUMMARY_NAME:
                runs.append(relative.parent)
            elif path.name == SWEEP_FILE:
                sweeps.append(relative)
        finished = [sweep for sweep in sweeps if any(sweep.parent in run.parents for run in runs)]
        return cls(runs, finished)


def run_files(root: Path, run: Path) -> list[Path]:
    """A finished run's files below ``root`` (relative to it), its summary last: the records
    beside the summary and the ``.hydra`` config of its grid point (the run's directory or the
    nearest ancestor up to ``root`` that has one)."""
    files = [run / name for name in RUN_FILES]
    job_dir = job_dir_of(root / run, root)
    if job_dir is not None:
        hydra = (job_dir / ".hydra").relative_to(root)
        files += [hydra / name for name in HYDRA_FILES]
    return [item for item in files if (root / item).is_file()] + [run / SUMMARY_NAME]


def copy_records(source: Path, target: Path) -> tuple[int, int]:
    """Copy the finished runs below ``source`` that ``target`` lacks, to the same places below
    it, and the sweeps' grids. Returns (runs copied, runs already there)."""
    if not source.is_dir():
        raise UserError(f"run archive: {source} is not a directory (expected a sweep or study dir)")
    records = Records.below(source)
    there = [run for run in records.runs if (target / run / SUMMARY_NAME).exists()]
    summary = lambda root, run: _read(root / run / SUMMARY_NAME)  # noqa: E731
    differ = [run for run in there if summary(target, run) != summary(source, run)]
    if differ:
        raise UserError(
            f"run archive: {target / differ[0]} holds another result than {source / differ[0]} "
            f"(its summary.json differs; {len(differ)} such runs); nothing was copied: move the "
            "target's run aside or copy into an empty directory"
        )
    for sweep in records.sweeps:
        if _read(target / sweep) != _read(source / sweep):
            _copy(source / sweep, target / sweep)
    for run in records.runs:
        if run not in there:
            for item in run_files(source, run):
                _copy(source / item, target / item)
    return len(records.runs) - len(there), len(there)


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _copy(source: Path, target: Path) -> None:
    data = source.read_bytes()
    atomic_write(target, lambda tmp: tmp.write_bytes(data))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m editexp.run_archive", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", type=Path, help="a sweep or study directory (or an archive)")
    parser.add_argument("target", type=Path, help="where the records go, same layout")
    args = parser.parse_args(argv)
    with cli_errors("run_archive"):
        copied, there = copy_records(args.source, args.target)
        print(
            f"{args.source} -> {args.target}: {copied} finished runs copied, {there} already there"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
