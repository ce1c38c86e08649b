"""One update of a batch of facts, for any of the algorithms, on one or more layers.

For layers l_1 < ... < l_L (usually one), as MEMIT does:

1. values at the last layer: delta*_i for every fact (``compute_values``);
2. the target of the residual stream after l_L: z_i = z_i(before the update) + delta*_i;
3. for each layer l in order: keys K_l on the current model, residuals
   R_l = (Z - Z_current) / (number of layers still to edit), Delta_l from the algorithm's
   closed form, W_l <- W_l + Delta_l.

With one layer, step 3 uses R = delta* directly: the module's own output is where delta* was
optimised, which is exact for every architecture (Gemma-3 has a norm after its MLP, so the
residual stream there is not the module output).

A sequential run that keeps earlier edits passes its ``PastKeys`` per layer (the running sum
K_past K_past^T of earlier updates' keys): MEMIT and EMMET then preserve those keys too, and
AlphaEdit always uses them. The caller owns them and adds each update's ``keys`` afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editexp.cache import atomic_torch_save
from editexp.editing.alphaedit import alphaedit_delta
from editexp.editing.emmet import emmet_delta
from editexp.editing.keys_values import (
    EditRequest,
    ValueHparams,
    Values,
    compute_keys,
    compute_values,
    read_at_subject,
)
from editexp.editing.linalg import CovarianceFactor, EditingError, PastKeys, check_finite
from editexp.editing.memit import memit_delta
from editexp.editing.rome import rome_delta
from editexp.models import LoadedModel

ALGORITHMS = ("rome", "memit", "emmet", "alphaedit")


def closed_form_delta(
    algorithm: str,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: CovarianceFactor,
    lam: float | None,
    past: PastKeys | None = None,
    nullspace_threshold: float | None = None,
) -> torch.Tensor:
    """Delta (d_v, d_k) float64 from keys (d_k, E) and residuals (d_v, E); ``past`` holds
    the earlier updates' keys (MEMIT / EMMET keep_edits, AlphaEdit)."""
    if algorithm == "rome":
        if past is not None:
            raise EditingError("ROME cannot keep earlier edits' keys; use MEMIT or EMMET")
        return rome_delta(keys, residuals, covariance)
    if lam is None:
        raise EditingError(f"{algorithm} needs lambda (got null); set lambda=<float>")
    if algorithm == "memit":
        return memit_delta(keys, residuals, covariance, lam, past)
    if algorithm == "emmet":
        return emmet_delta(keys, residuals, covariance, lam, past)
    if algorithm == "alphaedit":
        if nullspace_threshold is None:
            raise EditingError(
                "AlphaEdit needs nullspace_threshold (got null); set "
                "model.hparams.alphaedit.nullspace_threshold=<float>"
            )
        return alphaedit_delta(keys, residuals, covariance, lam, nullspace_threshold, past)
    raise EditingError(f"algorithm={algorithm!r}; expected one of {ALGORITHMS}")


@dataclass
class UpdateResult:
    deltas: dict[int, torch.Tensor]  # layer -> Delta (d_v, d_k), float32, as added to W
    keys: dict[int, torch.Tensor]  # layer -> K (d_k, E) the keys the update was solved for
    values: Values
    timing: dict[str, float] = field(default_factory=dict)


def add_to_weight(loaded: LoadedModel, layer: int, delta: torch.Tensor) -> None:
    """W_l <- W_l + Delta, refusing non-finite deltas or results."""
    check_finite(delta, f"the update of layer {layer}")
    weight = loaded.weight(layer)  # a (d_v, d_k) view, transposed for Conv1D
    with torch.no_grad():
        updated = weight + delta.to(device=weight.device, dtype=weight.dtype)
        check_finite(updated, f"the edited weight of layer {layer}")
        weight.copy_(updated)


