"""OmegaConf resolvers the experiment presets use to derive sweep axes from the config.

Registered when ``editexp`` is imported, before Hydra composes anything.
"""

from __future__ import annotations

from omegaconf import OmegaConf

PAPER_BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)


def csv(values) -> str:
    """A list as a Hydra sweep string: [1, 10, 100] -> "1,10,100"."""
    return ",".join(str(value) for value in values)


def sizes_upto(limit: int, *sizes: int) -> str:
    """The sizes that are at most ``limit`` (default: the paper's batch sizes), as a sweep."""
    chosen = [size for size in (sizes or PAPER_BATCH_SIZES) if size <= int(limit)]
    if not chosen:
        raise ValueError(f"no size of {sizes or PAPER_BATCH_SIZES} is <= {limit}")
    return csv(chosen)


def divisors_upto(total: int, *sizes: int) -> str:
    """The sizes that divide ``total`` (default: the paper's batch sizes), as a sweep."""
    chosen = [size for size in (sizes or PAPER_BATCH_SIZES) if int(total) % size == 0]
    if not chosen:
        raise ValueError(f"no size of {sizes or PAPER_BATCH_SIZES} divides {total}")
    return csv(chosen)


def register() -> None:
    for name, function in (
        ("editexp.csv", csv),
        ("editexp.sizes_upto", sizes_upto),
        ("editexp.divisors_upto", divisors_upto),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
