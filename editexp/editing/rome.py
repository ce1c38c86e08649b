"""ROME: a rank-one update that makes W map one key exactly to its value.

ROME solves  min tr(Delta C0 Delta^T)  subject to  (W + Delta) k = v,  whose solution is

    Delta = r (C0^{-1} k)^T / (k^T C0^{-1} k),    r = v - W k.

One fact per update; batches of facts go through MEMIT, EMMET or AlphaEdit.
"""

from __future__ import annotations

import math

import torch

from editexp.editing.linalg import (
    CovarianceFactor,
    EditingError,
    SolveParams,
    check_finite,
    prepare_batch,
)


def rome_delta(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor
) -> torch.Tensor:
    """ROME's update Delta (d_v, d_k), float64, for keys (d_k, 1) and residuals (d_v, 1)."""
    if keys.ndim == 2 and keys.shape[1] != 1:
        raise EditingError(
            f"ROME edits one fact per update, got E={keys.shape[1]} keys (shape "
            f"{tuple(keys.shape)}); use batch_size=1, or MEMIT, EMMET or AlphaEdit for batches"
        )
    key, residual = prepare_batch(keys, residuals, covariance, "ROME")
    whitened_key = covariance.solve(key)  # C0^{-1} k, (d_k, 1)
    denominator = float(key.T @ whitened_key)  # k^T C0^{-1} k
    if not math.isfinite(denominator) or denominator <= 0.0:
        raise EditingError(
            f"ROME: k^T C0^-1 k = {denominator!r} is not a positive finite number "
            "(zero or degenerate key?); check the key computation"
        )
    delta = residual @ whitened_key.T / denominator
    check_finite(delta, "ROME update")
    return delta


def solve(
    keys: torch.Tensor, residuals: torch.Tensor, covariance: CovarianceFactor, params: SolveParams
) -> torch.Tensor:
    """ROME's update for the registry (:class:`editexp.algorithms.Algorithm`)."""
    return rome_delta(keys, residuals, covariance)
