"""Sequential editing that keeps earlier edits: MEMIT / EMMET with past keys, and AlphaEdit.

The closed forms are checked against their objectives and constraints (zero gradients, exact
constraints, optimality among feasible updates), against plain re-implementations of the
paper's formula and of the public AlphaEdit code's solve, and through identities (no earlier
keys = plain MEMIT / EMMET; EMMET keep_edits(eps) = MEMIT keep_edits(lambda = eps); AlphaEdit
without projection = MEMIT with C0 = I). Then on real (tiny) models through ``edit_batch`` and
the runner, resume included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import compose_config

from editexp.config import ConfigError, ValueHparams, run_settings
from editexp.editing.alphaedit import alphaedit_delta
from editexp.editing.deltas import restore_weights, snapshot_weights
from editexp.editing.editor import edit_batch
from editexp.editing.emmet import emmet_delta
from editexp.editing.keys import EditRequest
from editexp.editing.linalg import CovarianceFactor, EditingError, PastKeys
from editexp.editing.memit import memit_delta
from editexp.editing.plan import UpdatePlan
from editexp.layer_stats import load_or_compute_stats
from editexp.models import load_model
from editexp.record import RunRecord
from editexp.runner import SimulatedCrash, run

THRESHOLD = 1e-2  # the test C0's eigenvalues: half in [1, 10], half in [1e-4, 1e-3]


@dataclass
class SequentialProblem:
    """W (d_v, d_k), C0 with a clear null space, and two batches of keys and values."""

    weight: torch.Tensor
    second_moment: torch.Tensor
    covariance: CovarianceFactor
    keys: list[torch.Tensor]  # per batch (d_k, E)
    values: list[torch.Tensor]  # per batch (d_v, E)
    preserved_basis: torch.Tensor  # (d_k, d_k / 2) eigenvectors of C0 with large eigenvalues


def make_problem(
    seed: int, d_k: int = 32, d_v: int = 12, batch_sizes: tuple[int, ...] = (6, 6)
) -> SequentialProblem:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    rotation, _ = torch.linalg.qr(randn(d_k, d_k))
    half = d_k // 2
    large = 1.0 + 9.0 * torch.rand(half, generator=generator, dtype=torch.float64)
    small = 1e-4 + 9e-4 * torch.rand(d_k - half, generator=generator, dtype=torch.float64)
    eigenvalues = torch.cat([large, small])
    second_moment = rotation @ torch.diag(eigenvalues) @ rotation.T
    return SequentialProblem(
        weight=randn(d_v, d_k),
        second_moment=second_moment,
        covariance=CovarianceFactor(second_moment),
        keys=[randn(d_k, size) for size in batch_sizes],
        values=[3.0 * randn(d_v, size) for size in batch_sizes],
        preserved_basis=rotation[:, :half],
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def past_of(*key_batches: torch.Tensor) -> PastKeys:
    past = PastKeys.empty(key_batches[0].shape[0])
    for keys in key_batches:
        past.add(keys)
    return past


# ---------------------------------------------------------------- PastKeys


def test_past_keys_is_a_constant_size_running_sum_with_a_factor() -> None:
    problem = make_problem(0, batch_sizes=(5, 7, 4))
    past = PastKeys.empty(32)
    for keys in problem.keys:
        past.add(keys.float())  # keys arrive in float32 from the model
        assert past.gram.shape == (32, 32) and past.gram.dtype == torch.float64
    every_key = torch.cat([keys.float().double() for keys in problem.keys], dim=1)
    assert past.count == 16
    torch.testing.assert_close(past.gram, every_key @ every_key.T, rtol=1e-12, atol=1e-12)
    basis = past.factor()
    assert basis.shape == (32, 16)  # the rank of 16 independent keys
    torch.testing.assert_close(basis @ basis.T, past.gram, rtol=1e-10, atol=1e-10)
    assert PastKeys.empty(8).factor().shape == (8, 0)
    with pytest.raises(EditingError, match=r"\(32, E\).*\(31, 2\)"):
        past.add(torch.ones(31, 2))


# ---------------------------------------------------------------- MEMIT keep_edits


@pytest.mark.parametrize("past", [None, "empty"])
def test_memit_and_emmet_without_earlier_keys_are_plain(past) -> None:
    problem = make_problem(1)
    keys, residuals = problem.keys[0], problem.values[0] - problem.weight @ problem.keys[0]
    empty = PastKeys.empty(32) if past == "empty" else None
    for update, lam in ((memit_delta, 10.0), (emmet_delta, 0.0), (emmet_delta, 1e-2)):
        plain = update(keys, residuals, problem.covariance, lam)
        kept = update(keys, residuals, problem.covariance, lam, empty)
        assert torch.equal(plain, kept)


def keep_edits_gradient(
    delta: torch.Tensor, problem: SequentialProblem, lam: float
) -> tuple[float, float]:
    """Norm of the gradient (autograd) of lam tr(D C0 D^T) + ||D K_past||^2 + ||D K - R||^2
    at D for the second batch, and the gradient's scale."""
    keys, past_keys = problem.keys[1], problem.keys[0]
    residuals = problem.values[1] - problem.weight @ keys
    change = delta.clone().requires_grad_(True)
    objective = (
        lam * torch.trace(change @ problem.second_moment @ change.T)
        + torch.sum((change @ past_keys) ** 2)
        + torch.sum((change @ keys - residuals) ** 2)
    )
    (gradient,) = torch.autograd.grad(objective, change)
    return float(torch.linalg.norm(gradient)), float(torch.linalg.norm(residuals @ keys.T))


