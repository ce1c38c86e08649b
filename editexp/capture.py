"""Read activations with forward hooks, and stop the forward pass once they are read.

The one hook mechanism behind layer statistics (keys of corpus tokens) and the key/value
engine (keys and residuals at the subject's last token): hooks on a few modules hand their
input or output at selected positions to a callback, and the hook of the deepest module then
raises a private exception, so no later layer and no unembedding ever runs.

    with ActivationCapture({1: edit_module_1, 3: edit_module_3}, "input", consume) as capture:
        capture.run(model, selected, input_ids=ids, attention_mask=mask)

``selected`` is a (B, T) bool mask of the positions to read (None: every position);
``consume(key, values)`` receives the (n_selected, d) rows in row-major order of the mask, so
a mask with one position per row gives one row per sequence, in batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

Where = Literal["input", "output"]
WHERE = ("input", "output")


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass once everything is read."""


class ActivationCapture:
    """Hooks on ``modules`` (key -> module); the module with the largest key is the deepest.

    ``where="input"``: the module's first positional input (forward pre-hook);
    ``where="output"``: its output (the first element when it returns a tuple).
    """

    def __init__(
        self,
        modules: Mapping[int, nn.Module],
        where: Where,
        consume: Callable[[int, torch.Tensor], None],
    ) -> None:
        if where not in WHERE:
            raise ValueError(f"where={where!r}; expected one of {WHERE}")
        if not modules:
            raise ValueError("no modules to capture")
        self.modules = dict(modules)
        self.where = where
        self.consume = consume
        self.deepest = max(self.modules)
        self._selected: torch.Tensor | None = None  # (B, T) bool, or None for all
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationCapture:
        for key, module in self.modules.items():
            if self.where == "input":
                handle = module.register_forward_pre_hook(self._pre_hook(key))
            else:
                handle = module.register_forward_hook(self._hook(key))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _read(self, key: int, tensor: Any) -> None:
        if isinstance(tensor, tuple):  # decoder layers of some architectures
            tensor = tensor[0]
        if self._selected is None:
            values = tensor.reshape(-1, tensor.shape[-1])  # (B * T, d)
        else:
            values = tensor[self._selected]  # (n_selected, d)
        self.consume(key, values)
        if key == self.deepest:
            raise _StopForward

    def _pre_hook(self, key: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._read(key, args[0])

        return hook

    def _hook(self, key: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._read(key, output)

        return hook

    def run(self, model: nn.Module, selected: torch.Tensor | None, **inputs: Any) -> bool:
        """One forward pass of ``model(**inputs, use_cache=False)``; True when it reached the
        deepest module (and was stopped there)."""
        self._selected = None if selected is None or bool(selected.all()) else selected
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            return True
        finally:
            self._selected = None
        return False
