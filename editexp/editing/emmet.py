"""EMMET: ROME's equality-constrained update extended to a batch of facts.

With epsilon = 0 EMMET solves  min tr(Delta C0 Delta^T)  subject to  (W + Delta) K = V;
with epsilon > 0 (the paper's "lambda") the Gram matrix is regularised:

    Delta = R (K^T C0^{-1} K + epsilon I)^{-1} K^T C0^{-1},    R = V - W K.

For epsilon > 0 this is the exact minimiser of  epsilon tr(Delta C0 Delta^T) + ||Delta K - R||_F^2,
i.e. MEMIT with lambda = epsilon (Woodbury identity). The E x E system is Cholesky-factored;
C0 is solved with the per-layer ``CovarianceFactor``. With epsilon = 0 the Gram matrix
K^T C0^{-1} K must be invertible: fewer than d_k facts, no duplicate or dependent keys (at
E = d_k the constraints pin Delta down completely and the update degenerates); above a
condition number of 1e8 it is close to singular and a warning suggests lambda > 0.

With ``keep_edits`` in a sequential run, the earlier updates' keys join the equality
constraints: Delta K_past = 0, so W keeps mapping them to what it outputs for them now. Only
K_past K_past^T = B B^T is kept (``PastKeys``), and Delta K_past = 0 <=> Delta B = 0 with
B = U diag(sqrt(eigenvalues)) (d_k x r, r = its rank <= d_k), so the constraint keys are
[K, B] with residuals [R, 0]:

    Delta = [R, 0] (G + epsilon I)^{-1} [K, B]^T C0^{-1},    G = [K, B]^T C0^{-1} [K, B],

which for epsilon > 0 equals MEMIT with keep_edits at lambda = epsilon (Woodbury again).
Past d_k (E + r > d_k, when epsilon = 0 the constraints can no longer all hold) the earlier
keys move into the preservation term instead, each weighing as much as the whole corpus mean:

    Delta = R (K^T C^{-1} K)^{-1} K^T C^{-1},    C = C0 + K_past K_past^T.
"""

from __future__ import annotations

import logging

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
    duplicate_columns,
    has_past,
    prepare_batch,
)

log = logging.getLogger(__name__)

# cond(K^T C0^-1 K) above which EMMET with lambda = 0 warns that its update is ill-conditioned.
WARN_GRAM_CONDITION = 1e8


def _check_exact_constraints_possible(keys: torch.Tensor, dim: int) -> None:
    """Fail early when (W + Delta) K = V cannot be imposed exactly (EMMET with lambda=0)."""
    n_keys = keys.shape[1]
    if n_keys >= dim:
        raise EditingError(
            f"EMMET with lambda=0 needs fewer than d_k={dim} facts per batch, got E={n_keys}; "
            "use lambda > 0, e.g. 1e-4"
        )
    duplicates = duplicate_columns(keys)
    if duplicates:
        listed = "; ".join(", ".join(str(column) for column in group) for group in duplicates)
        raise EditingError(
            f"EMMET with lambda=0 cannot satisfy equality constraints for duplicate keys: "
            f"key columns {listed} are identical (the same subject twice?); deduplicate the "
            "batch or use lambda > 0, e.g. 1e-4"
        )


def _rayleigh_largest(matrix: torch.Tensor, steps: int = 16) -> float:
    """A lower bound on the largest eigenvalue of an SPD matrix (power iteration, a few
    matrix-vector products): sharpens ``condition_lower_bound``, which uses max_i A_ii."""
    vector = torch.ones(matrix.shape[0], 1, dtype=matrix.dtype, device=matrix.device)
    for _ in range(steps):
        vector = matrix @ vector
        vector = vector / torch.linalg.vector_norm(vector)
    return float(vector.T @ matrix @ vector)


def emmet_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    lam: float,
    past: PastKeys | None = None,
) -> torch.Tensor:
    """EMMET's update Delta (d_v, d_k), float64; ``lam`` is epsilon, 0 = exact constraints;
    ``past`` adds the earlier updates' keys as constraints Delta K_past = 0."""
    lam = check_lambda(lam, "EMMET")
    keys, residuals = prepare_batch(keys, residuals, covariance, "EMMET")
    check_past(past, covariance, "EMMET")
    if lam == 0.0:
        _check_exact_constraints_possible(keys, covariance.dim)
    if not has_past(past):
        return _constrained_delta(keys, residuals, covariance, lam, n_past=0)
    basis = past.factor()  # B (d_k, r), B B^T = K_past K_past^T
    if lam == 0.0 and keys.shape[1] + basis.shape[1] > covariance.dim:
        preserved = CovarianceFactor(covariance.matrix + past.gram)  # C0 + K_past K_past^T
        return _constrained_delta(keys, residuals, preserved, 0.0, n_past=0)
    constraint_keys = torch.cat([keys, basis.to(keys.device)], dim=1)  # [K, B], (d_k, E + r)
    targets = torch.cat([residuals, residuals.new_zeros(residuals.shape[0], basis.shape[1])], 1)
    return _constrained_delta(constraint_keys, targets, covariance, lam, n_past=basis.shape[1])


def _constrained_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    lam: float,
    n_past: int,
) -> torch.Tensor:
    """R (K^T C^{-1} K + lam I)^{-1} K^T C^{-1}; the last ``n_past`` columns are earlier keys."""
    whitened_keys = covariance.solve(keys)  # C0^{-1} K, (d_k, E)
    gram = keys.T @ whitened_keys  # K^T C0^{-1} K, (E, E)
    gram = 0.5 * (gram + gram.T)
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor = cholesky_lower(system)
    if lam == 0.0:
        condition = float("inf") if factor is None else condition_lower_bound(system, factor)
        if condition > MAX_EXACT_SOLVE_CONDITION:
            also = " or lie in the span of earlier edits' keys" if n_past else ""
            raise EditingError(
                "EMMET with lambda=0: the Gram matrix K^T C0^-1 K is numerically singular "
                f"(condition number >= {condition:.3g}): some keys are (nearly) linearly "
                f"dependent{also}, e.g. the same subject twice; use lambda > 0, e.g. 1e-4"
            )
        condition *= max(1.0, _rayleigh_largest(system) / float(system.diagonal().max()))
        if condition > WARN_GRAM_CONDITION:
            log.warning(
                "EMMET with lambda=0: K^T C0^-1 K has condition number >= %.3g (> %.0e) for %d "
                "facts (%d earlier keys) with d_k=%d; the update may be far larger than needed, "
                "consider lambda > 0 (e.g. 1e-4)",
                condition,
                WARN_GRAM_CONDITION,
                keys.shape[1] - n_past,
                n_past,
                covariance.dim,
            )
    elif factor is None:
        raise EditingError(
            f"EMMET: K^T C0^-1 K + lambda I is not numerically positive definite at "
            f"lambda={lam:g}; increase lambda"
        )
    # Delta = R S^{-1} (C0^{-1} K)^T with S symmetric, computed as (C0^{-1} K (S^{-1} R^T))^T.
    delta = (whitened_keys @ torch.cholesky_solve(residuals.T, factor)).T
    check_finite(delta, "EMMET update")
    return delta


def solve(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor, params: SolveParams
) -> torch.Tensor:
    """EMMET's update for the registry (:class:`editexp.algorithms.Algorithm`)."""
    return emmet_delta(keys, residuals, covariance, params.lam, params.past)
