"""Shared linear algebra for the closed-form edits: the factored key covariance, the running
sum of earlier edits' keys, and checks.

Notation (shared by every algorithm): W (d_v x d_k) is the edited linear map, the keys
K = [k_1 .. k_E] (d_k x E) are its inputs, the values V (d_v x E) its desired outputs, the
residuals R = V - W K (d_v x E), and C0 = E[k k^T] (d_k x d_k) the second moment of the keys
of ordinary text at the edited layer. Every update needs solves with C0,

    C0^{-1} b  =  L^{-T} L^{-1} b,    C0 = L L^T  (Cholesky, float64),

so C0 is factored once per layer (``CovarianceFactor``) and the factor is reused for every
batch of a sequential run. No explicit inverse is ever formed; all solves run in float64.

Sequential editing that keeps earlier edits (MEMIT / EMMET with ``keep_edits``, AlphaEdit)
needs the keys of every earlier update only through K_past K_past^T, a d_k x d_k running sum
(``PastKeys``), so memory does not grow with the number of edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from editexp.errors import UserError

# Relative asymmetry max|C - C^T| / max|C| tolerated in C0 (float32 accumulation noise).
SYMMETRY_TOLERANCE = 1e-4
# Condition number above which C0 is treated as numerically singular.
MAX_COVARIANCE_CONDITION = 1e14
# Condition number above which a matrix that must be invertible with lambda = 0
# (EMMET's Gram matrix K^T C0^{-1} K, MEMIT's K K^T) is treated as numerically singular.
MAX_EXACT_SOLVE_CONDITION = 1e12
_INVERSE_ITERATION_STEPS = 8
# Eigenvalues of K_past K_past^T below this fraction of the largest count as zero (its rank).
PAST_KEYS_RANK_TOLERANCE = 1e-10


class EditingError(UserError):
    """An update cannot be computed (or would be garbage); the message says why and what to do."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise EditingError if ``tensor`` holds a NaN or Inf; ``what`` names it in the message."""
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise EditingError(
            f"{what} contains NaN/Inf ({n_bad} of {tensor.numel()} entries); "
            "refusing to write it into the model"
        )


