"""The run's state in checkpoint.pt: loadable with ``weights_only=True`` and read back equal;
the phase timer."""

from __future__ import annotations

import pytest
import torch

from editexp.editing.linalg import PastKeys
from editexp.evaluation.counterfact_eval import FactScores
from editexp.record import BatchRecord, UpdateStats
from editexp.run_state import RunState
from editexp.timing import PhaseTimer


def a_state() -> RunState:
    keys = PastKeys.empty(3)
    keys.add(torch.arange(6, dtype=torch.float32).reshape(3, 2))
    scores = FactScores(7, {"rewrite": [(0.25, 0.5)]}, ["a text"], 1.5)
    batch = BatchRecord(
        batch=0,
        edits_done=1,
        evaluated_facts=1,
        metrics={"ES": 1.0},
        update=UpdateStats(2.0, None, 3.0),
        timing={"solve": 0.5},
        edited_so_far={"ES": {"mean": 1.0, "std": 0.0, "n": 1}},
    )
    return RunState(
        config_hash="c",
        data_hash="d",
        base={4: (1.0, 2.0)},
        batches=[batch],
        post={7: (0, scores)},
        each_batch={7: FactScores(7, {"rewrite": [(0.25, 0.5)]})},
        deltas={4: torch.ones(2, 3)},
        weights={4: torch.full((2, 3), 2.0)},
        past_keys={4: keys},
        elapsed_before=1.0,
    )


@pytest.mark.parametrize("with_past_keys", [True, False])
def test_checkpoint_loads_weights_only_and_reads_back_equal(tmp_path, with_past_keys):
    state = a_state()
    if not with_past_keys:
        state.past_keys = None
    path = tmp_path / "checkpoint.pt"
    state.save(path, elapsed=5.0)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["updates_done"] == 1 and saved["elapsed"] == 5.0
    read = RunState.from_saved(saved)
    assert read.batches == state.batches
    assert read.post == state.post and read.each_batch == state.each_batch
    assert read.base == state.base and read.timing == state.timing
    assert torch.equal(read.deltas[4], state.deltas[4])
    assert torch.equal(read.weights[4], state.weights[4])
    assert read.elapsed_before == 5.0
    if with_past_keys:
        assert read.past_keys[4].count == 2
        assert torch.equal(read.past_keys[4].gram, state.past_keys[4].gram)
    else:
        assert read.past_keys is None


def test_deltas_are_summed_in_order():
    state = RunState("c", "d")
    state.add_deltas({1: torch.ones(2, 2)})
    state.add_deltas({1: torch.full((2, 2), 2.0), 2: torch.ones(1, 1)})
    assert torch.equal(state.deltas[1], torch.full((2, 2), 3.0))
    assert torch.equal(state.deltas[2], torch.ones(1, 1))


def test_phase_timer_adds_to_its_phase_only():
    timer = PhaseTimer({"statistics": 0.0, "keys_values": 1.0, "solve": 0.0, "evaluation": 0.0})
    timer.add_all({"keys_values": 2.0, "solve": 0.5, "other": 9.0}, ("keys_values", "solve"))
    with timer.phase("evaluation"):
        pass
    assert timer.seconds["keys_values"] == 3.0 and timer.seconds["solve"] == 0.5
    assert timer.seconds["evaluation"] >= 0.0 and timer.seconds["statistics"] == 0.0
    with pytest.raises(KeyError, match="unknown phase"):
        timer.add("training", 1.0)
