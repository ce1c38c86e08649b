"""Rank-one updates carried per batch row by a forward hook, instead of written into W.

A singular run edits E facts each alone, with Delta_i = r_i w_i^T (:class:`RankOneEdits`).
:class:`RowEdits` lets one batched forward pass carry a different update in every row: at the
edited module, row b (whose fact has edit e(b)) gets

    out[b, t] = W x[b, t] (+ bias) + r_e(b) (w_e(b) . x[b, t])  =  (W + Delta_e(b)) x[b, t] (+ bias)

so no weight is written or restored per fact. Rows with edit index -1 stay unedited. Editing
(:mod:`editexp.editing.rank_one`) makes the updates; evaluation scores and samples with them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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
    def for_model(cls, loaded: Any, edits: RankOneEdits) -> RowEdits:
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


@dataclass(frozen=True)
class PromptEdits:
    """Which edit of ``edits`` each prompt runs with: ``rows[i]`` for prompt i (-1: none)."""

    edits: RowEdits
    rows: Sequence[int]
