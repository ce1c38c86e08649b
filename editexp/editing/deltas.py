"""The edited matrices: adding a delta to W, snapshots to restore them bit for bit, and the
delta file (``deltas.pt``) that carries a run's edits to a freshly loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from editexp.cache import atomic_torch_save
from editexp.editing.linalg import EditingError, check_finite
from editexp.models import LoadedModel


def add_to_weight(loaded: LoadedModel, layer: int, delta: torch.Tensor) -> None:
    """W_l <- W_l + Delta, refusing non-finite deltas or results."""
    check_finite(delta, f"the update of layer {layer}")
    weight = loaded.weight(layer)  # a (d_v, d_k) view, transposed for Conv1D
    with torch.no_grad():
        updated = weight + delta.to(device=weight.device, dtype=weight.dtype)
        check_finite(updated, f"the edited weight of layer {layer}")
        weight.copy_(updated)


def snapshot_weights(
    loaded: LoadedModel, layers: Sequence[int], device: str | None = None
) -> dict[int, torch.Tensor]:
    """Copies of the edited matrices (on ``device``, default theirs), to restore them bit for
    bit."""
    return {
        layer: loaded.edit_module(layer).weight.detach().to(device=device, copy=True)
        for layer in layers
    }


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
