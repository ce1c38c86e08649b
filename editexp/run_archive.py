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
skips them (the runner checks their config and data hashes as for any finished run). A file
that already exists at the target is left alone when it is the same and refused when it
differs, so a copy never overwrites a result. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editexp.cache import atomic_write
from editexp.errors import UserError, cli_errors
from editexp.run_dir import ATTEMPTS_DIR, SUMMARY_NAME

RUN_FILES = (SUMMARY_NAME, "run.json", "facts.jsonl", "batches.jsonl", "runner.log")
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")
SWEEP_FILES = ("multirun.yaml",)


def records_below(root: Path) -> list[Path]:
    """The files below ``root`` that hold finished runs' results, relative to ``root``."""
    found: set[Path] = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if ATTEMPTS_DIR in relative.parts or not path.is_file() or path.is_symlink():
            continue
        if path.name in SWEEP_FILES:
            found.add(relative)
        elif path.name == SUMMARY_NAME:
            found |= {relative.parent / name for name in RUN_FILES}
            hydra = _hydra_dirs(path.parent, root)
            found |= {folder / name for folder in hydra for name in HYDRA_FILES}
    return sorted(item for item in found if (root / item).is_file())


def _hydra_dirs(run_dir: Path, root: Path) -> list[Path]:
    """The ``.hydra`` folder of the grid point holding ``run_dir`` (``run_dir`` itself or
    the nearest ancestor up to ``root`` that has one), relative to ``root``."""
    directory = run_dir
    while not (directory / ".hydra").is_dir():
        if directory == root:
            return []
        directory = directory.parent
    return [(directory / ".hydra").relative_to(root)]


def copy_records(source: Path, target: Path) -> tuple[int, int]:
    """Copy the finished runs' records below ``source`` to the same places below ``target``.
    Returns (files written, files already there and the same); a file at the target with
    other contents is refused before anything is written."""
    if not source.is_dir():
        raise UserError(f"run archive: {source} is not a directory (expected a sweep or study dir)")
    files = records_below(source)
    conflicts = [
        item
        for item in files
        if (target / item).exists() and (target / item).read_bytes() != (source / item).read_bytes()
    ]
    if conflicts:
        raise UserError(
            f"run archive: {target / conflicts[0]} exists with other contents than "
            f"{source / conflicts[0]} ({len(conflicts)} such files); nothing was copied: "
            "move the target's run aside or copy into an empty directory"
        )
    written = 0
    for item in files:
        if not (target / item).exists():
            data = (source / item).read_bytes()
            atomic_write(target / item, lambda tmp, data=data: tmp.write_bytes(data))
            written += 1
    return written, len(files) - written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m editexp.run_archive", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", type=Path, help="a sweep or study directory (or an archive)")
    parser.add_argument("target", type=Path, help="where the records go, same layout")
    args = parser.parse_args(argv)
    with cli_errors("run_archive"):
        written, same = copy_records(args.source, args.target)
        runs = sum(1 for item in records_below(args.source) if item.name == SUMMARY_NAME)
        print(
            f"{runs} finished runs in {args.source}: {written} files copied to {args.target}, "
            f"{same} already there"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
