"""Read an offline W&B run back from its .wandb file (for the tracking and sweep tests)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768  # the .wandb file uses LevelDB's log format: 32 KiB blocks of framed records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[object]:
    """The protobuf records of a .wandb file.

    wandb 0.31 writes the file from Go (wandb-core) and ships no Python reader, only the
    protobuf classes; the framing is a 7-byte header (":W&B", magic, version), then
    LevelDB log records: crc32c (4), length (2, little endian), type (1), payload.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            return
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload if kind == LAST else payload)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_file(wandb_file: Path, wait_s: float = 30.0) -> dict:
    """History rows, final summary, config, artifacts, run metadata and exit code of one
    .wandb file (one attempt at a run).

    wandb 0.31's `run.finish()` can return before wandb-core has written the last records
    of an offline run; read again until the exit record is there or ``wait_s`` passed.
    """
    deadline = time.monotonic() + wait_s
    while True:
        run = _read_wandb_file(wandb_file)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read_wandb_file(wandb_file: Path) -> dict:
    run = {
        "history": [],
        "summary": {},
        "config": {},
        "artifacts": [],
        "exit_code": None,
        "run": None,
    }
    for record in read_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
        elif kind == "run":
            run["run"] = record.run
            for item in record.run.config.update:
                run["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            run["artifacts"].append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "files": {c.path: c.local_path for c in artifact.manifest.contents},
                }
            )
    return run


def read_runs(run_dir: Path) -> list[dict]:
    """Every attempt at the run under ``run_dir`` (a resumed run has several), oldest first."""
    runs = [read_wandb_file(path) for path in run_dir.glob("wandb/offline-run-*/run-*.wandb")]
    return sorted(runs, key=lambda run: run["run"].start_time.ToNanoseconds())


def read_run(run_dir: Path) -> dict:
    """The single offline run under ``run_dir`` (fails when there are several attempts)."""
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return read_wandb_file(wandb_file)