@pytest.mark.parametrize("lam", [1e-4, 1.0, 100.0])
def test_memit_keep_edits_zeroes_the_gradient_of_its_objective(lam: float) -> None:
    problem = make_problem(2)
    residuals = problem.values[1] - problem.weight @ problem.keys[1]
    past = past_of(problem.keys[0])
    delta = memit_delta(problem.keys[1], residuals, problem.covariance, lam, past)
    gradient, scale = keep_edits_gradient(delta, problem, lam)
    assert gradient < 1e-9 * scale
    # control: plain MEMIT does not minimise the objective with the earlier keys
    plain = memit_delta(problem.keys[1], residuals, problem.covariance, lam)
    gradient, scale = keep_edits_gradient(plain, problem, lam)
    assert gradient > 1e-3 * scale


def sequential_memit(problem: SequentialProblem, lam: float, keep: bool) -> list[torch.Tensor]:
    """W after each of the problem's batches, MEMIT solved on the current W each time."""
    weight, past, weights = problem.weight, PastKeys.empty(32), []
    for keys, values in zip(problem.keys, problem.values):
        delta = memit_delta(
            keys, values - weight @ keys, problem.covariance, lam, past if keep else None
        )
        weight = weight + delta
        past.add(keys)
        weights.append(weight)
    return weights


def test_memit_keep_edits_keeps_the_first_batch_to_the_regularisation_tolerance() -> None:
    """After the second update, the first batch's keys still map to what they mapped to
    after the first: their drift is O(lambda) and vanishes as lambda -> 0 (two batches of 6
    keys in d_k = 32 can all be fit exactly), while plain MEMIT moves them by O(1)."""
    problem = make_problem(3)
    first_keys, first_values = problem.keys[0], problem.values[0]
    drifts = {}
    for lam in (1e-2, 1e-4, 1e-6):
        after_first, after_second = sequential_memit(problem, lam, keep=True)
        second_residual = problem.values[1] - after_first @ problem.keys[1]
        drift = torch.linalg.norm((after_second - after_first) @ first_keys)
        drifts[lam] = float(drift / torch.linalg.norm(second_residual))
        # the second batch is written too
        assert relative_error(after_second @ problem.keys[1], problem.values[1]) < 1e3 * lam
        # and the first batch's keys still give its values, to lambda's tolerance
        assert relative_error(after_second @ first_keys, first_values) < 1e3 * lam
    assert drifts[1e-6] < 1e-5
    assert drifts[1e-2] > drifts[1e-4] > drifts[1e-6]
    assert drifts[1e-4] / drifts[1e-6] > 30  # about linear in lambda
    # control: without keep_edits the second update overwrites the first batch's outputs
    after_first, after_second = sequential_memit(problem, 1e-6, keep=False)
    plain_drift = torch.linalg.norm((after_second - after_first) @ first_keys)
    second_residual = problem.values[1] - after_first @ problem.keys[1]
    assert float(plain_drift / torch.linalg.norm(second_residual)) > 0.1
    assert relative_error(after_second @ first_keys, first_values) > 0.1


