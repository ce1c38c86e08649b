"""Golden runs: the summary, per-update rows and per-fact rows of a tiny-llama3 batch run and a
sequential run, pinned so that refactoring the runner cannot change what it computes.

Everything is compared except timings, the run directory, the config and data hashes and how
many values came from the sweep's value cache (that depends on what ran before). After a change
that is meant to change the numbers (a corrected objective), regenerate with
``EDITEXP_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import compose_config

from editexp.runner import run

GOLDEN_DIR = Path(__file__).parent / "golden"
FAST = [
    "model=tiny-llama3",
    "logger=none",
    "stats.n_tokens=3000",
    "stats.seq_len=64",
    "eval.generation_facts=2",
    "eval.generation_length=20",
    "eval.held_out_keys=32",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.memit.v_steps=4",
    "model.hparams.emmet.v_steps=4",
]
RUNS = {
    "batch-memit": ["algorithm=memit", "mode=batch", "n_edits=4"],
    "sequential-emmet": [
        "algorithm=emmet",
        "lambda=0.01",
        "mode=sequential",
        "n_edits=6",
        "batch_size=2",
        "eval.schedule=every_k",
        "eval.every_k=2",
    ],
}


def _without_timing(row: dict) -> dict:
    """Without timings and what identifies the run or depends on what ran before."""
    left_out = ("timing", "run_dir", "values", "config_hash", "data_hash", "device", "threads")
    return {key: value for key, value in row.items() if key not in left_out}


def outcome(run_dir: Path, summary: dict) -> dict:
    """What a run computed: its summary, batches.jsonl and facts.jsonl, timings left out."""

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]

    return {
        "summary": _without_timing(summary),
        "batches": [_without_timing(row) for row in rows("batches.jsonl")],
        "facts": rows("facts.jsonl"),
    }


def assert_same(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-10), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_matches_golden(tmp_path, name):
    summary = run(compose_config(*FAST, *RUNS[name]), tmp_path / name).to_json()
    actual = outcome(tmp_path / name, summary)
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("EDITEXP_REGEN_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert_same(actual, json.loads(path.read_text()), name)
