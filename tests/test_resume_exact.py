"""A sequential every_k run, killed and resumed, and with a cold or a warm pre-edit cache,
writes the same facts.jsonl and batches.jsonl bit for bit as one uninterrupted run, with the
default layer states (post-edit scoring starts at the edited layer from stored states)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_RUN, compose_config

from editexp.runner import SimulatedCrash, run

EVERY_K = [
    *TINY_RUN,
    "logger=none",
    "algorithm=memit",
    "mode=sequential",
    "n_edits=6",
    "batch_size=2",
    "eval.schedule=every_k",
    "eval.every_k=2",
    "eval.generation_facts=2",
]


def without_timing(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "timing"} for row in rows]


def test_killed_every_k_run_and_cold_or_warm_cache_equal_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_config(*EVERY_K), straight)  # cold: pre-edit scores and states computed
    with pytest.raises(SimulatedCrash):  # warm: pre-edit scores read, states recorded
        run(compose_config(*EVERY_K, "+debug.stop_after_updates=1"), resumed)
    shutil.rmtree(cache / "pre_edit")  # cold again, in the middle of the run
    with pytest.raises(SimulatedCrash):
        run(compose_config(*EVERY_K, "+debug.stop_after_updates=2"), resumed)
    run(compose_config(*EVERY_K), resumed)  # warm
    assert (straight / "facts.jsonl").read_bytes() == (resumed / "facts.jsonl").read_bytes()
    assert without_timing(straight / "batches.jsonl") == without_timing(resumed / "batches.jsonl")
    a, b = torch.load(straight / "deltas.pt"), torch.load(resumed / "deltas.pt")
    assert all(torch.equal(a["deltas"][layer], b["deltas"][layer]) for layer in a["deltas"])


def test_warm_cache_run_equals_cold_one_in_each_schedule(tmp_path, monkeypatch):
    """each_batch scores every fact once: with a warm cache the states are recorded all the
    same, so the post-edit scores do not depend on what ran before."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    args = [*EVERY_K, "eval.schedule=each_batch", "n_edits=8", "batch_size=4", "layer=2"]
    run(compose_config(*args), tmp_path / "cold")
    run(compose_config(*args), tmp_path / "warm")
    cold, warm = (tmp_path / name / "facts.jsonl" for name in ("cold", "warm"))
    assert cold.read_bytes() == warm.read_bytes()