def test_memit_keep_edits_with_lambda_zero_needs_enough_keys_in_total() -> None:
    problem = make_problem(4, batch_sizes=(20, 10))
    residuals = problem.values[1] - problem.weight @ problem.keys[1]
    with pytest.raises(EditingError, match=r"lambda=0.*d_k=32.*E=10"):
        memit_delta(problem.keys[1], residuals, problem.covariance, 0.0)
    # 20 earlier + 10 new keys still do not span d_k = 32
    with pytest.raises(EditingError, match=r"lambda=0.*E=30"):
        memit_delta(problem.keys[1], residuals, problem.covariance, 0.0, past_of(problem.keys[0]))
    more = make_problem(4, batch_sizes=(24, 10))
    residuals = more.values[1] - more.weight @ more.keys[1]
    delta = memit_delta(more.keys[1], residuals, more.covariance, 0.0, past_of(more.keys[0]))
    # least squares over 34 keys in d_k = 32: the gradient of ||D K_past||^2 + ||D K - R||^2
    gradient, scale = keep_edits_gradient(delta, more, 0.0)
    assert gradient < 1e-8 * scale


# ---------------------------------------------------------------- EMMET keep_edits


@pytest.mark.parametrize("eps", [1e-4, 1e-2, 1.0, 10.0])
def test_emmet_keep_edits_equals_memit_keep_edits_for_the_same_lambda(eps: float) -> None:
    problem = make_problem(5, batch_sizes=(9, 7))
    residuals = problem.values[1] - problem.weight @ problem.keys[1]
    past = past_of(problem.keys[0])
    memit = memit_delta(problem.keys[1], residuals, problem.covariance, eps, past)
    emmet = emmet_delta(problem.keys[1], residuals, problem.covariance, eps, past)
    assert relative_error(emmet, memit) < 1e-8
    # control: a 10% different lambda is caught (at least 10x the tolerance above)
    other = emmet_delta(problem.keys[1], residuals, problem.covariance, 1.1 * eps, past)
    assert relative_error(other, memit) > 1e-7


def feasible_perturbation(constraint_keys: torch.Tensor, d_v: int, seed: int) -> torch.Tensor:
    """A random N (d_v, d_k) with N constraint_keys = 0."""
    basis, _ = torch.linalg.qr(constraint_keys)
    projector = torch.eye(constraint_keys.shape[0], dtype=torch.float64) - basis @ basis.T
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(d_v, constraint_keys.shape[0], generator=generator, dtype=torch.float64)
    return noise @ projector


def assert_minimal_cost(
    delta: torch.Tensor, constraint_keys: torch.Tensor, cost_matrix: torch.Tensor
) -> None:
    """No feasible change (one that keeps Delta's outputs on constraint_keys) lowers
    tr(Delta C Delta^T): the cross term vanishes and every step costs more."""
    best = float(torch.trace(delta @ cost_matrix @ delta.T))
    for seed in range(4):
        perturbation = feasible_perturbation(constraint_keys, delta.shape[0], seed)
        cross = float(torch.trace(delta @ cost_matrix @ perturbation.T))
        scale = float(torch.linalg.norm(delta @ cost_matrix) * torch.linalg.norm(perturbation))
        assert abs(cross) < 1e-9 * scale
        for step in (1e-3, 1.0):
            moved = delta + step * perturbation
            assert float(torch.trace(moved @ cost_matrix @ moved.T)) > best


