"""Closed-form updates (ROME, MEMIT, EMMET) against their defining properties.

Every test checks a property that a wrong formula breaks: exact constraints, optimality
(zero gradient / no better feasible update), the Woodbury identity between MEMIT and EMMET,
and the error paths. Negative controls show the checks are sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from editexp.editing.emmet import emmet_delta
from editexp.editing.linalg import CovarianceFactor, EditingError, check_finite
from editexp.editing.memit import memit_delta
from editexp.editing.rome import rome_delta

LAMBDAS = [1e-4, 1e-2, 1.0, 10.0, 1e3]


@dataclass
class EditProblem:
    weight: torch.Tensor  # W (d_v, d_k)
    keys: torch.Tensor  # K (d_k, E)
    values: torch.Tensor  # V (d_v, E)
    second_moment: torch.Tensor  # C0 (d_k, d_k)
    covariance: CovarianceFactor

    @property
    def residuals(self) -> torch.Tensor:
        return self.values - self.weight @ self.keys


def make_problem(seed: int, d_k: int = 32, d_v: int = 16, n_facts: int = 8) -> EditProblem:
    """Random W, K, V and C0 = mean of k k^T over correlated random keys (float64)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    mixing = randn(d_k, d_k) / d_k**0.5 + torch.eye(d_k, dtype=torch.float64)
    corpus_keys = mixing @ randn(d_k, 6 * d_k)
    second_moment = corpus_keys @ corpus_keys.T / corpus_keys.shape[1]
    keys = mixing @ randn(d_k, n_facts)
    return EditProblem(
        weight=randn(d_v, d_k),
        keys=keys,
        values=randn(d_v, n_facts) * 3.0,
        second_moment=second_moment,
        covariance=CovarianceFactor(second_moment),
    )


