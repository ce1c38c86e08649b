"""Singular mode at batch cost: every fact is edited alone, but all facts are computed together.

The paper's layer search edits each fact alone and restores the model in between. The facts do
not interact, so instead of E rounds of (values, keys, solve, write W, evaluate, restore W):

1. values v* and keys k* of all facts are computed in batches, as batch mode does (and read
   from the sweep's cache when another grid point computed them);
2. each fact's update is solved alone, Delta_i = r_i w_i^T with r_i = delta*_i (one layer:
   the residual is delta* itself), all with one C0 solve (:func:`rank_one.singular_updates`);
3. the evaluation scores (and samples) all facts in batched passes in which every row carries
   its own fact's update (:class:`editexp.row_edits.RowEdits`); W is never written.

``tests/test_singular.py`` proves it equals the one-fact-at-a-time path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from editexp.editing.keys import EditRequest
from editexp.editing.linalg import CovarianceFactor
from editexp.editing.plan import UpdatePlan
from editexp.editing.rank_one import singular_updates
from editexp.editing.value_cache import SweepCache, keys_for, values_for
from editexp.editing.values import Values
from editexp.models import LoadedModel
from editexp.row_edits import RankOneEdits


@dataclass
class SingularEdits:
    """The E independent updates of a singular run and what they were solved from."""

    case_ids: list[int]
    edits: RankOneEdits  # Delta_i = edits.left[i] edits.right[i]^T at edits.layer
    keys: torch.Tensor  # (d_k, E)
    values: Values
    timing: dict[str, float] = field(default_factory=dict)  # keys_values, solve (seconds)
    preservation_errors: list[float] | None = None  # per fact, as Update.preservation_error

    @property
    def delta_norms(self) -> list[float]:
        """||Delta_i||_F = |r_i| |w_i| of every fact."""
        return (self.edits.left.norm(dim=1) * self.edits.right.norm(dim=1)).tolist()

    @property
    def value_steps(self) -> list[float]:
        return self.values.steps.float().tolist()


def solve_singular(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    plan: UpdatePlan,
    covariance: CovarianceFactor,
    prefixes: Sequence[str],
    cache: SweepCache | None = None,
) -> SingularEdits:
    """Every request's own update at the plan's one layer on the unedited model (weights
    untouched); ``cache``: the sweep's value/key cache (:mod:`editexp.editing.value_cache`)."""
    (layer,) = plan.layers
    start = time.perf_counter()
    values = values_for(
        loaded, requests, prefixes, layer, plan.hparams, plan.batch_size, plan.progress, cache
    )
    keys = keys_for(loaded, requests, prefixes, layer, plan.batch_size, cache)
    timing = {"keys_values": time.perf_counter() - start}
    start = time.perf_counter()
    # One layer: the residual of each fact is delta* itself (see editor.edit_batch).
    edits = singular_updates(
        plan.algorithm, layer, keys, values.deltas.T, covariance, plan.solve_params()
    )
    timing["solve"] = time.perf_counter() - start
    return SingularEdits(
        case_ids=[request.case_id for request in requests],
        edits=edits,
        keys=keys,
        values=values,
        timing=timing,
    )