def test_emmet_keep_edits_exact_holds_every_constraint_and_is_the_cheapest() -> None:
    problem = make_problem(6, batch_sizes=(10, 8))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    delta = emmet_delta(keys, residuals, problem.covariance, 0.0, past_of(first))
    torch.testing.assert_close(delta @ keys, residuals, rtol=0, atol=1e-9)  # new facts exact
    assert float(torch.linalg.norm(delta @ first)) < 1e-9 * float(torch.linalg.norm(residuals))
    assert_minimal_cost(delta, torch.cat([keys, first], dim=1), problem.second_moment)
    # control: plain EMMET moves the earlier keys' outputs
    plain = emmet_delta(keys, residuals, problem.covariance, 0.0)
    assert float(torch.linalg.norm(plain @ first)) > 1e-2 * float(torch.linalg.norm(residuals))


def test_emmet_keep_edits_past_dk_moves_earlier_keys_into_the_preservation_term() -> None:
    """28 earlier + 8 new keys > d_k = 32: the new facts stay exact, and Delta is the cheapest
    such update under C = C0 + K_past K_past^T."""
    problem = make_problem(7, batch_sizes=(28, 8))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    past = past_of(first)
    delta = emmet_delta(keys, residuals, problem.covariance, 0.0, past)
    torch.testing.assert_close(delta @ keys, residuals, rtol=0, atol=1e-8)
    assert_minimal_cost(delta, keys, problem.second_moment + past.gram)
    # the earlier keys are protected much better than by plain EMMET
    plain = emmet_delta(keys, residuals, problem.covariance, 0.0)
    assert torch.linalg.norm(delta @ first) < 0.5 * torch.linalg.norm(plain @ first)


def test_emmet_keep_edits_exact_with_a_key_in_the_earlier_span_reports_singular_gram() -> None:
    problem = make_problem(8, batch_sizes=(6, 4))
    first, keys = problem.keys
    keys = keys.clone()
    keys[:, 2] = first[:, 0] - 0.5 * first[:, 3]  # a new key that earlier keys already span
    residuals = problem.values[1] - problem.weight @ keys
    with pytest.raises(EditingError, match=r"singular.*span of earlier edits' keys.*lambda > 0"):
        emmet_delta(keys, residuals, problem.covariance, 0.0, past_of(first))
    delta = emmet_delta(keys, residuals, problem.covariance, 1e-3, past_of(first))
    assert bool(torch.isfinite(delta).all())


def test_past_keys_of_another_layer_are_refused() -> None:
    problem = make_problem(9)
    residuals = problem.values[1] - problem.weight @ problem.keys[1]
    wrong = PastKeys.empty(16)
    wrong.add(torch.ones(16, 1))
    for update in (
        lambda: memit_delta(problem.keys[1], residuals, problem.covariance, 1.0, wrong),
        lambda: emmet_delta(problem.keys[1], residuals, problem.covariance, 0.0, wrong),
        lambda: alphaedit_delta(problem.keys[1], residuals, problem.covariance, 1.0, 1e-2, wrong),
    ):
        with pytest.raises(EditingError, match=r"\(16, 16\).*32 x 32.*another layer"):
            update()


# ---------------------------------------------------------------- AlphaEdit


def null_space_projector(problem: SequentialProblem, threshold: float) -> torch.Tensor:
    """P from a fresh eigendecomposition (not the module's cached basis)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(problem.second_moment)
    small = eigenvectors[:, eigenvalues < threshold]
    return small @ small.T


def paper_alphaedit(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    alpha: float,
    past_gram: torch.Tensor,
) -> torch.Tensor:
    """The paper's formula, plainly: R K^T P (K_past K_past^T P + K K^T P + alpha I)^-1."""
    identity = torch.eye(projector.shape[0], dtype=torch.float64)
    system = past_gram @ projector + keys @ keys.T @ projector + alpha * identity
    # X S = B  <=>  S^T X^T = B^T
    return torch.linalg.solve(system.T, (residuals @ keys.T @ projector).T).T


