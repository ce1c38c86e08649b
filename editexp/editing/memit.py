"""MEMIT: a least-squares update for a batch of facts, trading memorisation for preservation.

MEMIT minimises  lambda tr(Delta C0 Delta^T) + ||(W + Delta) K - V||_F^2,  whose solution is

    Delta = R K^T (lambda C0 + K K^T)^{-1},    R = V - W K.

With ``keep_edits`` in a sequential run, the keys K_past of every earlier update join the
preservation term, so that W keeps mapping them to what it outputs for them now (the earlier
edits): the objective gains ||Delta K_past||_F^2 and

    Delta = R K^T (lambda C0 + K_past K_past^T + K K^T)^{-1},

where K_past K_past^T is the running sum kept in ``PastKeys`` (d_k x d_k, whatever the number
of edits). Without earlier keys it is plain MEMIT.

The symmetric matrix A = lambda C0 [+ K_past K_past^T] + K K^T is Cholesky-factored and solved
against, as Delta^T = A^{-1} K R^T; no inverse is formed. With lambda = 0, A must be invertible
by itself, which needs at least d_k linearly independent keys (new and earlier together).
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


def memit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    lam: float,
    past: PastKeys | None = None,
) -> torch.Tensor:
    """MEMIT's update Delta (d_v, d_k), float64, for keys (d_k, E) and residuals (d_v, E);
    ``past`` adds the earlier updates' keys to the preservation term."""
    lam = check_lambda(lam, "MEMIT")
    keys, residuals = prepare_batch(keys, residuals, covariance, "MEMIT")
    check_past(past, covariance, "MEMIT")
    n_keys = keys.shape[1]
    # lambda C0 + K K^T, (d_k, d_k), in one allocation; Cholesky reads only its lower triangle
    system = torch.addmm(covariance.matrix, keys, keys.T, beta=lam)
    if has_past(past):
        system += past.gram.to(system.device)  # + K_past K_past^T
        n_keys += past.count
    factor = cholesky_lower(system)
    if lam == 0.0:
        singular = factor is None
        if not singular:
            condition = condition_lower_bound(system, factor)
            singular = condition > MAX_EXACT_SOLVE_CONDITION
        if singular:
            raise EditingError(
                f"MEMIT with lambda=0 needs K K^T invertible, i.e. at least d_k={covariance.dim} "
                f"linearly independent keys, got E={n_keys} keys whose K K^T is singular; "
                "use lambda > 0 (the paper tunes lambda in 1 .. 1e6)"
            )
    elif factor is None:
        raise EditingError(
            f"MEMIT: lambda C0 + K K^T is not numerically positive definite at lambda={lam:g}; "
            "increase lambda"
        )
    delta = torch.cholesky_solve(keys @ residuals.T, factor).T  # (A^{-1} K R^T)^T
    check_finite(delta, "MEMIT update")
    return delta


def solve(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor, params: SolveParams
) -> torch.Tensor:
    """MEMIT's update for the registry (:class:`editexp.algorithms.Algorithm`)."""
    return memit_delta(keys, residuals, covariance, params.lam, params.past)
