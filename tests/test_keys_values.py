"""The key/value engine: the fast batched path equals the plain one-fact-at-a-time computation."""

from __future__ import annotations

import pytest
import torch

from editexp.config import ValueHparams
from editexp.editing.keys import EditRequest, compute_keys, read_at_subject
from editexp.editing.plain_values import plain_values
from editexp.editing.values import compute_values
from editexp.tokens import encode_prompt, subject_last_index

REQUESTS = [
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest(2, "{}, which is located in", "Eiffel Tower", "Rome, Italy"),
    EditRequest(3, "{} plays the", "Miles Davis", "electric guitar"),
]
PREFIXES = ["", "The weather was nice today. ", "I think that. "]
HPARAMS = ValueHparams(v_lr=0.5, v_steps=6, early_stop_loss=0.0)


def test_keys_are_module_inputs_at_the_subject_bare_prompt_weighing_one_half(model64):
    """UME's compute_ks: the mean of two group means, the bare prompt and the prefixes."""
    layer = 1
    keys = compute_keys(model64, REQUESTS, PREFIXES, [layer], batch_size=4)[layer]
    captured = []
    handle = model64.edit_module(layer).register_forward_pre_hook(
        lambda module, args: captured.append(args[0])
    )
    try:
        for column, request in enumerate(REQUESTS):
            per_context = []
            for prefix in PREFIXES:
                text = prefix + request.prompt.format(request.subject)
                ids = torch.tensor([encode_prompt(model64.tokenizer, text)])
                captured.clear()
                model64.model(input_ids=ids)
                index = subject_last_index(model64.tokenizer, text, request.subject)
                per_context.append(captured[0][0, index])
            expected = (per_context[0] + torch.stack(per_context[1:]).mean(0)) / 2
            torch.testing.assert_close(keys[:, column].double(), expected, rtol=1e-6, atol=1e-6)
        bare = compute_keys(model64, REQUESTS, [""], [layer])[layer]
        assert not torch.allclose(bare, keys)
    finally:
        handle.remove()


def test_keys_several_layers_in_one_pass_equal_one_at_a_time(model64):
    together = compute_keys(model64, REQUESTS, PREFIXES, [0, 2])
    for layer in (0, 2):
        alone = compute_keys(model64, REQUESTS, PREFIXES, [layer])[layer]
        torch.testing.assert_close(together[layer], alone)


def test_fast_values_equal_plain_values(model64):
    fast = compute_values(model64, REQUESTS, PREFIXES, 1, HPARAMS, progress=False)
    plain = plain_values(model64, REQUESTS, PREFIXES, 1, HPARAMS)
    torch.testing.assert_close(fast.outputs, plain.outputs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fast.deltas, plain.deltas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.losses, plain.losses, rtol=1e-6, atol=1e-9)
    assert torch.equal(fast.steps, plain.steps)
    assert (fast.deltas.norm(dim=1) > 0).all()


def test_h_is_the_residual_stream_on_the_bare_prompt(model64):
    values = compute_values(model64, REQUESTS, PREFIXES, 1, HPARAMS, progress=False)
    residual = read_at_subject(model64, REQUESTS, [""], [1], "residual")[1]
    torch.testing.assert_close(values.outputs, residual, rtol=1e-6, atol=1e-7)


def test_batched_values_equal_one_fact_at_a_time(model64):
    together = compute_values(model64, REQUESTS, PREFIXES, 1, HPARAMS, batch_size=3, progress=False)
    for row, request in enumerate(REQUESTS):
        alone = compute_values(model64, [request], PREFIXES, 1, HPARAMS, progress=False)
        torch.testing.assert_close(together.deltas[row], alone.deltas[0], rtol=1e-5, atol=1e-6)
        assert together.steps[row] == alone.steps[0]


def test_each_fact_has_its_own_early_stop_and_clamp(model64):
    # A huge threshold stops every fact before its first step; a tiny clamp bounds each delta.
    stopped = compute_values(
        model64, REQUESTS, PREFIXES, 1, ValueHparams(v_steps=5, early_stop_loss=1e9), progress=False
    )
    assert stopped.steps.tolist() == [0, 0, 0]
    assert torch.count_nonzero(stopped.deltas) == 0
    clamped = compute_values(
        model64,
        REQUESTS,
        PREFIXES,
        1,
        ValueHparams(v_steps=5, early_stop_loss=0.0, clamp_norm_factor=0.01),
        progress=False,
    )
    ratio = clamped.deltas.double().norm(dim=1) / clamped.outputs.double().norm(dim=1)
    assert (ratio <= 0.01 + 1e-6).all()


def test_residual_reading_differs_from_module_output(model64):
    residual = read_at_subject(model64, REQUESTS[:1], [""], [1], "residual")[1]
    output = read_at_subject(model64, REQUESTS[:1], [""], [1], "output")[1]
    assert residual.shape == output.shape
    assert not torch.allclose(residual, output)


def test_contexts_must_start_with_the_bare_prompt(model64):
    with pytest.raises(ValueError, match="bare prompt"):
        compute_keys(model64, REQUESTS, PREFIXES[1:], [1])
    with pytest.raises(ValueError, match="bare prompt"):
        compute_values(model64, REQUESTS, PREFIXES[1:], 1, HPARAMS, progress=False)
