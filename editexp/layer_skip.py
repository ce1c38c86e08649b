"""Forward passes that skip the layers below the edited one.

An edit at layer L changes nothing below it: the hidden states entering layer L, and the
attention keys and values of layers 0..L-1, are those of the unedited model. So a pass over
text whose states at L's input are known can start there:

- :func:`capture_layer_input` records the hidden states entering ``layers[layer]`` during a
  forward pass (and, with ``stop=True``, ends the pass there: layers >= L never run);
- :func:`forward_from_layer` runs the base model with ``layers[:layer]`` replaced by identity
  functions and the given states fed to ``layers[layer]``. The embedding lookup still runs (a
  table read); the skipped layers cost nothing.

With a KV cache, the skipped layers hold no real keys and values. The attention mask is sized
from the cache's first full-attention layer, so each skipped layer gets a one-float-wide
placeholder of the right length (:func:`fill_skipped_layers`); layers >= L hold the real ones.
This works through the model's own forward, for every architecture whose decoder layers take
the hidden states as their first argument and return them (Llama, Qwen2, Gemma-3, GPT-2,
GPT-J in transformers 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass at the captured layer."""


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_layer_input(
    layers: nn.ModuleList, layer: int, stop: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Append the hidden states (B, T, d) entering ``layers[layer]`` at every forward pass in
    the block to the yielded list. With ``stop=True`` each pass raises :class:`StopForward`
    there (catch it around the call)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_hidden_argument(args, kwargs).detach())
        if stop:
            raise StopForward

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextmanager
def skip_layers_below(layers: nn.ModuleList, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass skips ``layers[:layer]`` and feeds ``hidden`` (B, T, d)
    to ``layers[layer]``."""

    def feed(module: nn.Module, args: tuple, kwargs: dict):
        given = _hidden_argument(args, kwargs)
        if given.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(
                f"stored states of shape {tuple(hidden.shape)} fed to a pass over "
                f"{tuple(given.shape[:2])} tokens"
            )
        fed = hidden.to(given.dtype)
        if args:
            return (fed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fed}

    saved = {}
    for index in range(layer):
        module = layers[index]
        if "forward" in module.__dict__:  # e.g. an accelerate hook; put it back afterwards
            saved[index] = module.__dict__["forward"]
        module.forward = _identity
    handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for index in range(layer):
            module = layers[index]
            del module.forward
            if index in saved:
                module.forward = saved[index]


def fill_skipped_layers(cache, layer: int, batch: int, length: int, like: torch.Tensor) -> None:
    """Give cache layers 0..layer-1 placeholder entries of ``length`` positions, so that the
    mask built from the cache sees the true past length (see the module docstring)."""
    for index in range(layer):
        cache_layer = cache.layers[index]
        missing = length - cache_layer.get_seq_length()
        if missing > 0:
            placeholder = torch.zeros(batch, 1, missing, 1, dtype=like.dtype, device=like.device)
            cache.update(placeholder, placeholder, index)


def forward_from_layer(
    base: nn.Module,
    layers: nn.ModuleList,
    layer: int,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
):
    """``base(input_ids, attention_mask, position_ids, cache)`` with the layers below ``layer``
    skipped and ``hidden`` (B, T, d), the states entering ``layers[layer]``, fed there; the
    pass uses and fills ``cache`` when one is given.

    ``attention_mask`` covers the cached past and the new tokens, as for the full pass.
    Returns the base model's output (``last_hidden_state`` after the final norm).
    """
    batch, width = input_ids.shape
    if cache is not None:
        fill_skipped_layers(cache, layer, batch, attention_mask.shape[1] - width, hidden)
    with skip_layers_below(layers, layer, hidden):
        return base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
