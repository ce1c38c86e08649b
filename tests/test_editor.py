"""Updates on real (tiny) models: constraints hold at the module, weights restore exactly,
delta files round-trip, and bad updates never reach the weights."""

from __future__ import annotations

import copy

import pytest
import torch

from editexp.config import ValueHparams
from editexp.editing.deltas import (
    add_to_weight,
    apply_edits,
    restore_weights,
    save_deltas,
    snapshot_weights,
)
from editexp.editing.editor import edit_batch
from editexp.editing.keys import EditRequest, read_at_subject
from editexp.editing.linalg import CovarianceFactor, EditingError
from editexp.editing.plan import UpdatePlan

REQUESTS = [
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest(2, "{}, which is located in", "Eiffel Tower", "Rome"),
    EditRequest(3, "{} plays the", "Miles Davis", "guitar"),
]
PREFIXES = ["", "The weather was nice today. "]
HPARAMS = ValueHparams(v_steps=4, early_stop_loss=0.0)


def covariances(loaded, layers):
    """A random SPD C0 per layer (the closed forms only need SPD)."""
    generator = torch.Generator().manual_seed(0)
    result = {}
    for layer in layers:
        d_k = loaded.weight(layer).shape[1]
        samples = torch.randn(4 * d_k, d_k, generator=generator, dtype=torch.float64)
        result[layer] = CovarianceFactor(samples.T @ samples / samples.shape[0])
    return result


@pytest.mark.parametrize("algorithm,requests_", [("rome", REQUESTS[:1]), ("emmet", REQUESTS)])
def test_equality_constrained_updates_make_the_module_output_its_values(
    own_model64, algorithm, requests_
):
    """After ROME / EMMET(0), the edited module's output at k* moves by exactly delta*:
    W' k* + b = (W k* + b) + delta* (k* and the output read with the same two-level mean over
    contexts, which commutes with the affine module)."""
    layer = 1
    before = read_at_subject(own_model64, requests_, PREFIXES, [layer], "output")[layer]
    result = edit_batch(
        own_model64,
        requests_,
        UpdatePlan(algorithm, [layer], 0.0, HPARAMS, progress=False),
        covariances(own_model64, [layer]),
        PREFIXES,
    )
    after = read_at_subject(own_model64, requests_, PREFIXES, [layer], "output")[layer]
    torch.testing.assert_close(after - before, result.values.deltas, rtol=1e-4, atol=1e-5)
    assert result.values.deltas.norm() > 0


def test_memit_with_large_lambda_barely_moves_outputs(own_model64):
    layer = 1
    snapshot = snapshot_weights(own_model64, [layer])
    result = edit_batch(
        own_model64,
        REQUESTS,
        UpdatePlan("memit", [layer], 1e8, HPARAMS, progress=False),
        covariances(own_model64, [layer]),
        PREFIXES,
    )
    restore_weights(own_model64, snapshot)
    assert result.deltas[layer].norm() < 1e-3 * snapshot[layer].norm()


def test_multi_layer_update_reaches_the_residual_target(own_model64):
    """MEMIT's spread: after editing layers [1, 2], the residual stream after layer 2 at the
    subject moved towards z + delta* (exactly there only if keys don't move; check progress)."""
    layers = [0, 1]
    before = read_at_subject(own_model64, REQUESTS, [""], [1], "residual")[1]  # UME: bare prompt
    result = edit_batch(
        own_model64,
        REQUESTS,
        UpdatePlan("memit", layers, 1e-3, HPARAMS, progress=False),
        covariances(own_model64, layers),
        PREFIXES,
    )
    after = read_at_subject(own_model64, REQUESTS, [""], [1], "residual")[1]
    target = before + result.values.deltas
    torch.testing.assert_close(target, result.values.targets, rtol=1e-6, atol=1e-7)
    assert set(result.deltas) == {0, 1}
    assert result.values.deltas.norm() > 0
    assert (after - target).norm() < 0.5 * (before - target).norm()


