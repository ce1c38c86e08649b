"""OmegaConf resolvers: sweep axes the experiment presets derive from the config, and the names
of run and sweep directories.

Registered when ``editexp`` is imported, before Hydra composes anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import OmegaConf

from editexp.errors import UserError
from editexp.paths import dir_name

PAPER_BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)
# Overrides that do not name a sweep: they change neither its grid nor its results (the
# preset is already a folder of the sweep's path).
NOT_IN_SWEEP_NAME = ("logger", "force", "device", "experiment")


def csv(values) -> str:
    """A list as a Hydra sweep string: [1, 10, 100] -> "1,10,100"."""
    return ",".join(str(value) for value in values)


class ResolverError(UserError):
    """A preset's sweep axis that cannot be derived from the value given (``max_edits=0``)."""


def _count(value, what: str) -> int:
    """``value`` as a whole number >= 0, else a :class:`ResolverError` naming ``what``."""
    expected = f"{what}={value!r}; expected a positive integer"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ResolverError(expected)
    try:
        number = int(value)
    except ValueError:
        raise ResolverError(expected) from None
    if number < 0:
        raise ResolverError(expected)
    return number


def sizes_upto(limit: int, *sizes: int) -> str:
    """The sizes that are at most ``limit`` (default: the paper's batch sizes), as a sweep;
    ``limit`` is a preset's ``max_edits``."""
    sizes = sizes or PAPER_BATCH_SIZES
    limit = _count(limit, "max_edits")
    chosen = [size for size in sizes if size <= limit]
    if not chosen:
        raise ResolverError(
            f"max_edits={limit} leaves no batch size to sweep (the sizes are {csv(sizes)}); "
            f"use max_edits >= {min(sizes)}"
        )
    return csv(chosen)


def divisors_upto(total: int, *sizes: int) -> str:
    """The sizes that divide ``total`` (default: the paper's batch sizes), as a sweep;
    ``total`` is a preset's ``n_edits``."""
    sizes = sizes or PAPER_BATCH_SIZES
    total = _count(total, "n_edits")
    chosen = [size for size in sizes if total % size == 0] if total else []
    if not chosen:
        raise ResolverError(
            f"n_edits={total} is divisible by no batch size of {csv(sizes)}; use a multiple of "
            f"{min(sizes)}"
        )
    return csv(chosen)


def sweep_name(overrides: Iterable[str]) -> str:
    """The name of a sweep's directory from its command line's overrides (``hydra.overrides.task``),
    in their order, without those of ``NOT_IN_SWEEP_NAME``: the same command always gives
    the same directory, so that running it again continues the sweep. ``default`` without any."""
    kept = [
        str(item)
        for item in overrides
        if str(item).split("=", 1)[0].lstrip("+~") not in NOT_IN_SWEEP_NAME
    ]
    return dir_name(",".join(kept)) or "default"


def register() -> None:
    for name, function in (
        ("editexp.csv", csv),
        ("editexp.sizes_upto", sizes_upto),
        ("editexp.divisors_upto", divisors_upto),
        ("editexp.dir_name", dir_name),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
    # Cached: a multirun's jobs compose their own config, in which hydra.overrides.task holds
    # the job's overrides; Hydra copies the sweep's resolver cache into it (as for ${now:}), so
    # every job resolves the sweep directory its launcher created.
    if not OmegaConf.has_resolver("editexp.sweep_name"):
        OmegaConf.register_new_resolver("editexp.sweep_name", sweep_name, use_cache=True)