def preservation_cost(delta: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """tr(Delta C0 Delta^T): how much the update changes outputs on ordinary keys."""
    return torch.trace(delta @ second_moment @ delta.T)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def null_space_perturbation(keys: torch.Tensor, d_v: int, seed: int) -> torch.Tensor:
    """A random N (d_v, d_k) with N K = 0: rows projected onto the complement of span(K)."""
    generator = torch.Generator().manual_seed(seed)
    d_k = keys.shape[0]
    basis, _ = torch.linalg.qr(keys)
    projector = torch.eye(d_k, dtype=torch.float64) - basis @ basis.T
    return torch.randn(d_v, d_k, generator=generator, dtype=torch.float64) @ projector


# ---------------------------------------------------------------- CovarianceFactor


def test_covariance_solve_matches_linalg_solve() -> None:
    problem = make_problem(0)
    rhs_matrix = problem.keys
    rhs_vector = problem.keys[:, 0]
    expected_matrix = torch.linalg.solve(problem.second_moment, rhs_matrix)
    expected_vector = torch.linalg.solve(problem.second_moment, rhs_vector)
    solved_matrix = problem.covariance.solve(rhs_matrix)
    solved_vector = problem.covariance.solve(rhs_vector)
    assert solved_matrix.dtype == torch.float64 and solved_matrix.shape == rhs_matrix.shape
    assert solved_vector.shape == rhs_vector.shape
    assert relative_error(solved_matrix, expected_matrix) < 1e-10
    assert relative_error(solved_vector, expected_vector) < 1e-10
    assert problem.covariance.dim == 32
    # stored symmetrised in float64: equal up to rounding
    assert torch.allclose(problem.covariance.matrix, problem.second_moment, rtol=0, atol=1e-14)


def test_covariance_factor_is_computed_once_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real_cholesky_ex = torch.linalg.cholesky_ex
    real_cholesky = torch.linalg.cholesky

    def counting_cholesky_ex(matrix: torch.Tensor, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return real_cholesky_ex(matrix, *args, **kwargs)

    def counting_cholesky(matrix: torch.Tensor, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return real_cholesky(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_cholesky_ex)
    monkeypatch.setattr(torch.linalg, "cholesky", counting_cholesky)
    problem = make_problem(1, d_k=24, n_facts=4)
    assert calls == [(24, 24)]  # C0 factored once, at construction
    for _ in range(5):
        problem.covariance.solve(problem.keys)
    rome_delta(problem.keys[:, :1], problem.residuals[:, :1], problem.covariance)
    assert calls == [(24, 24)]  # solves and ROME reuse the factor
    for lam in (0.0, 1e-3, 1.0):
        emmet_delta(problem.keys, problem.residuals, problem.covariance, lam)
    # each EMMET call factors only its own E x E Gram system, never C0 again
    assert calls == [(24, 24)] + [(4, 4)] * 3


# ---------------------------------------------------------------- exact constraints


def test_rome_satisfies_its_constraint() -> None:
    problem = make_problem(2, d_k=40, d_v=20, n_facts=1)
    delta = rome_delta(problem.keys, problem.residuals, problem.covariance)
    assert delta.shape == (20, 40) and delta.dtype == torch.float64
    edited_output = (problem.weight + delta) @ problem.keys
    assert torch.allclose(edited_output, problem.values, atol=1e-9, rtol=0)
    assert torch.linalg.matrix_rank(delta) == 1


@pytest.mark.parametrize("n_facts", [1, 5, 16, 31])  # E = d_k = 32 is refused
def test_emmet_exact_satisfies_all_constraints(n_facts: int) -> None:
    problem = make_problem(3, d_k=32, d_v=12, n_facts=n_facts)
    delta = emmet_delta(problem.keys, problem.residuals, problem.covariance, 0.0)
    edited_output = (problem.weight + delta) @ problem.keys
    assert torch.allclose(edited_output, problem.values, atol=1e-9, rtol=0)


def test_emmet_exact_with_one_fact_equals_rome() -> None:
    problem = make_problem(4, d_k=48, d_v=24, n_facts=1)
    rome = rome_delta(problem.keys, problem.residuals, problem.covariance)
    emmet = emmet_delta(problem.keys, problem.residuals, problem.covariance, 0)
    assert relative_error(emmet, rome) < 1e-10


@pytest.mark.parametrize("lam", LAMBDAS)
def test_emmet_equals_memit_for_the_same_lambda(lam: float) -> None:
    # Woodbury: R K^T (lam C0 + K K^T)^-1 == R (K^T C0^-1 K + lam I)^-1 K^T C0^-1.
    problem = make_problem(5, d_k=32, d_v=16, n_facts=12)
    memit = memit_delta(problem.keys, problem.residuals, problem.covariance, lam)
    emmet = emmet_delta(problem.keys, problem.residuals, problem.covariance, lam)
    assert relative_error(emmet, memit) < 1e-8


def test_memit_and_emmet_differ_for_different_lambdas() -> None:
    # control for the identity test: the comparison is sensitive to lambda
    problem = make_problem(5, d_k=32, d_v=16, n_facts=12)
    memit = memit_delta(problem.keys, problem.residuals, problem.covariance, 1.0)
    emmet = emmet_delta(problem.keys, problem.residuals, problem.covariance, 1.1)
    assert relative_error(emmet, memit) > 1e-3


# ---------------------------------------------------------------- optimality


def objective_gradient(
    delta: torch.Tensor, problem: EditProblem, lam: float
) -> tuple[torch.Tensor, float]:
    """Gradient (autograd) of lam tr(D C0 D^T) + ||(W + D) K - V||_F^2 at D, and its scale.

    In terms of W' = W + D this is MEMIT's objective J(W') = lam tr((W'-W) C0 (W'-W)^T)
    + ||W' K - V||_F^2; the gradient in W' equals the gradient in D.
    """
    edited_weight = (problem.weight + delta).clone().requires_grad_(True)
    change = edited_weight - problem.weight
    objective = lam * torch.trace(change @ problem.second_moment @ change.T) + torch.sum(
        (edited_weight @ problem.keys - problem.values) ** 2
    )
    (gradient,) = torch.autograd.grad(objective, edited_weight)
    scale = float(torch.linalg.norm(problem.residuals @ problem.keys.T))
    return gradient, scale


@pytest.mark.parametrize("lam", [*LAMBDAS, 0.0])
def test_memit_zeroes_the_gradient_of_its_objective(lam: float) -> None:
    # lambda = 0 is plain least squares; it needs K K^T invertible, so E > d_k there.
    n_facts = 48 if lam == 0.0 else 10
    problem = make_problem(6, d_k=24, d_v=16, n_facts=n_facts)
    delta = memit_delta(problem.keys, problem.residuals, problem.covariance, lam)
    gradient, scale = objective_gradient(delta, problem, lam)
    assert float(torch.linalg.norm(gradient)) < 1e-9 * scale
    # control: a slightly different update does not zero the gradient
    gradient, scale = objective_gradient(delta * 1.01, problem, lam)
    assert float(torch.linalg.norm(gradient)) > 1e-4 * scale


@pytest.mark.parametrize("lam", LAMBDAS)
def test_emmet_zeroes_the_gradient_of_its_own_objective(lam: float) -> None:
    # Derived directly, not via MEMIT: EMMET(eps) solves Delta (K^T C0^-1 K + eps I) ... ; the
    # function eps tr(D C0 D^T) + ||D K - R||^2 has gradient 2 eps D C0 + 2 (D K - R) K^T, zero
    # iff D (eps C0 + K K^T) = R K^T. Substituting D = R S^-1 K^T C0^-1 (S = K^T C0^-1 K + eps I)
    # gives R S^-1 (eps K^T + K^T C0^-1 K K^T) = R S^-1 S K^T = R K^T. So EMMET(eps) is the exact
    # minimiser of that objective; we check the zero gradient with autograd.
    problem = make_problem(7, d_k=24, d_v=16, n_facts=10)
    delta = emmet_delta(problem.keys, problem.residuals, problem.covariance, lam)
    gradient, scale = objective_gradient(delta, problem, lam)
    assert float(torch.linalg.norm(gradient)) < 1e-9 * scale


@pytest.mark.parametrize("algorithm", ["rome", "emmet"])
def test_exact_updates_minimise_preservation_cost_among_feasible_updates(algorithm: str) -> None:
    n_facts = 1 if algorithm == "rome" else 9
    problem = make_problem(8, d_k=32, d_v=16, n_facts=n_facts)
    if algorithm == "rome":
        delta = rome_delta(problem.keys, problem.residuals, problem.covariance)
    else:
        delta = emmet_delta(problem.keys, problem.residuals, problem.covariance, 0.0)
    best_cost = float(preservation_cost(delta, problem.second_moment))
    for seed in range(5):
        perturbation = null_space_perturbation(problem.keys, 16, seed)
        assert torch.allclose(
            perturbation @ problem.keys, torch.zeros(16, n_facts, dtype=torch.float64), atol=1e-9
        )
        # first-order optimality: the cross term tr(Delta C0 N^T) vanishes for every feasible N
        cross_term = float(torch.trace(delta @ problem.second_moment @ perturbation.T))
        cross_scale = float(
            torch.linalg.norm(delta @ problem.second_moment) * torch.linalg.norm(perturbation)
        )
        assert abs(cross_term) < 1e-10 * cross_scale
        for step in (1e-4, 1e-1, 10.0):
            cost = float(preservation_cost(delta + step * perturbation, problem.second_moment))
            assert cost > best_cost
    # control: the minimum-Frobenius-norm feasible update R (K^T K)^-1 K^T is feasible but
    # ignores C0, so it must cost more
    gram = problem.keys.T @ problem.keys
    naive = problem.residuals @ torch.linalg.solve(gram, problem.keys.T)
    assert torch.allclose((problem.weight + naive) @ problem.keys, problem.values, atol=1e-9)
    assert float(preservation_cost(naive, problem.second_moment)) > best_cost * (1 + 1e-6)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("low_precision", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_float64_matching_float64_computation(
    low_precision: torch.dtype,
) -> None:
    problem = make_problem(9, d_k=16, d_v=12, n_facts=4)
    keys = problem.keys.to(low_precision)
    residuals = problem.residuals.to(low_precision)
    covariance = CovarianceFactor(problem.second_moment.to(torch.float32))
    reference_covariance = CovarianceFactor(problem.second_moment.to(torch.float32).double())
    cases = [
        (lambda k, r, c: rome_delta(k[:, :1], r[:, :1], c)),
        (lambda k, r, c: memit_delta(k, r, c, 10.0)),
        (lambda k, r, c: emmet_delta(k, r, c, 0.0)),
        (lambda k, r, c: emmet_delta(k, r, c, 1e-2)),
    ]
    for update in cases:
        delta = update(keys, residuals, covariance)
        reference = update(keys.double(), residuals.double(), reference_covariance)
        assert delta.dtype == torch.float64
        assert relative_error(delta, reference) < 1e-12
    assert covariance.matrix.dtype == torch.float64


# ---------------------------------------------------------------- errors


def test_emmet_exact_with_more_facts_than_key_dimension_fails_and_suggests_lambda() -> None:
    problem = make_problem(10, d_k=16, d_v=12, n_facts=20)
    with pytest.raises(EditingError, match=r"d_k=16.*E=20.*lambda > 0"):
        emmet_delta(problem.keys, problem.residuals, problem.covariance, 0.0)
    delta = emmet_delta(problem.keys, problem.residuals, problem.covariance, 1e-4)
    assert bool(torch.isfinite(delta).all())


def test_emmet_exact_with_duplicate_keys_names_the_columns() -> None:
    problem = make_problem(11, d_k=24, d_v=12, n_facts=8)
    keys = problem.keys.clone()
    keys[:, 6] = keys[:, 2]
    with pytest.raises(EditingError, match=r"duplicate.*2, 6.*lambda > 0"):
        emmet_delta(keys, problem.residuals, problem.covariance, 0.0)
    delta = emmet_delta(keys, problem.residuals, problem.covariance, 1e-3)
    assert bool(torch.isfinite(delta).all())


def test_emmet_exact_with_dependent_keys_reports_singular_gram() -> None:
    problem = make_problem(12, d_k=24, d_v=12, n_facts=6)
    keys = problem.keys.clone()
    keys[:, 5] = keys[:, 0] + 2.0 * keys[:, 3]
    with pytest.raises(EditingError, match=r"Gram.*singular.*lambda > 0"):
        emmet_delta(keys, problem.residuals, problem.covariance, 0.0)


def test_memit_without_lambda_and_too_few_keys_fails_clearly() -> None:
    problem = make_problem(13, d_k=24, d_v=12, n_facts=6)
    with pytest.raises(EditingError, match=r"lambda=0.*K K\^T.*d_k=24.*E=6"):
        memit_delta(problem.keys, problem.residuals, problem.covariance, 0.0)


@pytest.mark.parametrize("target", ["keys", "residuals"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_inputs_are_rejected(target: str, bad_value: float) -> None:
    problem = make_problem(14, d_k=16, d_v=12, n_facts=3)
    keys, residuals = problem.keys.clone(), problem.residuals.clone()
    (keys if target == "keys" else residuals)[1, 0] = bad_value
    for update in (
        lambda: rome_delta(keys[:, :1], residuals[:, :1], problem.covariance),
        lambda: memit_delta(keys, residuals, problem.covariance, 1.0),
        lambda: emmet_delta(keys, residuals, problem.covariance, 0.0),
    ):
        with pytest.raises(EditingError, match=rf"{target} contains NaN/Inf"):
            update()


def _rank_deficient_second_moment() -> torch.Tensor:
    few_tokens = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return few_tokens @ few_tokens.T / 8


@pytest.mark.parametrize(
    ("second_moment", "message"),
    [
        (torch.diag(torch.tensor([1.0, 2.0, -0.5, 3.0])), "not positive definite"),
        (_rank_deficient_second_moment(), "more tokens"),
        (torch.eye(4) + torch.triu(torch.ones(4, 4), diagonal=1), "not symmetric"),
        (torch.ones(4, 5), "square"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN"),
    ],
)
def test_invalid_second_moment_is_rejected(second_moment: torch.Tensor, message: str) -> None:
    with pytest.raises(EditingError, match=message):
        CovarianceFactor(second_moment)


def test_shape_mismatches_name_the_shapes() -> None:
    problem = make_problem(15, d_k=16, d_v=12, n_facts=4)
    with pytest.raises(EditingError, match=r"d_k=15.*\(15, 4\).*16 x 16"):
        memit_delta(problem.keys[:15], problem.residuals, problem.covariance, 1.0)
    with pytest.raises(EditingError, match=r"\(16, 4\).*\(12, 3\).*same number of columns"):
        emmet_delta(problem.keys, problem.residuals[:, :3], problem.covariance, 0.0)
    with pytest.raises(EditingError, match=r"\(16,\) or \(16, n\)"):
        problem.covariance.solve(torch.ones(15))


@pytest.mark.parametrize("lam", [-1.0, -1e-9, float("nan"), float("inf")])
def test_invalid_lambda_is_rejected(lam: float) -> None:
    problem = make_problem(16, d_k=16, d_v=12, n_facts=4)
    for update in (memit_delta, emmet_delta):
        with pytest.raises(EditingError, match="lambda must be finite and >= 0"):
            update(problem.keys, problem.residuals, problem.covariance, lam)


def test_rome_with_two_keys_points_to_batch_algorithms() -> None:
    problem = make_problem(17, d_k=16, d_v=12, n_facts=2)
    with pytest.raises(EditingError, match=r"one fact.*E=2.*batch_size=1.*AlphaEdit"):
        rome_delta(problem.keys, problem.residuals, problem.covariance)


def test_rome_with_zero_key_is_rejected() -> None:
    problem = make_problem(18, d_k=16, d_v=12, n_facts=1)
    with pytest.raises(EditingError, match=r"k\^T C0\^-1 k"):
        rome_delta(torch.zeros(16, 1), problem.residuals, problem.covariance)


def test_check_finite_refuses_to_write() -> None:
    check_finite(torch.ones(3), "update")
    with pytest.raises(EditingError, match="update contains NaN/Inf.*refusing to write"):
        check_finite(torch.tensor([1.0, float("inf")]), "update")