def test_singular_restore_is_bit_exact(own_model64):
    layer = 1
    snapshot = snapshot_weights(own_model64, [layer])
    original = own_model64.edit_module(layer).weight.detach().clone()
    edit_batch(
        own_model64,
        REQUESTS[:1],
        UpdatePlan("rome", [layer], None, HPARAMS, progress=False),
        covariances(own_model64, [layer]),
        PREFIXES,
    )
    assert not torch.equal(own_model64.edit_module(layer).weight, original)
    restore_weights(own_model64, snapshot)
    assert torch.equal(own_model64.edit_module(layer).weight, original)


def test_delta_file_round_trip(own_model64, tmp_path):
    layer = 1
    fresh = copy.deepcopy(own_model64.model)
    result = edit_batch(
        own_model64,
        REQUESTS,
        UpdatePlan("memit", [layer], 10.0, HPARAMS, progress=False),
        covariances(own_model64, [layer]),
        PREFIXES,
    )
    path = save_deltas(tmp_path / "deltas.pt", own_model64, result.deltas)
    other = copy.copy(own_model64)
    other.model = fresh
    apply_edits(other, path)
    torch.testing.assert_close(
        other.edit_module(layer).weight, own_model64.edit_module(layer).weight, rtol=0, atol=1e-6
    )
    wrong = copy.copy(other)
    wrong.weights_identity = "some-other-model"
    with pytest.raises(EditingError, match="holds edits of model"):
        apply_edits(wrong, path)


def test_emmet_exact_with_duplicate_facts_fails_before_touching_weights(own_model64):
    layer = 1
    original = own_model64.edit_module(layer).weight.detach().clone()
    with pytest.raises(EditingError, match="lambda"):
        edit_batch(
            own_model64,
            [REQUESTS[0], REQUESTS[0]],
            UpdatePlan("emmet", [layer], 0.0, HPARAMS, progress=False),
            covariances(own_model64, [layer]),
            PREFIXES,
        )
    assert torch.equal(own_model64.edit_module(layer).weight, original)


def test_non_finite_delta_is_refused(own_model64):
    layer = 1
    original = own_model64.edit_module(layer).weight.detach().clone()
    delta = torch.zeros_like(own_model64.weight(layer))
    delta[0, 0] = float("nan")
    with pytest.raises(EditingError, match="NaN"):
        add_to_weight(own_model64, layer, delta)
    assert torch.equal(own_model64.edit_module(layer).weight, original)


def test_rome_refuses_batches(own_model64):
    with pytest.raises(EditingError, match="ROME edits one fact"):
        edit_batch(
            own_model64,
            REQUESTS,
            UpdatePlan("rome", [1], None, HPARAMS, progress=False),
            covariances(own_model64, [1]),
            PREFIXES,
        )


def test_failed_solve_at_a_later_layer_restores_the_earlier_layers(own_model64, monkeypatch):
    import editexp.editing.editor as editor

    layers = [0, 1]
    originals = {layer: own_model64.edit_module(layer).weight.detach().clone() for layer in layers}
    solve = editor.closed_form_delta
    calls = []

    def fail_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise EditingError("simulated failure of the lambda solve at layer 1")
        return solve(*args, **kwargs)

    monkeypatch.setattr(editor, "closed_form_delta", fail_on_second_layer)
    with pytest.raises(EditingError, match="simulated"):
        edit_batch(
            own_model64,
            REQUESTS,
            UpdatePlan("memit", layers, 1.0, HPARAMS, progress=False),
            covariances(own_model64, layers),
            PREFIXES,
        )
    assert len(calls) == 2
    for layer in layers:
        assert torch.equal(own_model64.edit_module(layer).weight, originals[layer])


def test_apply_edits_is_exported_at_the_top_level():
    import editexp

    assert editexp.apply_edits is apply_edits
