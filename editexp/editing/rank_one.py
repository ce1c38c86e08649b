"""Singular edits as rank-one updates: each fact's own update, all solved together.

For one fact (key k, residual r = v* - W k) the update of an algorithm whose record has
``rank_one`` (:mod:`editexp.algorithms`) is

    Delta = r w^T,    w = C0^{-1} k / (lambda + k^T C0^{-1} k),

- ROME (no lambda): lambda = 0, its closed form (``rome.py``);
- MEMIT with one key: (lambda C0 + k k^T)^{-1} k = C0^{-1} k / (lambda + k^T C0^{-1} k)
  (Sherman-Morrison), so ``memit_delta`` = r w^T; lambda = 0 is refused, as ``memit_delta``
  refuses it (k k^T is singular);
- EMMET with one key: r (k^T C0^{-1} k + eps)^{-1} k^T C0^{-1} = r w^T with lambda = eps
  (eps = 0 is ROME).

Any other algorithm (AlphaEdit) is solved per fact with its own closed form, whose one-fact
update is r w^T as well: w = Delta^T r / (r^T r), checked to be exact.

:func:`singular_updates` solves all E updates with one C0 solve; :class:`editexp.row_edits.RowEdits`
applies them per batch row.
"""

from __future__ import annotations

import math

import torch

from editexp.algorithms import Algorithm
from editexp.editing.linalg import (
    CovarianceFactor,
    EditingError,
    SolveParams,
    check_lambda,
    prepare_batch,
)
from editexp.editing.solvers import algorithm_of, closed_form_delta
from editexp.row_edits import RankOneEdits

RANK_ONE_TOLERANCE = 1e-6  # relative: ||Delta - r w^T|| / ||Delta|| of a one-fact update


def singular_updates(
    algorithm: str | Algorithm,
    layer: int,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    params: SolveParams,
) -> RankOneEdits:
    """Each fact's own update (solved alone), for keys (d_k, E) and residuals (d_v, E).

    Algorithms with a rank-one form: float64, one C0 solve for all E keys; stored in float32.
    Fails as the one-fact closed forms fail (missing lambda, lambda = 0 where the one-key
    system is singular, degenerate keys).
    """
    record = algorithm_of(algorithm)
    if not record.rank_one:
        return _factored_one_by_one(record, layer, keys, residuals, covariance, params)
    lam = _rank_one_lambda(record, params.lam, covariance.dim)
    keys, residuals = prepare_batch(keys, residuals, covariance, record.title)
    whitened = covariance.solve(keys)  # C0^{-1} K, (d_k, E)
    denominators = (keys * whitened).sum(dim=0) + lam  # lambda + k_i^T C0^{-1} k_i, (E,)
    bad = [(i, float(d)) for i, d in enumerate(denominators) if not (math.isfinite(d) and d > 0)]
    if bad:
        raise EditingError(
            f"{record.title}: lambda + k^T C0^-1 k is not a positive finite number for facts "
            f"{[i for i, _ in bad]} (values {[d for _, d in bad]}); zero or degenerate keys?"
        )
    right = (whitened / denominators).T  # (E, d_k)
    return RankOneEdits(layer=layer, left=residuals.T.float().cpu(), right=right.float().cpu())


def _rank_one_lambda(record: Algorithm, lam: float | None, dim: int) -> float:
    """The lambda of w = C0^-1 k / (lambda + k^T C0^-1 k) for ``record``."""
    if not record.takes_lambda:
        return 0.0
    if lam is None:
        raise EditingError(f"{record.name} needs lambda (got null); set lambda=<float>")
    lam = check_lambda(lam, record.title)
    if lam == 0.0 and not record.exact_at_zero_lambda:
        raise EditingError(
            f"{record.title} with lambda=0 needs K K^T invertible, i.e. at least d_k={dim} "
            "linearly independent keys, got E=1 key per singular edit; use lambda > 0 "
            "(the paper tunes lambda in 1 .. 1e6)"
        )
    return lam


def _factored_one_by_one(
    record: Algorithm,
    layer: int,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    params: SolveParams,
) -> RankOneEdits:
    """Each fact's update from the algorithm's closed form, factored as r w^T."""
    lefts, rights = [], []
    for column in range(keys.shape[1]):
        residual = residuals[:, column : column + 1].double()
        delta = closed_form_delta(
            record, keys[:, column : column + 1], residual, covariance, params
        )
        residual = residual.squeeze(1).to(delta.device)
        squared = residual.dot(residual)
        right = delta.T @ residual / squared if squared > 0 else torch.zeros_like(delta[0])
        error = torch.linalg.matrix_norm(delta - torch.outer(residual, right))
        if error > RANK_ONE_TOLERANCE * torch.linalg.matrix_norm(delta):
            raise EditingError(
                f"{record.title}: the update of fact {column} is not r w^T (relative error "
                f"{float(error / torch.linalg.matrix_norm(delta)):.2g}); singular mode cannot "
                "apply it per row"
            )
        lefts.append(residual.float().cpu())
        rights.append(right.float().cpu())
    return RankOneEdits(layer=layer, left=torch.stack(lefts), right=torch.stack(rights))