def edit_batch(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    algorithm: str,
    layers: Sequence[int],
    covariances: dict[int, CovarianceFactor],
    lam: float | None,
    hparams: ValueHparams,
    prefixes: Sequence[str],
    batch_size: int = 64,
    progress: bool = True,
    past_keys: dict[int, PastKeys] | None = None,
    nullspace_threshold: float | None = None,
) -> UpdateResult:
    """Write ``requests`` into the model with one update; returns the deltas it added.

    ``past_keys`` (per layer) are the earlier updates' keys to preserve (None: none kept)."""
    layers = sorted(layers)
    if algorithm == "rome" and (len(requests) != 1 or len(layers) != 1):
        raise EditingError(
            f"ROME edits one fact at one layer per update; got {len(requests)} facts and "
            f"layers {layers}. Use batch_size=1 and a single layer, or MEMIT / EMMET."
        )
    timing = {"keys_values": 0.0, "solve": 0.0}
    start = time.perf_counter()
    last = layers[-1]
    values = compute_values(loaded, requests, prefixes, last, hparams, batch_size, progress)
    if len(layers) > 1:
        current = read_at_subject(loaded, requests, prefixes, [last], "residual", batch_size)
        target = current[last] + values.deltas
    timing["keys_values"] += time.perf_counter() - start

    deltas: dict[int, torch.Tensor] = {}
    all_keys: dict[int, torch.Tensor] = {}
    # A failed solve at a later layer must not leave the earlier layers of this update applied.
    snapshot = snapshot_weights(loaded, layers[:-1])
    try:
        for position, layer in enumerate(layers):
            start = time.perf_counter()
            keys = compute_keys(loaded, requests, prefixes, [layer], batch_size)[layer]
            if len(layers) == 1:
                residuals = values.deltas.T
            else:
                now = read_at_subject(loaded, requests, prefixes, [last], "residual", batch_size)
                residuals = ((target - now[last]) / (len(layers) - position)).T
            timing["keys_values"] += time.perf_counter() - start
            start = time.perf_counter()
            delta = closed_form_delta(
                algorithm,
                keys,
                residuals,
                covariances[layer],
                lam,
                past=None if past_keys is None else past_keys.get(layer),
                nullspace_threshold=nullspace_threshold,
            )
            delta = delta.to(torch.float32)
            add_to_weight(loaded, layer, delta)
            timing["solve"] += time.perf_counter() - start
            deltas[layer] = delta.cpu()
            all_keys[layer] = keys
    except BaseException:
        restore_weights(loaded, snapshot)
        raise
    return UpdateResult(deltas=deltas, keys=all_keys, values=values, timing=timing)


# --------------------------------------------------------------------------- weights and deltas


def snapshot_weights(loaded: LoadedModel, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited matrices, to restore them bit for bit."""
    return {layer: loaded.edit_module(layer).weight.detach().clone() for layer in layers}


def restore_weights(loaded: LoadedModel, snapshot: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, weight in snapshot.items():
            loaded.edit_module(layer).weight.copy_(weight)


def save_deltas(path: str | Path, loaded: LoadedModel, deltas: dict[int, torch.Tensor]) -> Path:
    """A small file holding only the edited matrices' total deltas (W' - W) and the identity
    of the model they belong to."""
    payload = {
        "model_identity": loaded.identity,
        "edit_module": loaded.spec.edit_module,
        "deltas": {int(layer): delta.float().cpu() for layer, delta in deltas.items()},
    }
    return atomic_torch_save(path, payload)


def apply_edits(
    loaded: LoadedModel, path: str | Path, strict: bool = True
) -> dict[int, torch.Tensor]:
    """Add the deltas saved by :func:`save_deltas` to a freshly loaded model."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if strict and payload["model_identity"] != loaded.identity:
        raise EditingError(
            f"{path} holds edits of model {payload['model_identity']!r}, but the loaded model is "
            f"{loaded.identity!r}; pass strict=False to apply them anyway"
        )
    if payload["edit_module"] != loaded.spec.edit_module:
        raise EditingError(
            f"{path} edits {payload['edit_module']!r}, this model's config edits "
            f"{loaded.spec.edit_module!r}"
        )
    deltas = {int(layer): delta for layer, delta in payload["deltas"].items()}
    loaded.spec.check_layers(list(deltas))
    for layer, delta in deltas.items():
        add_to_weight(loaded, layer, delta)
    return deltas
