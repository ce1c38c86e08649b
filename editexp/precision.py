"""A run's numeric precision: the dtype the weights are stored in, and the one matmuls run in.

The names are Lightning's (``Trainer(precision=...)``):

| precision    | weights (and the edited matrices) | matmuls of forward and backward passes |
|--------------|-----------------------------------|----------------------------------------|
| ``64-true``  | float64                           | float64 (exactness tests)              |
| ``32-true``  | float32                           | float32 (the default)                  |
| ``bf16-mixed`` | float32                         | bfloat16, through ``torch.autocast``   |
| ``bf16-true``| bfloat16                          | bfloat16                               |

In ``bf16-mixed`` only the matmuls' inputs are rounded (AMX tiles on a CPU that has them,
tensor cores on a GPU); everything an edit or a score depends on stays at least float32: the
residual stream between layers (float32 embeddings plus bfloat16 sublayer outputs), the value
deltas, their Adam state, the losses, KL and clamp, the recorded value-site outputs, the key
means, C0's sums (float64), every solve (float64) and the edited weights themselves (float32
masters: sequential edits add up exactly). The scored log-probabilities come from the LM
head in the weights' dtype, outside autocast (:func:`exact`): a bfloat16 logit has a
resolution of 0.016-0.125 nats at the magnitudes scores compare, enough to flip a near-tie.
The frozen matrices (all but the editable ones, the embedding and the head) are stored in
bfloat16 at the first pass (``models.round_frozen_matrices``): the same numbers autocast would
round them to on every call, without the cost of the cast; the model then runs inside
``LoadedModel.compute()``, as editexp's editing and evaluation do. Before that first pass the
context prefixes are sampled from the float32 model outside autocast: a mixed run edits with
the prefixes of ``32-true``.

``bf16-true`` is the plain half-precision model: half the memory, and every rounding above.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from editexp.errors import UserError

if TYPE_CHECKING:  # checking a config's precision needs no torch
    import torch


class PrecisionError(UserError):
    """A precision that is not known, or that the device cannot run."""


@dataclass(frozen=True)
class Precision:
    """How a run stores its weights and runs its matmuls (dtypes by their torch names)."""

    name: str  # "32-true", "bf16-mixed", ...
    weights_name: str  # "float32": dtype of the stored parameters
    autocast_name: str | None = None  # matmul dtype under torch.autocast; None: the weights'

    @property
    def mixed(self) -> bool:
        return self.autocast_name is not None

    @property
    def weights(self) -> torch.dtype:
        import torch

        return getattr(torch, self.weights_name)

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype matmuls run in."""
        import torch

        return getattr(torch, self.autocast_name or self.weights_name)

    def compute(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The context forward and backward passes run in: autocast for a mixed precision."""
        if self.autocast_name is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=torch.device(device).type, dtype=self.matmul_dtype)

    def check_device(self, device: torch.device | str) -> None:
        """One line when ``device`` has no bfloat16 units for this precision's matmuls: a GPU
        older than Ampere, or a CPU with neither AMX nor AVX512-BF16, where bfloat16 matmuls
        are emulated (measured on an AMD EPYC with AVX2 only: 53x slower than float32).
        ``EDITEXP_ALLOW_EMULATED_BF16=1`` runs such a CPU anyway (tests of the bf16 code)."""
        import torch

        device = torch.device(device)
        if self.matmul_dtype != torch.bfloat16:
            return
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise PrecisionError(
                f"precision={self.name}: {name} has no bfloat16 units (compute capability "
                "8.0 or newer: A100, H100, L4, RTX 30xx/40xx); use precision=32-true"
            )
        if device.type == "cpu" and not cpu_has_bf16_units():
            if os.environ.get(ALLOW_EMULATED_BF16) == "1":
                return
            raise PrecisionError(
                f"precision={self.name}: this CPU has no bfloat16 units (AMX or AVX512-BF16; "
                f"torch sees {torch.backends.cpu.get_cpu_capability()}), so its bfloat16 "
                "matmuls are emulated, about 50x slower than float32; use precision=32-true "
                f"(or set {ALLOW_EMULATED_BF16}=1 to run it anyway)"
            )


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16), as torch
    reports it; True where this torch cannot tell."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in _BF16_PROBES]
    if not all(callable(probe) for probe in probes):
        return True
    return any(probe() for probe in probes)


_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
ALLOW_EMULATED_BF16 = "EDITEXP_ALLOW_EMULATED_BF16"


PRECISIONS = {
    p.name: p
    for p in (
        Precision("64-true", "float64"),
        Precision("32-true", "float32"),
        Precision("bf16-mixed", "float32", autocast_name="bfloat16"),
        Precision("bf16-true", "bfloat16"),
    )
}
DEFAULT_PRECISION = "32-true"
PRECISION_HINT = "precision=32-true|bf16-mixed|bf16-true|64-true"  # for error messages


def get_precision(name: str | Precision | None) -> Precision:
    """The :class:`Precision` called ``name`` (None: the default, ``32-true``)."""
    if isinstance(name, Precision):
        return name
    name = DEFAULT_PRECISION if name is None else str(name)
    if name not in PRECISIONS:
        raise PrecisionError(f"precision={name!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def precision_of(dtype: torch.dtype) -> Precision:
    """The ``-true`` precision of a model whose weights are ``dtype`` (a model the user loaded)."""
    for precision in PRECISIONS.values():
        if not precision.mixed and precision.weights == dtype:
            return precision
    raise PrecisionError(
        f"a model in {dtype} has no editexp precision; load it in float32, float64 or bfloat16"
    )


@contextlib.contextmanager
def exact(device: torch.device | str) -> Iterator[None]:
    """Leave any autocast region: inside, ops run in their inputs' dtypes."""
    import torch

    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield
