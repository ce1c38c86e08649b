"""A new algorithm is one module and one config: this module registers a toy one (ridge
regression with C0 = I) and its Hydra config (the stand-in for conf/algorithm/<name>.yaml),
then edits a tiny model with it, in batch and singular mode, touching no other file."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EXAMPLE_FACTS, FAST_EDITING, cached_model
from hydra.core.config_store import ConfigStore

from editexp import Editor
from editexp.algorithms import VALUE_DEFAULTS, Algorithm, register, unregister
from editexp.config import run_settings
from editexp.editing.linalg import CovarianceFactor, SolveParams

SOLVED: list[torch.Tensor] = []  # every Delta the toy solver returned


def ridge_delta(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor, params: SolveParams
) -> torch.Tensor:
    """Delta = R K^T (K K^T + lambda I)^-1, (d_v, d_k) float64: MEMIT with C0 = I."""
    keys, residuals = keys.double(), residuals.double()
    system = keys @ keys.T + params.lam * torch.eye(keys.shape[0], dtype=keys.dtype)
    delta = torch.linalg.solve(system, keys @ residuals.T).T
    SOLVED.append(delta)
    return delta


TOY = Algorithm(
    name="toy_ridge",
    title="ToyRidge",
    solver=ridge_delta,
    defaults={"lambda": 1e-3, **VALUE_DEFAULTS, "v_steps": 3},
)


@pytest.fixture
def toy():
    register(TOY)
    ConfigStore.instance().store(
        group="algorithm", name=TOY.name, node={"name": TOY.name, "keep_edits": False}
    )
    SOLVED.clear()
    yield TOY
    unregister(TOY.name)


def fresh_tiny():
    loaded = copy.copy(cached_model("tiny-llama3"))
    loaded.model = copy.deepcopy(loaded.model)
    return loaded


def test_a_registered_algorithm_edits_through_the_editor(toy):
    loaded = fresh_tiny()
    original = loaded.weight(1).detach().clone()
    editor = Editor.from_pretrained(loaded, algorithm=toy.name, layer=1, **FAST_EDITING)
    # no model YAML names the toy: its defaults come from the record
    assert editor.settings.lam == 1e-3 and editor.settings.hparams.v_steps == 3
    update = editor.edit(EXAMPLE_FACTS)
    assert len(SOLVED) == 1 and SOLVED[0].shape == original.shape
    torch.testing.assert_close(update.deltas[1], SOLVED[0].float(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.weight(1), original + update.deltas[1], rtol=1e-6, atol=1e-6)
    update.revert()
    assert torch.equal(loaded.weight(1), original)


def test_a_registered_algorithm_runs_in_singular_mode(toy):
    loaded = fresh_tiny()
    editor = Editor.from_pretrained(
        loaded, algorithm=toy.name, layer=1, mode="singular", **FAST_EDITING
    )
    singular = editor.edit_singular(EXAMPLE_FACTS)
    assert len(SOLVED) == 2  # not rank_one: each fact solved alone, then factored as r w^T
    for index, delta in enumerate(SOLVED):
        torch.testing.assert_close(
            singular.edits.delta(index).double(), delta, rtol=1e-4, atol=1e-6
        )


def test_a_model_block_overrides_the_records_defaults(toy):
    from editexp.config import compose

    cfg = compose("tiny-llama3", toy.name, **{f"model.hparams.{toy.name}.lambda": 0.5})
    assert run_settings(cfg).lam == 0.5