def reference_code_alphaedit(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    alpha: float,
    past_gram: torch.Tensor,
) -> torch.Tensor:
    """The public code's solve: solve(P (K K^T + C_past) + L2 I, P K R^T), transposed."""
    identity = torch.eye(projector.shape[0], dtype=torch.float64)
    system = projector @ (keys @ keys.T + past_gram) + alpha * identity
    return torch.linalg.solve(system, projector @ keys @ residuals.T).T


@pytest.mark.parametrize("alpha", [1e-2, 1.0, 10.0])
@pytest.mark.parametrize("with_past", [False, True])
def test_alphaedit_matches_the_paper_and_the_public_code(alpha: float, with_past: bool) -> None:
    problem = make_problem(10, batch_sizes=(7, 5))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    past = past_of(first) if with_past else None
    past_gram = past.gram if with_past else torch.zeros(32, 32, dtype=torch.float64)
    delta = alphaedit_delta(keys, residuals, problem.covariance, alpha, THRESHOLD, past)
    projector = null_space_projector(problem, THRESHOLD)
    assert int(torch.trace(projector).round()) == 16
    paper = paper_alphaedit(keys, residuals, projector, alpha, past_gram)
    assert relative_error(delta, paper) < 1e-9
    code = reference_code_alphaedit(keys, residuals, projector, alpha, past_gram)
    assert relative_error(delta, code) < 1e-9
    # control: a different alpha is a different update
    other = alphaedit_delta(keys, residuals, problem.covariance, 2 * alpha, THRESHOLD, past)
    assert relative_error(other, delta) > 1e-3


