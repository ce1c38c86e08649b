"""Singular edits as rank-one updates, applied per batch row instead of written into W.

For one fact (key k, residual r = v* - W k) the update of every algorithm has rank one,

    Delta = r w^T,    w = C0^{-1} k / (lambda + k^T C0^{-1} k),

- ROME: lambda = 0 (its closed form, ``rome.py``);
- MEMIT with one key: (lambda C0 + k k^T)^{-1} k = C0^{-1} k / (lambda + k^T C0^{-1} k)
  (Sherman-Morrison), so ``memit_delta`` = r w^T; lambda = 0 is refused, as ``memit_delta``
  refuses it (k k^T is singular);
- EMMET with one key: r (k^T C0^{-1} k + eps)^{-1} k^T C0^{-1} = r w^T with lambda = eps
  (eps = 0 is ROME).

Any other algorithm (AlphaEdit) is solved per fact with its own closed form, whose one-fact
update is r w^T as well: w = Delta^T r / (r^T r), checked to be exact.

A singular run edits E facts each alone. :func:`singular_updates` solves all E updates with
one C0 solve, and :class:`RowEdits` lets one batched forward pass carry a different update in
every row: at the edited module, row b (whose fact has edit e(b)) gets

    out[b, t] = W x[b, t] (+ bias) + r_e(b) (w_e(b) . x[b, t])  =  (W + Delta_e(b)) x[b, t] (+ bias)

so no weight is written or restored per fact. Rows with edit index -1 stay unedited.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from editexp.config import ALGORITHMS
from editexp.editing.linalg import CovarianceFactor, EditingError, check_lambda, prepare_batch

RANK_ONE_FORMULAS = ("rome", "memit", "emmet")
RANK_ONE_TOLERANCE = 1e-6  # relative: ||Delta - r w^T|| / ||Delta|| of a one-fact update


@dataclass
class RankOneEdits:
    """One rank-one update Delta_i = left_i right_i^T per fact, all at ``layer``."""

    layer: int
    left: torch.Tensor  # (E, d_v) the residuals r_i
    right: torch.Tensor  # (E, d_k) w_i = C0^{-1} k_i / (lambda + k_i^T C0^{-1} k_i)

    def __len__(self) -> int:
        return self.left.shape[0]

    def select(self, indices: list[int]) -> RankOneEdits:
        """The updates at ``indices``, in that order."""
        return RankOneEdits(self.layer, self.left[indices], self.right[indices])

    def delta(self, index: int) -> torch.Tensor:
        """Delta_i as a (d_v, d_k) matrix, the update written into W by the plain path."""
        return torch.outer(self.left[index], self.right[index])


def singular_updates(
    algorithm: str,
    layer: int,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    lam: float | None,
    nullspace_threshold: float | None = None,
) -> RankOneEdits:
    """Each fact's own update (solved alone), for keys (d_k, E) and residuals (d_v, E).

    ROME, MEMIT, EMMET: float64, one C0 solve for all E keys; stored in float32. Fails as the
    one-fact closed forms fail (missing lambda, MEMIT with lambda = 0, degenerate keys).
    """
    name = algorithm.upper()
    if algorithm not in ALGORITHMS:
        raise EditingError(f"algorithm={algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if algorithm not in RANK_ONE_FORMULAS:
        return _factored_one_by_one(
            algorithm, layer, keys, residuals, covariance, lam, nullspace_threshold
        )
    if algorithm == "rome":
        lam = 0.0
    elif lam is None:
        raise EditingError(f"{algorithm} needs lambda (got null); set lambda=<float>")
    lam = check_lambda(lam, name)
    if algorithm == "memit" and lam == 0.0:
        raise EditingError(
            f"MEMIT with lambda=0 needs K K^T invertible, i.e. at least d_k={covariance.dim} "
            "linearly independent keys, got E=1 key per singular edit; use lambda > 0 "
            "(the paper tunes lambda in 1 .. 1e6)"
        )
    keys, residuals = prepare_batch(keys, residuals, covariance, name)
    whitened = covariance.solve(keys)  # C0^{-1} K, (d_k, E)
    denominators = (keys * whitened).sum(dim=0) + lam  # lambda + k_i^T C0^{-1} k_i, (E,)
    bad = [(i, float(d)) for i, d in enumerate(denominators) if not (math.isfinite(d) and d > 0)]
    if bad:
        raise EditingError(
            f"{name}: lambda + k^T C0^-1 k is not a positive finite number for facts "
            f"{[i for i, _ in bad]} (values {[d for _, d in bad]}); zero or degenerate keys?"
        )
    right = (whitened / denominators).T  # (E, d_k)
    return RankOneEdits(layer=layer, left=residuals.T.float().cpu(), right=right.float().cpu())


def _factored_one_by_one(
    algorithm, layer, keys, residuals, covariance, lam, nullspace_threshold
) -> RankOneEdits:
    """Each fact's update from the algorithm's closed form, factored as r w^T."""
    from editexp.editing.editor import closed_form_delta  # the editor imports this module

    lefts, rights = [], []
    for column in range(keys.shape[1]):
        residual = residuals[:, column : column + 1].double()
        delta = closed_form_delta(
            algorithm,
            keys[:, column : column + 1],
            residual,
            covariance,
            lam,
            nullspace_threshold=nullspace_threshold,
        )
        residual = residual.squeeze(1).to(delta.device)
        squared = residual.dot(residual)
        right = delta.T @ residual / squared if squared > 0 else torch.zeros_like(delta[0])
        error = torch.linalg.matrix_norm(delta - torch.outer(residual, right))
        if error > RANK_ONE_TOLERANCE * torch.linalg.matrix_norm(delta):
            raise EditingError(
                f"{algorithm}: the update of fact {column} is not r w^T (relative error "
                f"{float(error / torch.linalg.matrix_norm(delta)):.2g}); singular mode cannot "
                "apply it per row"
            )
        lefts.append(residual.float().cpu())
        rights.append(right.float().cpu())
    return RankOneEdits(layer=layer, left=torch.stack(lefts), right=torch.stack(rights))


class RowEdits:
    """A forward hook on the edited module adding row b's own rank-one update.

    Call :meth:`select` with the edit index of every row (``-1``: no edit) before each forward
    pass inside :meth:`installed`.
    """

    def __init__(self, module: nn.Module, edits: RankOneEdits) -> None:
        weight = module.weight
        self.module = module
        self.layer = edits.layer
        self.n_edits = len(edits)
        zeros_left = torch.zeros(1, edits.left.shape[1])
        zeros_right = torch.zeros(1, edits.right.shape[1])
        # Index -1 selects the appended zero row: no update.
        self.left = torch.cat([edits.left, zeros_left]).to(weight.device, weight.dtype)
        self.right = torch.cat([edits.right, zeros_right]).to(weight.device, weight.dtype)
        self.rows: torch.Tensor | None = None

    @classmethod
    def for_model(cls, loaded, edits: RankOneEdits) -> RowEdits:
        """Hook the edited module of ``loaded`` (a :class:`~editexp.models.LoadedModel`)."""
        return cls(loaded.edit_module(edits.layer), edits)

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """The edit index of every row of the next forward pass."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.left.device)
        if rows.numel() and (int(rows.max()) >= self.n_edits or int(rows.min()) < -1):
            raise IndexError(f"edit indices must lie in -1 .. {self.n_edits - 1}")
        self.rows = rows

    @contextmanager
    def installed(self) -> Iterator[RowEdits]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.rows = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inputs = args[0]  # (B, T, d_k)
        if self.rows is None or self.rows.shape[0] != inputs.shape[0]:
            raise RuntimeError("RowEdits.select(rows) must give one edit index per batch row")
        coefficients = torch.einsum("btk,bk->bt", inputs, self.right[self.rows])  # w . x
        return output + coefficients.unsqueeze(-1) * self.left[self.rows].unsqueeze(1)
