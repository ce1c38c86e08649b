"""Singular mode at batch cost: every fact is edited alone, but all facts are computed together.

The paper's layer search edits each fact alone and restores the model in between. The facts do
not interact, so instead of E rounds of (values, keys, solve, write W, evaluate, restore W):

1. values v* and keys k* of all facts are computed in batches, as batch mode does (and read
   from the sweep's cache when another grid point computed them);
2. each fact's update is solved alone, Delta_i = r_i w_i^T with r_i = delta*_i (one layer:
   the residual is delta* itself), all with one C0 solve (:func:`rank_one.singular_updates`);
3. the evaluation scores (and samples) all facts in batched passes in which every row carries
   its own fact's update (:class:`rank_one.RowEdits`); W is never written.

``tests/test_singular.py`` proves it equals the one-fact-at-a-time path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from editexp.editing.keys_values import (
    EditRequest,
    ValueHparams,
    Values,
    compute_keys,
    compute_values,
)
from editexp.editing.linalg import CovarianceFactor
from editexp.editing.rank_one import RankOneEdits, singular_updates
from editexp.editing.value_cache import CacheCounts, cached_keys, cached_values
from editexp.models import LoadedModel


@dataclass
class SingularEdits:
    """The E independent updates of a singular run and what they were solved from."""

    edits: RankOneEdits  # Delta_i = edits.left[i] edits.right[i]^T at edits.layer
    keys: torch.Tensor  # (d_k, E)
    values: Values
    cache: CacheCounts = field(default_factory=CacheCounts)  # values computed / read
    timing: dict[str, float] = field(default_factory=dict)


def solve_singular(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    algorithm: str,
    layer: int,
    covariance: CovarianceFactor,
    lam: float | None,
    hparams: ValueHparams,
    prefixes: Sequence[str],
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> SingularEdits:
    """Every request's own update at ``layer`` on the unedited model (weights untouched)."""
    counts = CacheCounts()
    timing = {"keys_values": 0.0, "solve": 0.0}
    start = time.perf_counter()

    def values_of(chunk: Sequence[EditRequest]) -> Values:
        return compute_values(loaded, chunk, prefixes, layer, hparams, batch_size, progress)

    def keys_of(chunk: Sequence[EditRequest]) -> torch.Tensor:
        return compute_keys(loaded, chunk, prefixes, [layer], batch_size)[layer]

    if use_cache:
        values = cached_values(
            loaded, requests, prefixes, layer, hparams, values_of, batch_size, counts
        )
        keys = cached_keys(loaded, requests, prefixes, layer, keys_of, batch_size, CacheCounts())
    else:
        values, keys = values_of(requests), keys_of(requests)
        counts.computed += len(requests)
    timing["keys_values"] = time.perf_counter() - start
    start = time.perf_counter()
    edits = singular_updates(algorithm, layer, keys, values.deltas.T, covariance, lam)
    timing["solve"] = time.perf_counter() - start
    return SingularEdits(edits=edits, keys=keys, values=values, cache=counts, timing=timing)
