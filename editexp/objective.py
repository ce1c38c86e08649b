"""The run's objective: the one number of its record that the Hydra task function returns, so
that Hydra's optimising sweepers (Optuna, Ax, Nevergrad) can search lambda or the layer.

The top-level ``objective`` key names it as ``stage.metric[.stat]``: ``post.S`` (the default),
``post.ES``, ``post.NS.std``, ``each_batch.S`` (an ``every_k`` run's scores right after each
update). It is checked with the rest of the config, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editexp.errors import UserError
from editexp.metric_specs import registered

STAGES = ("pre", "post", "each_batch")
STATS = ("mean", "std")
MEAN_ONLY = ("S",)  # a harmonic mean of means: no spread over facts


@dataclass(frozen=True)
class Objective:
    """``stage``'s ``metric``'s ``stat`` in a run record."""

    stage: str
    metric: str
    stat: str = "mean"

    def __str__(self) -> str:
        return f"{self.stage}.{self.metric}.{self.stat}"

    def value(self, record: Any) -> float:
        """Its value in ``record`` (a :class:`~editexp.record.RunRecord`)."""
        value = record.metric(self.stage, self.metric, self.stat)
        if value is None:
            raise UserError(f"objective={self}: the run's summary has no such value")
        return value


def parse_objective(text: Any, schedule: str, generates: bool) -> Objective:
    """The objective named by ``text``, checked against the run's ``eval.schedule`` and whether
    it samples text for GE (``generates``); a :class:`UserError` naming what is wrong."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) not in (2, 3):
        raise UserError(
            f"objective={text}; expected stage.metric[.stat], e.g. post.S or post.ES.std"
        )
    objective = Objective(*parts)
    where = f"objective={text}"
    if objective.stage not in STAGES:
        raise UserError(f"{where}: stage {objective.stage!r} is not one of {', '.join(STAGES)}")
    if objective.metric not in registered():
        known = ", ".join(registered())
        raise UserError(f"{where}: metric {objective.metric!r} is not one of {known}")
    if objective.stat not in STATS or (objective.metric in MEAN_ONLY and objective.stat != "mean"):
        stats = "mean" if objective.metric in MEAN_ONLY else ", ".join(STATS)
        raise UserError(f"{where}: {objective.metric} has the statistics {stats} only")
    if objective.stage == "each_batch" and schedule != "every_k":
        raise UserError(f"{where}: each_batch scores are kept by eval.schedule=every_k runs only")
    if objective.metric == "GE" and (objective.stage == "each_batch" or not generates):
        raise UserError(f"{where}: GE is measured in pre and post, with eval.generation_facts > 0")
    return objective
