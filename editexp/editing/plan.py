"""How an Editor makes every update: the algorithm at its layers and its hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from editexp.config import RunSettings, ValueHparams
from editexp.editing.linalg import PastKeys, SolveParams


@dataclass(frozen=True)
class UpdatePlan:
    """The algorithm (a registry name), the layers it edits, lambda and the v* optimisation,
    and how many facts' keys and values are computed together in one padded batch."""

    algorithm: str
    layers: tuple[int, ...]
    lam: float | None
    hparams: ValueHparams = field(default_factory=ValueHparams)
    nullspace_threshold: float | None = None
    batch_size: int = 64
    progress: bool = True  # progress bars of the value optimisation

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    @classmethod
    def of(cls, settings: RunSettings, batch_size: int = 64) -> UpdatePlan:
        """The plan of a validated run config."""
        return cls(
            algorithm=settings.algorithm,
            layers=tuple(settings.layers),
            lam=settings.lam,
            hparams=settings.hparams,
            nullspace_threshold=settings.nullspace_threshold,
            batch_size=batch_size,
        )

    def solve_params(self, past: PastKeys | None = None) -> SolveParams:
        """What the closed form takes besides keys, residuals and C0."""
        return SolveParams(self.lam, past, self.nullspace_threshold)
