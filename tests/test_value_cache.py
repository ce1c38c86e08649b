"""The sweep's value/key cache: same vectors as computing them, computed once, keyed by all
that changes them, safe across processes."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from editexp.config import ValueHparams
from editexp.editing.keys import EditRequest, compute_keys
from editexp.editing.value_cache import (
    CacheCounts,
    VectorCache,
    cached_keys,
    cached_values,
    code_hash,
    key_cache,
    value_cache,
    value_fact_key,
)
from editexp.editing.values import compute_values

pytestmark = pytest.mark.usefixtures("cache_dir")  # every test with a cache of its own

REQUESTS = [
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest(2, "{}, which is located in", "Eiffel Tower", "Rome, Italy"),
    EditRequest(3, "{} plays the", "Miles Davis", "electric guitar"),
]
PREFIXES = ["", "The weather was nice today. "]
HPARAMS = ValueHparams(v_lr=0.5, v_steps=4)
LAYER = 1


class Counting:
    """compute_values on the tiny model, counting the facts it is asked for."""

    def __init__(self, loaded, prefixes=PREFIXES, layer=LAYER, hparams=HPARAMS):
        self.loaded, self.prefixes, self.layer, self.hparams = loaded, prefixes, layer, hparams
        self.asked: list[int] = []

    def __call__(self, requests):
        self.asked.extend(request.case_id for request in requests)
        return compute_values(
            self.loaded, requests, self.prefixes, self.layer, self.hparams, progress=False
        )


def values_via_cache(loaded, requests, compute, prefixes=PREFIXES, layer=LAYER, hparams=HPARAMS):
    counts = CacheCounts()
    cache = value_cache(loaded, layer, prefixes, hparams)
    values = cached_values(cache, requests, compute, 2, counts)
    return values, counts


def test_cached_values_equal_computed_values_and_are_computed_once(tiny_llama3):
    direct = compute_values(
        tiny_llama3, REQUESTS, PREFIXES, LAYER, HPARAMS, batch_size=2, progress=False
    )
    compute = Counting(tiny_llama3)
    first, counts = values_via_cache(tiny_llama3, REQUESTS, compute)
    assert (counts.computed, counts.read) == (3, 0) and sorted(compute.asked) == [1, 2, 3]
    for name in ("deltas", "outputs", "losses", "steps"):
        torch.testing.assert_close(getattr(first, name), getattr(direct, name))
    second, counts = values_via_cache(tiny_llama3, REQUESTS, compute)
    assert (counts.computed, counts.read) == (0, 3) and len(compute.asked) == 3
    for name in ("deltas", "outputs", "losses", "steps"):
        assert torch.equal(getattr(second, name), getattr(first, name))


def test_a_larger_batch_computes_only_the_new_facts(tiny_llama3):
    compute = Counting(tiny_llama3)
    values_via_cache(tiny_llama3, REQUESTS[:2], compute)
    values, counts = values_via_cache(tiny_llama3, [REQUESTS[2], REQUESTS[0], REQUESTS[0]], compute)
    assert compute.asked == [1, 2, 3]
    assert (counts.computed, counts.read) == (1, 2)
    assert torch.equal(values.deltas[1], values.deltas[2])


@pytest.mark.parametrize("change", ["hparams", "layer", "prefixes", "target", "model", "code"])
def test_everything_that_changes_the_values_changes_the_key(tiny_llama3, change, monkeypatch):
    compute = Counting(tiny_llama3)
    values_via_cache(tiny_llama3, REQUESTS[:1], compute)
    loaded, requests, kwargs = tiny_llama3, REQUESTS[:1], {}
    if change == "hparams":
        kwargs["hparams"] = dataclasses.replace(HPARAMS, v_lr=0.1)
    elif change == "layer":
        kwargs["layer"] = 2
    elif change == "prefixes":
        kwargs["prefixes"] = ["", "Something else. "]
    elif change == "target":
        requests = [dataclasses.replace(REQUESTS[0], target_new="German")]
    elif change == "model":
        loaded = copy.copy(tiny_llama3)
        loaded.weights_identity = tiny_llama3.weights_identity + "-other-weights"
    elif change == "code":
        monkeypatch.setattr("editexp.editing.value_cache._CODE_HASH", ["another-version"])
    other = Counting(loaded, **kwargs)
    _, counts = values_via_cache(loaded, requests, other, **kwargs)
    assert counts.computed == 1 and counts.read == 0
    # and the unchanged setting still reads
    _, counts = values_via_cache(tiny_llama3, REQUESTS[:1], compute)
    assert (counts.computed, counts.read) == (0, 1)


def test_settings_are_written_next_to_the_entries(tiny_llama3, cache_dir):
    values_via_cache(tiny_llama3, REQUESTS[:1], Counting(tiny_llama3))
    cache = value_cache(tiny_llama3, LAYER, PREFIXES, HPARAMS)
    assert cache.directory.is_relative_to(cache_dir / "values" / tiny_llama3.spec.name)
    assert cache.entry_path(value_fact_key(REQUESTS[0])).is_file()
    settings = (cache.directory / "settings.json").read_text()
    for part in (tiny_llama3.identity, code_hash(), '"v_lr": 0.5', "The weather was nice today."):
        assert part in settings


@pytest.mark.parametrize("damage", ["bytes", "names", "shape", "nan"])
def test_a_bad_entry_is_recomputed(tiny_llama3, damage):
    compute = Counting(tiny_llama3)
    first, _ = values_via_cache(tiny_llama3, REQUESTS[:1], compute)
    path = value_cache(tiny_llama3, LAYER, PREFIXES, HPARAMS).entry_path(
        value_fact_key(REQUESTS[0])
    )
    entry = torch.load(path)
    if damage == "bytes":
        path.write_bytes(b"not a torch file")
    elif damage == "names":
        torch.save({"deltas": entry["deltas"]}, path)
    elif damage == "shape":
        torch.save({**entry, "deltas": entry["deltas"][:-1]}, path)
    else:
        torch.save({**entry, "outputs": entry["outputs"] * float("nan")}, path)
    again, counts = values_via_cache(tiny_llama3, REQUESTS[:1], compute)
    assert counts.computed == 1 and torch.equal(again.deltas, first.deltas)
    assert torch.equal(torch.load(path)["outputs"], entry["outputs"])  # healed


def test_a_complete_cache_is_read_without_the_lock(tiny_llama3):
    compute = Counting(tiny_llama3)
    values_via_cache(tiny_llama3, REQUESTS, compute)
    directory = value_cache(tiny_llama3, LAYER, PREFIXES, HPARAMS).directory
    lock = Path(f"{directory}.lock")
    lock.unlink()
    _, counts = values_via_cache(tiny_llama3, REQUESTS, compute)
    assert counts.read == 3 and not lock.exists()


def test_cached_keys_equal_computed_keys(tiny_llama3):
    direct = compute_keys(tiny_llama3, REQUESTS, PREFIXES, [LAYER])[LAYER]

    def compute(requests):
        return compute_keys(tiny_llama3, requests, PREFIXES, [LAYER])[LAYER]

    counts = CacheCounts()
    keys = cached_keys(key_cache(tiny_llama3, LAYER, PREFIXES), REQUESTS, compute, 2, counts)
    torch.testing.assert_close(keys, direct)
    # keys depend on prompt and subject only: another target reads the same key
    other = [dataclasses.replace(REQUESTS[0], case_id=9, target_new="German")]
    again = cached_keys(key_cache(tiny_llama3, LAYER, PREFIXES), other, compute, 2, counts)
    assert (counts.computed, counts.read) == (3, 1)
    assert torch.equal(again[:, 0], keys[:, 0])


def _worker(directory: str, log: str, keys: list[str]) -> None:
    def compute(indices):
        with open(log, "a") as handle:
            handle.write("".join(f"{keys[i]}\n" for i in indices))
        time.sleep(0.3)  # long enough for the other process to want the same chunk
        return [{"v": torch.full((3,), float(len(keys[i])))} for i in indices]

    cache = VectorCache(Path(directory), {"test": True}, {"v": (3,)})
    entries = cache.get_or_compute(keys, compute, 2, CacheCounts())
    assert [float(e["v"][0]) for e in entries] == [float(len(k)) for k in keys]


def test_two_processes_compute_each_fact_once(tmp_path):
    keys = ["a", "bb", "ccc", "dddd", "eeeee"]
    log = tmp_path / "computed.log"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker, args=(str(tmp_path / "c"), str(log), keys))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert sorted(log.read_text().split()) == sorted(keys)
    assert not list((tmp_path / "c").glob("*.tmp"))