@pytest.mark.parametrize("with_past", [False, True])
def test_alphaedit_leaves_the_preserved_subspace_of_c0_unchanged(with_past: bool) -> None:
    problem = make_problem(11, batch_sizes=(7, 5))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    past = past_of(first) if with_past else None
    delta = alphaedit_delta(keys, residuals, problem.covariance, 1.0, THRESHOLD, past)
    projector = null_space_projector(problem, THRESHOLD)
    complement = torch.eye(32, dtype=torch.float64) - projector  # P_perp
    scale = float(torch.linalg.norm(delta))
    assert scale > 1e-2 * float(torch.linalg.norm(residuals))  # a real update
    assert float(torch.linalg.norm(delta @ complement)) < 1e-12 * scale  # Delta P_perp = 0
    # keys of ordinary text in C0's preserved (large-eigenvalue) directions: outputs unchanged
    preserved_keys = problem.preserved_basis @ torch.randn(
        16, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert float(torch.linalg.norm(delta @ preserved_keys)) < 1e-12 * scale * float(
        torch.linalg.norm(preserved_keys)
    )
    # and the preservation cost is bounded by the threshold
    cost = float(torch.trace(delta @ problem.second_moment @ delta.T))
    assert cost <= THRESHOLD * scale**2
    # control: the same solve without projection (P = I) changes the preserved directions
    unprojected = alphaedit_delta(keys, residuals, problem.covariance, 1.0, 100.0, past)
    assert float(torch.linalg.norm(unprojected @ complement)) > 0.1 * float(
        torch.linalg.norm(unprojected)
    )


def test_alphaedit_zeroes_the_gradient_of_its_objective() -> None:
    """At D = Delta the gradient in D~ of ||(D~ P) K - R||^2 + alpha ||D~ P||^2
    + ||D~ P K_past||^2 vanishes (D~ = Delta itself is a minimiser since Delta P = Delta)."""
    problem = make_problem(12, batch_sizes=(7, 5))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    alpha = 0.5
    delta = alphaedit_delta(keys, residuals, problem.covariance, alpha, THRESHOLD, past_of(first))
    projector = null_space_projector(problem, THRESHOLD)

    def gradient_norm(candidate: torch.Tensor) -> float:
        free = candidate.clone().requires_grad_(True)
        projected = free @ projector
        objective = (
            torch.sum((projected @ keys - residuals) ** 2)
            + alpha * torch.sum(projected**2)
            + torch.sum((projected @ first) ** 2)
        )
        (gradient,) = torch.autograd.grad(objective, free)
        return float(torch.linalg.norm(gradient))

    scale = float(torch.linalg.norm(residuals @ keys.T))
    assert gradient_norm(delta) < 1e-9 * scale
    assert gradient_norm(1.01 * delta) > 1e-4 * scale  # control


def test_alphaedit_without_projection_or_earlier_keys_is_memit_with_identity_c0() -> None:
    problem = make_problem(13)
    keys, residuals = problem.keys[0], problem.values[0] - problem.weight @ problem.keys[0]
    no_projection = 100.0  # a threshold above every eigenvalue: P = I
    for alpha in (1e-2, 10.0):
        alphaedit = alphaedit_delta(keys, residuals, problem.covariance, alpha, no_projection)
        identity = CovarianceFactor(torch.eye(32, dtype=torch.float64))
        memit = memit_delta(keys, residuals, identity, alpha)
        assert relative_error(alphaedit, memit) < 1e-10
        # and with an empty PastKeys it is the same update
        with_empty = alphaedit_delta(
            keys, residuals, problem.covariance, alpha, no_projection, PastKeys.empty(32)
        )
        assert relative_error(with_empty, alphaedit) < 1e-14


def test_alphaedit_keeps_earlier_edits_in_the_null_space() -> None:
    """Sequential AlphaEdit: the first batch's outputs change much less with its keys kept."""
    problem = make_problem(14, batch_sizes=(6, 6))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    kept = alphaedit_delta(keys, residuals, problem.covariance, 1e-4, THRESHOLD, past_of(first))
    plain = alphaedit_delta(keys, residuals, problem.covariance, 1e-4, THRESHOLD)
    assert torch.linalg.norm(kept @ first) < 1e-3 * torch.linalg.norm(plain @ first)
    assert relative_error(kept @ keys, residuals) < 1e-2  # the new batch is still written


def test_alphaedit_errors_are_clear() -> None:
    problem = make_problem(15)
    keys, residuals = problem.keys[0], problem.values[0] - problem.weight @ problem.keys[0]
    with pytest.raises(EditingError, match=r"no eigenvalue of C0 is below.*1e-06.*raise"):
        alphaedit_delta(keys, residuals, problem.covariance, 1.0, 1e-6)
    with pytest.raises(EditingError, match=r"alpha\) = 0.*16-dimensional.*E=6.*lambda > 0"):
        alphaedit_delta(keys, residuals, problem.covariance, 0.0, THRESHOLD)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(EditingError, match="nullspace_threshold must be finite and > 0"):
            alphaedit_delta(keys, residuals, problem.covariance, 1.0, bad)
    with pytest.raises(EditingError, match="lambda must be finite and >= 0"):
        alphaedit_delta(keys, residuals, problem.covariance, -1.0, THRESHOLD)


def test_alphaedit_exact_with_enough_keys_in_the_null_space() -> None:
    """alpha = 0 with at least r independent keys is the exact least squares in span(U)."""
    problem = make_problem(16, batch_sizes=(12, 8))
    first, keys = problem.keys
    residuals = problem.values[1] - problem.weight @ keys
    delta = alphaedit_delta(keys, residuals, problem.covariance, 0.0, THRESHOLD, past_of(first))
    projector = null_space_projector(problem, THRESHOLD)
    # (the code's system P A is singular at alpha = 0, so check the objective's gradient)
    assert bool(torch.isfinite(delta).all())
    free = delta.clone().requires_grad_(True)
    projected = free @ projector
    objective = torch.sum((projected @ keys - residuals) ** 2) + torch.sum((projected @ first) ** 2)
    (gradient,) = torch.autograd.grad(objective, free)
    assert float(torch.linalg.norm(gradient)) < 1e-8 * float(torch.linalg.norm(residuals @ keys.T))


# ---------------------------------------------------------------- on real (tiny) models

REQUESTS = [
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest(2, "{}, which is located in", "Eiffel Tower", "Rome"),
    EditRequest(3, "{} plays the", "Miles Davis", "guitar"),
    EditRequest(4, "{} is a citizen of", "Angela Merkel", "Brazil"),
]
PREFIXES = ["", "The weather was nice today. "]
HPARAMS = ValueHparams(v_steps=4, early_stop_loss=0.0)


@pytest.fixture(scope="module")
def tiny_double():
    from conftest import cached_model

    loaded = copy.copy(cached_model("tiny-llama3"))
    loaded.model = copy.deepcopy(loaded.model).double()
    return loaded


def random_covariance(d_k: int) -> CovarianceFactor:
    samples = torch.randn(4 * d_k, d_k, generator=torch.Generator().manual_seed(0))
    return CovarianceFactor(samples.double().T @ samples.double() / samples.shape[0])


# the tiny model's keys have |k|^2 ~ 1e-2: alpha must be far below that to fit both batches
@pytest.mark.parametrize("algorithm,lam", [("memit", 1e-4), ("emmet", 0.0), ("alphaedit", 1e-8)])
def test_edit_batch_with_past_keys_keeps_the_first_batch_at_the_module(
    tiny_double, algorithm: str, lam: float
) -> None:
    """Two sequential updates through ``edit_batch``: with the first update's keys kept, the
    second leaves the edited module's outputs at those keys (almost) where the first put them."""
    layer, loaded = 1, tiny_double
    covariance = random_covariance(loaded.weight(layer).shape[1])
    threshold = float(covariance.eigenvalues()[64])  # a 64-dimensional null space
    snapshot = snapshot_weights(loaded, [layer])
    drifts = {}
    try:
        for keep in (True, False):
            past = {layer: PastKeys.empty(covariance.dim)}
            outputs = []
            for requests in (REQUESTS[:2], REQUESTS[2:]):
                result = edit_batch(
                    loaded,
                    requests,
                    UpdatePlan(
                        algorithm,
                        [layer],
                        lam,
                        HPARAMS,
                        nullspace_threshold=threshold,
                        progress=False,
                    ),
                    {layer: covariance},
                    PREFIXES,
                    past_keys=past if keep else None,
                )
                past[layer].add(result.keys[layer])
                if not outputs:
                    first_keys = result.keys[layer].double()
                outputs.append(loaded.weight(layer).detach().double() @ first_keys)
            change = torch.linalg.norm(outputs[1] - outputs[0])
            drifts[keep] = float(change / torch.linalg.norm(result.deltas[layer].double()))
            assert past[layer].count == 4
            restore_weights(loaded, snapshot)
    finally:
        restore_weights(loaded, snapshot)
    assert drifts[True] < 1e-2 * drifts[False]


RUN_FAST = [
    "model=tiny-llama3",
    "logger=none",
    "stats.n_tokens=3000",
    "stats.seq_len=64",
    "eval.generation_facts=0",
    "eval.held_out_keys=32",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.memit.v_steps=3",
    "model.hparams.emmet.v_steps=3",
    "model.hparams.alphaedit.v_steps=3",
    "mode=sequential",
    "n_edits=6",
    "batch_size=2",
]


def run_config(tmp_path, name, *overrides):
    return run(compose_config(*RUN_FAST, *overrides), tmp_path / name).to_json()


def saved_delta(tmp_path, name) -> torch.Tensor:
    return torch.load(tmp_path / name / "deltas.pt")["deltas"][1]


def test_killed_run_keeping_edits_resumes_with_its_past_keys(tmp_path) -> None:
    args = ["algorithm=memit", "lambda=1e-4", "sequential.keep_edits=true"]
    with pytest.raises(SimulatedCrash):
        run_config(tmp_path, "killed", *args, "+debug.stop_after_updates=2")
    resumed = run_config(tmp_path, "killed", *args)
    straight = run_config(tmp_path, "straight", *args)
    assert resumed["keep_edits"] is True and straight["keep_edits"] is True
    assert "keeping earlier edits' keys" in RunRecord.from_json(straight).table()
    killed, straight_delta = saved_delta(tmp_path, "killed"), saved_delta(tmp_path, "straight")
    # float32 sums of deltas differ in the last bits after a resume; Adam carries that into
    # the next values, so the check is relative to the whole delta, not per element
    assert (killed - straight_delta).norm() < 1e-5 * straight_delta.norm()
    # control: without the earlier keys the same run ends with other weights
    dropped = run_config(tmp_path, "dropped", *args[:-1])
    assert dropped["keep_edits"] is False
    difference = saved_delta(tmp_path, "dropped") - saved_delta(tmp_path, "straight")
    assert float(difference.norm()) > 1e-3 * float(saved_delta(tmp_path, "straight").norm())


def test_alphaedit_run_writes_only_into_the_null_space(tmp_path) -> None:
    summary = run_config(tmp_path, "alpha", "algorithm=alphaedit")
    assert summary["algorithm"] == "alphaedit" and summary["lambda"] == 1e-4
    assert summary["keep_edits"] is True and summary["nullspace_threshold"] == 1e-4
    assert summary["null_space_dim"] == [61]  # C0 of tiny-llama3 on its WikiText default
    cfg = compose_config(*RUN_FAST)
    loaded = load_model(cfg.model, "cpu")
    stats = load_or_compute_stats(loaded, [1], cfg.stats, cfg.data, progress=False)
    basis = CovarianceFactor(stats[1].second_moment).null_space(1e-4)
    delta = saved_delta(tmp_path, "alpha").double()
    outside = delta - delta @ basis @ basis.T  # Delta P_perp, summed over the 3 updates
    assert float(outside.norm()) < 1e-5 * float(delta.norm())  # float32 deltas
    # control: MEMIT's deltas are not confined to the null space
    run_config(tmp_path, "memit", "algorithm=memit")
    memit = saved_delta(tmp_path, "memit").double()
    assert float((memit - memit @ basis @ basis.T).norm()) > 1e-2 * float(memit.norm())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm=rome", "batch_size=1", "sequential.keep_edits=true"], "keep_edits=true needs"),
        (["sequential.keep_edits=maybe"], "keep_edits='maybe'; expected true or false"),
        (
            ["algorithm=alphaedit", "model.hparams.alphaedit.nullspace_threshold=null"],
            "nullspace_threshold=None; expected a float > 0",
        ),
        (
            ["algorithm=alphaedit", "model.hparams.alphaedit.nullspace_threshold=-1"],
            "nullspace_threshold=-1; expected a float > 0",
        ),
    ],
)
def test_bad_remedy_settings_fail_with_one_clear_line(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        run_settings(compose_config(*RUN_FAST, *overrides))


def test_keep_edits_defaults_per_algorithm_and_applies_to_sequential_runs_only() -> None:
    def settings(*overrides):
        return run_settings(compose_config(*RUN_FAST, *overrides))

    assert settings("algorithm=memit").keep_edits is False
    assert settings("algorithm=emmet", "sequential.keep_edits=true").keep_edits is True
    assert settings("algorithm=alphaedit").keep_edits is True
    assert settings("algorithm=alphaedit").nullspace_threshold == 1e-4
    assert settings("algorithm=alphaedit", "mode=singular").keep_edits is False
    assert (
        settings("algorithm=memit", "mode=batch", "sequential.keep_edits=true").keep_edits is False
    )
