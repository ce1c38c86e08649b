"""The value optimisation starts every Adam step at the edited layer (the layers below run once
per chunk) and still equals the plain one-fact-at-a-time loop (float64)."""

from __future__ import annotations

import torch

from editexp.config import ValueHparams
from editexp.editing.keys import EditRequest
from editexp.editing.plain_values import plain_values
from editexp.editing.values import compute_values

REQUESTS = [
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest(2, "{}, which is located in", "Eiffel Tower", "Rome, Italy"),
]
PREFIXES = ["", "The weather was nice today. ", "I think that. "]
HPARAMS = ValueHparams(v_lr=0.5, v_steps=6, early_stop_loss=-1.0)


def test_values_at_every_layer_equal_the_plain_loop(model64):
    # Not the last layer: there delta reaches no loss but the KL term, whose gradient is 0 at
    # delta = 0, so Adam's first steps normalise rounding noise and no two codes agree.
    for layer in range(model64.spec.n_layers - 1):
        fast = compute_values(model64, REQUESTS, PREFIXES, layer, HPARAMS, progress=False)
        plain = plain_values(model64, REQUESTS, PREFIXES, layer, HPARAMS)
        assert torch.equal(fast.steps, plain.steps)
        # Values are stored in float32: equal up to its last bit
        torch.testing.assert_close(fast.outputs, plain.outputs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fast.deltas, plain.deltas, rtol=1e-6, atol=1e-7)


def test_layers_below_the_edited_one_run_once_per_chunk(model64):
    layers = model64.model.get_submodule(model64.spec.layers_module)
    layer = len(layers) - 1
    calls = [0] * len(layers)
    handles = [
        layers[index].mlp.register_forward_pre_hook(
            lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1)
        )
        for index in range(len(layers))
    ]
    try:
        compute_values(model64, REQUESTS, PREFIXES, layer, HPARAMS, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # below: the head pass and the tail pass of the one chunk; the edited layer: every step
    assert calls[:layer] == [2] * layer
    assert calls[layer] >= 1 + HPARAMS.v_steps
    assert all("forward" not in layers[index].__dict__ for index in range(len(layers)))
