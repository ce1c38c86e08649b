"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of C0.

P = U U^T projects onto the eigenvectors U (d_k x r) of C0 whose eigenvalues are below
``nullspace_threshold``: directions that the keys of ordinary text (almost) never take, so an
update Delta = Delta~ P leaves W's output on them unchanged (Delta C0 Delta^T <= threshold
||Delta||^2). Dropping the then vanishing preservation term, the update for batch K, V after
earlier edits with keys K_past minimises (the paper's sequential objective)

    ||(W + Delta~ P) K - V||_F^2 + alpha ||Delta~ P||_F^2 + ||Delta~ P K_past||_F^2,

whose solution is

    Delta = Delta~ P = R K^T P (K_past K_past^T P + K K^T P + alpha I)^{-1},    R = V - W K.

It is computed in the r-dimensional null space: Delta = Y U^T with

    Y (U^T (K K^T + K_past K_past^T) U + alpha I_r) = R K^T U,

the same matrix (Delta solves X (A P + alpha I) = R K^T P, A = K K^T + K_past K_past^T, and
alpha X = (R K^T - X A) P gives X = X P, so X = (X U) U^T with X U = Y), but an r x r
symmetric positive definite solve, and Delta (I - P) = 0 holds to rounding because Delta's
rows lie in span(U) by construction. K_past K_past^T is the running sum kept in ``PastKeys``.

The paper writes the regulariser as ||Delta~ P||^2 (alpha = 1); its public code weighs it
with the hyperparameter ``L2`` (10 for Llama3-8B, GPT-J, GPT2-XL) and thresholds the
eigenvalues of the mean second moment E[k k^T] at 2e-2; this module takes alpha as the run's
``lambda`` and the threshold as ``model.hparams.alphaedit.nullspace_threshold``.

With no earlier keys and no projection (a threshold above every eigenvalue, P = I) this is
Delta = R K^T (K K^T + alpha I)^{-1}: MEMIT with lambda = alpha and C0 = I.
"""

from __future__ import annotations

import torch

from editexp.editing.linalg import (
    MAX_EXACT_SOLVE_CONDITION,
    CovarianceFactor,
    EditingError,
    PastKeys,
    SolveParams,
    check_finite,
    check_lambda,
    check_past,
    cholesky_lower,
    condition_lower_bound,
    has_past,
    prepare_batch,
)


def alphaedit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    alpha: float,
    nullspace_threshold: float,
    past: PastKeys | None = None,
) -> torch.Tensor:
    """AlphaEdit's update Delta (d_v, d_k), float64, for keys (d_k, E) and residuals (d_v, E).

    ``alpha`` weighs the regulariser ||Delta||^2; ``nullspace_threshold`` selects the
    eigenvectors of C0 that span the update's rows; ``past`` holds the earlier keys.
    """
    alpha = check_lambda(alpha, "AlphaEdit")
    keys, residuals = prepare_batch(keys, residuals, covariance, "AlphaEdit")
    check_past(past, covariance, "AlphaEdit")
    basis = covariance.null_space(nullspace_threshold)  # U, (d_k, r)
    rank = basis.shape[1]
    if rank == 0:
        smallest = float(covariance.eigenvalues()[0])
        raise EditingError(
            f"AlphaEdit: no eigenvalue of C0 is below nullspace_threshold="
            f"{nullspace_threshold:g} (the smallest is {smallest:.3g}), so the null space is "
            "empty and no update is possible; raise model.hparams.alphaedit.nullspace_threshold"
        )
    projected_keys = basis.T @ keys  # U^T K, (r, E)
    system = projected_keys @ projected_keys.T  # U^T K K^T U, (r, r)
    n_keys = keys.shape[1]
    if has_past(past):
        past_gram = past.gram.to(basis.device)
        system += basis.T @ past_gram @ basis  # + U^T K_past K_past^T U
        n_keys += past.count
    system = 0.5 * (system + system.T)
    system.diagonal().add_(alpha)
    factor = cholesky_lower(system)
    if alpha == 0.0:
        condition = float("inf") if factor is None else condition_lower_bound(system, factor)
        if condition > MAX_EXACT_SOLVE_CONDITION:
            raise EditingError(
                f"AlphaEdit with lambda (alpha) = 0 needs U^T K K^T U invertible on the "
                f"{rank}-dimensional null space, i.e. at least {rank} independent keys there, "
                f"got E={n_keys} keys (new and earlier); use lambda > 0 (AlphaEdit's code: 10)"
            )
    elif factor is None:
        raise EditingError(
            f"AlphaEdit: the projected system is not numerically positive definite at "
            f"lambda={alpha:g}; increase lambda"
        )
    coefficients = torch.cholesky_solve(projected_keys @ residuals.T, factor).T  # Y, (d_v, r)
    delta = coefficients @ basis.T  # Y U^T, (d_v, d_k)
    check_finite(delta, "AlphaEdit update")
    return delta


def solve(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor, params: SolveParams
) -> torch.Tensor:
    """AlphaEdit's update for the registry (:class:`editexp.algorithms.Algorithm`)."""
    return alphaedit_delta(
        keys, residuals, covariance, params.lam, params.nullspace_threshold, params.past
    )
