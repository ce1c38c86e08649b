"""The closed-form update of the run's algorithm, looked up in the registry
(:mod:`editexp.algorithms`); the closed forms themselves are in ``rome.py``, ``memit.py``,
``emmet.py`` and ``alphaedit.py``."""

from __future__ import annotations

import torch

from editexp.algorithms import Algorithm, UnknownAlgorithmError, get_algorithm
from editexp.editing.linalg import CovarianceFactor, EditingError, SolveParams


def algorithm_of(name: str | Algorithm) -> Algorithm:
    """The registry's record of ``name`` (an :class:`EditingError` when there is none)."""
    if isinstance(name, Algorithm):
        return name
    try:
        return get_algorithm(name)
    except UnknownAlgorithmError as error:
        raise EditingError(str(error)) from None


def closed_form_delta(
    algorithm: str | Algorithm,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    params: SolveParams,
) -> torch.Tensor:
    """Delta (d_v, d_k) float64 from keys (d_k, E) and residuals (d_v, E)."""
    record = algorithm_of(algorithm)
    if params.past is not None and not record.keeps_past_keys:
        raise EditingError(f"{record.title} cannot keep earlier edits' keys")
    return record.closed_form()(keys, residuals, covariance, params)
