"""Passes that start at layer L from stored states equal full passes, and skip layers 0..L-1."""

from __future__ import annotations

import pytest
import torch
from conftest import max_difference
from transformers import DynamicCache

from editexp.evaluation.scoring import (
    LayerStates,
    ScoringShortcuts,
    encode_continuations,
    record_layer_states,
    score_continuations,
)
from editexp.layer_skip import StopForward, capture_layer_input, forward_from_layer
from editexp.row_edits import PromptEdits, RankOneEdits, RowEdits

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Autonomous University of Madrid, which is located in",
    "Danielle Darrieux's mother tongue is",
]
TARGETS = [
    ["Paris", "Berlin"],
    ["there", "Xylophone orchestra of the north"],
    ["the Kingdom of Sweden", "Spain"],
    ["English", "French", "Old Church Slavonic"],
]


def layers_of(loaded):
    return loaded.model.get_submodule(loaded.spec.layers_module)


def test_forward_from_layer_equals_the_full_forward(tiny):
    """On a two-pass input (a cached prompt, then more tokens), as scoring and values use it."""
    layers, base = layers_of(tiny), tiny.model.base_model
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        full = base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        for layer in range(len(layers)):
            with capture_layer_input(layers, layer) as captured:
                base(input_ids=ids, attention_mask=mask, position_ids=positions)
            entering = captured[0]
            cache = DynamicCache(config=tiny.model.config)
            head = forward_from_layer(
                base,
                layers,
                layer,
                entering[:, :4],
                ids[:, :4],
                mask[:, :4],
                positions[:, :4],
                cache,
            ).last_hidden_state
            tail = forward_from_layer(
                base,
                layers,
                layer,
                entering[:, 4:],
                ids[:, 4:],
                mask,
                positions[:, 4:],
                cache,
            ).last_hidden_state
            torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)


def test_stop_ends_the_pass_at_the_layer(tiny):
    layers = layers_of(tiny)
    ran = []
    handle = layers[2].register_forward_pre_hook(lambda module, args: ran.append(2))
    try:
        with capture_layer_input(layers, 1, stop=True) as captured, pytest.raises(StopForward):
            tiny.model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        handle.remove()
    assert len(captured) == 1 and ran == []


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_scores_from_stored_states_equal_full_scores(tiny, layer):
    full = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, batch_size=3)
    states = LayerStates.for_model(tiny, layer)
    record_layer_states(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, states, batch_size=2)
    assert states.covers(encode_continuations(tiny.tokenizer, PROMPTS, TARGETS))
    started = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        batch_size=3,
        shortcuts=ScoringShortcuts(start_states=states),
    )
    assert max_difference(started, full) < 1e-5
    # states recorded during a full scoring pass serve as well, in another batching
    during = LayerStates.for_model(tiny, layer)
    recorded_scores = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        batch_size=4,
        shortcuts=ScoringShortcuts(record_states=during),
    )
    assert max_difference(recorded_scores, full) < 1e-5
    started = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS[::-1],
        TARGETS[::-1],
        batch_size=1,
        shortcuts=ScoringShortcuts(start_states=during),
    )
    assert max_difference(started[::-1], full) < 1e-5


def test_layers_below_the_start_never_run(tiny):
    layers, layer = layers_of(tiny), 2
    states = LayerStates.for_model(tiny, layer)
    record_layer_states(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, states)
    calls = {index: 0 for index in range(len(layers))}
    handles = [
        layers[index].mlp.register_forward_pre_hook(
            lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1)
        )
        for index in range(len(layers))
    ]
    try:
        score_continuations(
            tiny.model,
            tiny.tokenizer,
            PROMPTS,
            TARGETS,
            shortcuts=ScoringShortcuts(start_states=states),
        )
    finally:
        for handle in handles:
            handle.remove()
    assert all(calls[index] == 0 for index in range(layer))
    assert all(calls[index] > 0 for index in range(layer, len(layers)))
    # the model is whole again afterwards
    assert all("forward" not in layers[index].__dict__ for index in range(len(layers)))


def test_states_of_another_layer_are_caught(tiny):
    """Negative control: states entering layer 1 fed in at layer 2 change the scores."""
    full = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS)
    states = LayerStates.for_model(tiny, 1)
    record_layer_states(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, states)
    states.layer = 2
    wrong = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        shortcuts=ScoringShortcuts(start_states=states),
    )
    assert max_difference(wrong, full) > 1e-3


def test_missing_states_and_edits_below_the_start_are_refused(tiny):
    states = LayerStates.for_model(tiny, 2)
    record_layer_states(tiny.model, tiny.tokenizer, PROMPTS[:2], TARGETS[:2], states)
    assert not states.covers(encode_continuations(tiny.tokenizer, PROMPTS, TARGETS))
    with pytest.raises(KeyError, match="record them first"):
        score_continuations(
            tiny.model,
            tiny.tokenizer,
            PROMPTS,
            TARGETS,
            shortcuts=ScoringShortcuts(start_states=states),
        )
    d_v, d_k = tiny.weight(1).shape
    rows = RowEdits.for_model(tiny, RankOneEdits(1, torch.zeros(1, d_v), torch.zeros(1, d_k)))
    with pytest.raises(ValueError, match="skip the edit"):
        ScoringShortcuts(edits=PromptEdits(rows, [0, 0]), start_states=states)


def test_row_edits_from_stored_states_equal_written_weights(tiny):
    layer = 1
    generator = torch.Generator().manual_seed(0)
    d_v, d_k = tiny.weight(layer).shape
    edits = RankOneEdits(
        layer,
        torch.randn(2, d_v, generator=generator),
        0.3 * torch.randn(2, d_k, generator=generator),
    )
    prompt_edits = [0, 1, -1, 0]
    states = LayerStates.for_model(tiny, layer)
    record_layer_states(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, states)
    started = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        shortcuts=ScoringShortcuts(
            edits=PromptEdits(RowEdits.for_model(tiny, edits), prompt_edits), start_states=states
        ),
    )
    weight = tiny.weight(layer)
    for prompt, targets, index, scores in zip(PROMPTS, TARGETS, prompt_edits, started):
        saved = weight.detach().clone()
        with torch.no_grad():
            if index >= 0:
                weight += edits.delta(index)
        try:
            alone = score_continuations(tiny.model, tiny.tokenizer, [prompt], [targets])[0]
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert max(abs(a - b) for a, b in zip(scores, alone)) < 1e-5
