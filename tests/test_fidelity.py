"""editexp computes what the paper's code (UME, unified-model-editing at 23d72b5) computes.

- the value objective equals UME's ``compute_z`` loop (:mod:`editexp.editing.plain_values`):
  same loss at step 0, same delta after 5 Adam steps, on tiny-llama3 and on SmolLM2;
- the unedited SmolLM2's per-fact ES/PS/NS and magnitudes on the first 64 CounterFact records
  equal the numbers UME's code computed (``shared/reference/ume-smollm2-pre-edit-64.json``).

docs/fidelity.md lists every point of agreement and the test that pins it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import PROJECT, cached_model, compose_config

from editexp.editing.keys_values import EditRequest, ValueHparams, compute_values
from editexp.editing.plain_values import plain_values
from editexp.editing.prefixes import context_prefixes
from editexp.evaluation.generation_facts import spread_generation_facts
from editexp.runner import run

REFERENCE_DIR = PROJECT.parent / "shared" / "reference"
UME_HPARAMS = ValueHparams(  # UME's Llama files; no early stop, so every step is compared
    v_lr=0.5, v_steps=25, v_weight_decay=1e-3, kl_factor=0.0625, clamp_norm_factor=4.0
)
FACT = EditRequest(3, "The mother tongue of {} is", "Danielle Darrieux", "English")


def _float64(name: str):
    loaded = copy.copy(cached_model(name))
    loaded.model = copy.deepcopy(loaded.model).double()
    return loaded


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def _compare_with_ume(loaded, prefixes, layer: int, rtol: float) -> None:
    first = ValueHparams(**{**UME_HPARAMS.__dict__, "v_steps": 1, "early_stop_loss": -1.0})
    fast = compute_values(loaded, [FACT], prefixes, layer, first, progress=False)
    ume = plain_values(loaded, [FACT], prefixes, layer, first)
    assert fast.steps.item() == ume.steps.item() == 0
    torch.testing.assert_close(fast.losses, ume.losses, rtol=1e-6, atol=0)  # step 0
    assert _relative(fast.outputs, ume.outputs) < 1e-6  # target_init

    five = ValueHparams(**{**UME_HPARAMS.__dict__, "v_steps": 6, "early_stop_loss": -1.0})
    fast = compute_values(loaded, [FACT], prefixes, layer, five, progress=False)
    ume = plain_values(loaded, [FACT], prefixes, layer, five)
    assert fast.steps.item() == ume.steps.item() == 5
    difference = _relative(fast.deltas, ume.deltas)
    assert difference < rtol, f"delta after 5 steps differs by {difference:.2e} (relative)"
    assert ume.deltas.norm() > 0


def test_value_objective_is_umes_compute_z_on_tiny_llama3():
    loaded = _float64("tiny-llama3")
    prefixes = ["", "The weather was nice today. ", "I think that. ", "Because it rained. "]
    _compare_with_ume(loaded, prefixes, layer=1, rtol=1e-5)


@pytest.mark.slow
def test_value_objective_is_umes_compute_z_on_smollm2(smollm2):
    prefixes = context_prefixes(smollm2, count=5, length=10, seed=0)
    assert len(prefixes) == 6 and prefixes[0] == ""
    _compare_with_ume(smollm2, prefixes, layer=1, rtol=1e-5)


# --- GE coverage (item 7) ---------------------------------------------------------------------


def test_generation_facts_spread_over_every_batch_of_a_sequential_run():
    case_ids = list(range(1000, 1000 + 4096))
    chosen = spread_generation_facts(case_ids, batch_size=256, count=100)
    assert len(chosen) == len(set(chosen)) == 100
    assert chosen == sorted(chosen)  # in run order
    per_batch = [sum(1 for c in chosen if (c - 1000) // 256 == b) for b in range(16)]
    assert min(per_batch) >= 6 and max(per_batch) <= 7  # every one of the 16 updates
    # fewer facts than updates: spread evenly over the run, not the first updates
    sparse = spread_generation_facts(list(range(10)), batch_size=1, count=5)
    assert sparse == [1, 3, 5, 7, 9]
    # one batch: spread over it
    assert spread_generation_facts(list(range(8)), batch_size=8, count=2) == [2, 6]


def test_generation_facts_all_none_and_bad_values():
    assert spread_generation_facts([5, 6, 7], 1, "all") == [5, 6, 7]
    assert spread_generation_facts([5, 6, 7], 3, 10) == [5, 6, 7]
    assert spread_generation_facts([5, 6, 7], 1, 0) == []
    for bad in (-1, 1.5, "some", True, None):
        with pytest.raises(ValueError, match="eval.generation_facts"):
            spread_generation_facts([5, 6, 7], 1, bad)


def test_ge_is_measured_in_every_batch_of_a_sequential_run(tmp_path):
    """The runner generates for the spread facts, each after the update that scores it."""
    overrides = [
        "model=tiny-llama3",
        "logger=none",
        "stats.n_tokens=3000",
        "stats.seq_len=64",
        "eval.generation_length=12",
        "eval.held_out_keys=0",
        "editing.prefixes.count=1",
        "editing.prefixes.length=4",
        "model.hparams.memit.v_steps=2",
        "algorithm=memit",
        "mode=sequential",
        "n_edits=6",
        "batch_size=2",
    ]
    run(compose_config(*overrides, "eval.generation_facts=3"), tmp_path / "three")
    rows = [
        json.loads(line) for line in (tmp_path / "three" / "facts.jsonl").read_text().splitlines()
    ]
    with_ge = [row["batch"] for row in rows if "GE" in row["post"]]
    assert with_ge == [0, 1, 2]
    run(compose_config(*overrides, "eval.generation_facts=all"), tmp_path / "all")
    rows = [
        json.loads(line) for line in (tmp_path / "all" / "facts.jsonl").read_text().splitlines()
    ]
    assert all("GE" in row["post"] and "GE" in row["pre"] for row in rows)