def check_lambda(lam: float, algorithm: str) -> float:
    """Return ``lam`` as a float if it is finite and >= 0, else raise EditingError."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise EditingError(f"{algorithm} lambda must be a real number, got {lam!r}")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise EditingError(f"{algorithm} lambda must be finite and >= 0, got {lam!r}")
    return lam


def cholesky_lower(matrix: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of a symmetric matrix, or None if it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        return None
    return factor


def condition_lower_bound(matrix: torch.Tensor, factor: torch.Tensor) -> float:
    """A cheap lower bound on the condition number of an SPD ``matrix`` = factor factor^T.

    lambda_max >= max_i A_ii, and both the smallest Cholesky pivot L_ii^2 and the Rayleigh
    quotient of a few inverse-iteration steps are >= lambda_min, so their ratio never
    overestimates cond(A). Costs a few triangular solves, no extra factorisation.
    """
    largest = float(matrix.diagonal().max())
    smallest = float(factor.diagonal().square().min())
    generator = torch.Generator(device="cpu").manual_seed(0)
    vector = torch.randn(matrix.shape[0], 1, generator=generator, dtype=matrix.dtype)
    vector = vector.to(matrix.device)
    for _ in range(_INVERSE_ITERATION_STEPS):
        vector = torch.cholesky_solve(vector, factor)
        norm = float(torch.linalg.vector_norm(vector))
        if not math.isfinite(norm) or norm == 0.0:
            return math.inf
        vector = vector / norm
    rayleigh = float(vector.T @ matrix @ vector)
    smallest = min(smallest, rayleigh)
    if smallest <= 0.0:
        return math.inf
    return largest / smallest


class CovarianceFactor:
    """C0 factored once per layer (Cholesky, float64) and reused for every solve.

    One factor serves every batch of a sequential run: ``solve`` never refactors.
    """

    def __init__(self, second_moment: torch.Tensor) -> None:
        if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
            raise EditingError(
                f"C0 must be a square (d_k, d_k) matrix, got shape {tuple(second_moment.shape)}"
            )
        if second_moment.shape[0] == 0:
            raise EditingError("C0 is empty (d_k = 0)")
        matrix = second_moment.detach().to(torch.float64)
        if not bool(torch.isfinite(matrix).all()):
            raise EditingError(
                "C0 contains NaN/Inf: the layer statistics are corrupt; recollect them"
            )
        scale = float(matrix.abs().max())
        asymmetry = float((matrix - matrix.T).abs().max())
        if asymmetry > SYMMETRY_TOLERANCE * scale:
            raise EditingError(
                f"C0 is not symmetric (max |C0 - C0^T| = {asymmetry:.3g}, max |C0| = "
                f"{scale:.3g}): it must be the key second moment E[k k^T]"
            )
        matrix = 0.5 * (matrix + matrix.T)
        factor = cholesky_lower(matrix)
        if factor is None:
            raise EditingError(
                "C0 is not positive definite: collect statistics over more tokens "
                f"(at least d_k={matrix.shape[0]} tokens with linearly independent keys)"
            )
        condition = condition_lower_bound(matrix, factor)
        if condition > MAX_COVARIANCE_CONDITION:
            raise EditingError(
                f"C0 is numerically singular (condition number >= {condition:.3g}): "
                "collect statistics over more tokens"
            )
        self.dim: int = matrix.shape[0]
        self.matrix: torch.Tensor = matrix
        self._cholesky_lower = factor
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None  # computed on first use

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C0^{-1} rhs in float64 for rhs of shape (d_k,) or (d_k, n), reusing the factor."""
        if rhs.ndim not in (1, 2) or rhs.shape[0] != self.dim:
            raise EditingError(
                f"C0 solve expects a right-hand side of shape ({self.dim},) or ({self.dim}, n), "
                f"got {tuple(rhs.shape)}"
            )
        columns = rhs.detach().to(dtype=torch.float64, device=self.matrix.device)
        if rhs.ndim == 1:
            return torch.cholesky_solve(columns.unsqueeze(1), self._cholesky_lower).squeeze(1)
        return torch.cholesky_solve(columns, self._cholesky_lower)

    def null_space(self, threshold: float) -> torch.Tensor:
        """Orthonormal basis U (d_k, r) of the eigenvectors of C0 with eigenvalue < threshold.

        P = U U^T projects onto the directions that ordinary text barely uses (AlphaEdit's
        null space of the preserved keys). C0 is eigendecomposed once and reused.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise EditingError(f"nullspace_threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold) or threshold <= 0:
            raise EditingError(f"nullspace_threshold must be finite and > 0, got {threshold!r}")
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.matrix)  # ascending eigenvalues
        eigenvalues, eigenvectors = self._eigen
        return eigenvectors[:, eigenvalues < threshold]

    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of C0, ascending (to choose a null-space threshold)."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.matrix)
        return self._eigen[0]


@dataclass
class PastKeys:
    """The keys of every earlier update at one layer, kept as the running sum K_past K_past^T.

    Owned by whoever applies sequential updates: after each update at this layer it adds that
    update's keys (``add``); MEMIT / EMMET with ``keep_edits`` and AlphaEdit read it.
    """

    gram: torch.Tensor  # (d_k, d_k) float64: sum over earlier keys k of k k^T
    count: int = 0  # keys added so far

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> PastKeys:
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device))

    def add(self, keys: torch.Tensor) -> None:
        """K_past K_past^T += K K^T for keys (d_k, E)."""
        keys = keys.unsqueeze(1) if keys.ndim == 1 else keys
        if keys.ndim != 2 or keys.shape[0] != self.gram.shape[0]:
            raise EditingError(
                f"past keys are ({self.gram.shape[0]}, E) columns, got shape {tuple(keys.shape)}"
            )
        columns = keys.detach().to(dtype=torch.float64, device=self.gram.device)
        check_finite(columns, "keys added to the past keys")
        self.gram.addmm_(columns, columns.T)
        self.count += columns.shape[1]

    def remove(self, keys: torch.Tensor) -> None:
        """Undo :meth:`add` of the same keys (an update that was reverted)."""
        columns = keys.detach().to(dtype=torch.float64, device=self.gram.device)
        columns = columns.unsqueeze(1) if columns.ndim == 1 else columns
        self.gram.addmm_(columns, columns.T, alpha=-1)
        self.count -= columns.shape[1]

    def factor(self) -> torch.Tensor:
        """B (d_k, r) with B B^T = K_past K_past^T and r its numerical rank (r <= d_k).

        B stands in for the earlier keys wherever only their span and Gram matter (EMMET's
        equality constraints Delta K_past = 0 <=> Delta B = 0).
        """
        if self.count == 0:
            return self.gram.new_zeros(self.gram.shape[0], 0)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (self.gram + self.gram.T))
        keep = eigenvalues > PAST_KEYS_RANK_TOLERANCE * float(eigenvalues[-1])
        return eigenvectors[:, keep] * eigenvalues[keep].sqrt()


@dataclass(frozen=True)
class SolveParams:
    """What a closed form takes besides keys, residuals and C0 (checked with the config)."""

    lam: float | None  # the run's lambda; None for an algorithm that takes none
    past: PastKeys | None = None  # earlier updates' keys to preserve
    nullspace_threshold: float | None = None  # eigenvalues of C0 below it span the null space


def has_past(past: PastKeys | None) -> bool:
    """True when ``past`` holds at least one earlier key."""
    return past is not None and past.count > 0


def check_past(past: PastKeys | None, covariance: CovarianceFactor, algorithm: str) -> None:
    if past is not None and tuple(past.gram.shape) != (covariance.dim, covariance.dim):
        raise EditingError(
            f"{algorithm}: past keys' K K^T is {tuple(past.gram.shape)} but C0 is "
            f"{covariance.dim} x {covariance.dim}; they belong to another layer"
        )


def prepare_batch(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    algorithm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an edit batch and return (K, R) in float64 on C0's device.

    keys (d_k, E) and residuals (d_v, E); a 1-D tensor is read as a single column.
    """
    if not isinstance(covariance, CovarianceFactor):
        raise EditingError(
            f"{algorithm} needs a CovarianceFactor for C0, got {type(covariance).__name__}"
        )
    keys = keys.unsqueeze(1) if keys.ndim == 1 else keys
    residuals = residuals.unsqueeze(1) if residuals.ndim == 1 else residuals
    if keys.ndim != 2 or residuals.ndim != 2:
        raise EditingError(
            f"{algorithm} expects keys (d_k, E) and residuals (d_v, E) as 2-D tensors, got "
            f"keys {tuple(keys.shape)} and residuals {tuple(residuals.shape)}"
        )
    if keys.shape[0] != covariance.dim:
        raise EditingError(
            f"{algorithm}: keys have d_k={keys.shape[0]} rows (shape {tuple(keys.shape)}) but "
            f"C0 is {covariance.dim} x {covariance.dim}"
        )
    if keys.shape[1] != residuals.shape[1]:
        raise EditingError(
            f"{algorithm}: keys {tuple(keys.shape)} and residuals {tuple(residuals.shape)} "
            "must have the same number of columns E (one per fact)"
        )
    if keys.shape[1] == 0:
        raise EditingError(f"{algorithm}: empty batch (E = 0 facts)")
    device = covariance.matrix.device
    keys = keys.detach().to(dtype=torch.float64, device=device)
    residuals = residuals.detach().to(dtype=torch.float64, device=device)
    check_finite(keys, f"{algorithm} keys")
    check_finite(residuals, f"{algorithm} residuals")
    return keys, residuals


def duplicate_columns(matrix: torch.Tensor) -> list[list[int]]:
    """Groups of column indices whose columns are exactly equal (only groups of size >= 2)."""
    _, group_of_column = torch.unique(matrix, dim=1, return_inverse=True)
    groups: dict[int, list[int]] = {}
    for column, group in enumerate(group_of_column.tolist()):
        groups.setdefault(group, []).append(column)
    return [columns for columns in groups.values() if len(columns) > 1]
