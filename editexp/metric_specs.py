"""The metrics a run reports, named once: what each is, its unit, which way is better, how
it is printed. Records, W&B tracking, the report and the figures read them from here.

CounterFact's metrics are defined below; a metric provider (``editexp.evaluation.providers``)
registers its own with :func:`register` when its module is imported, and
:func:`headline_metrics` imports every provider module once, so a new metric needs no change
here or in the modules that show metrics.

A metric found in a record but registered nowhere is still shown, with a plain label.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric."""

    name: str  # the key in records ("ES", "PPL")
    description: str  # what it is, e.g. "efficacy score"
    unit: str  # as shown after the value: "%", "bits x 100", "" (a plain number)
    higher_is_better: bool
    decimals: int = 2
    headline: bool = True  # a column of the tables and a panel of the figures
    always: bool = False  # a column even when no run measured it (CounterFact's)
    log_axis: bool = False  # drawn on a log axis: a ratio that can span orders of magnitude

    @property
    def label(self) -> str:
        """An axis label: "efficacy score ES (%)"."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.description} {self.name}{unit}"

    def format(self, mean: float | None, std: float | None = None) -> str:
        """A table cell: "94.50", or "94.50 (3.20)" with a standard deviation."""
        if mean is None:
            return ""
        text = f"{mean:.{self.decimals}f}"
        return text if std is None else f"{text} ({std:.{self.decimals}f})"


_SPECS: dict[str, MetricSpec] = {}
PROVIDER_PACKAGE = "editexp.evaluation.providers"
_discovered = False


def register(spec: MetricSpec) -> MetricSpec:
    """Make ``spec`` known (a second registration of the same name must be the same spec)."""
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"metric {spec.name!r} is already registered as {known}")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Forget a metric (for tests that register a toy one)."""
    _SPECS.pop(name, None)


def discover() -> None:
    """Import every module of the provider package once, so that their metrics register."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(PROVIDER_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{PROVIDER_PACKAGE}.{module.name}")


def spec(name: str) -> MetricSpec:
    """The registered spec of ``name``, or a plain one for a metric registered nowhere."""
    discover()
    return _SPECS.get(name) or MetricSpec(name, name, "", higher_is_better=True)


def registered() -> tuple[str, ...]:
    """The names of every registered metric (the providers' included)."""
    discover()
    return tuple(_SPECS)


def headline_metrics(present: Iterable[str] = ()) -> tuple[str, ...]:
    """The metrics to show, in order: the registered headline ones that are always shown or
    are ``present`` (e.g. keys of a record's blocks), then present ones registered nowhere."""
    discover()
    present = list(dict.fromkeys(present))
    shown = [s.name for s in _SPECS.values() if s.headline and (s.always or s.name in present)]
    return (*shown, *(name for name in present if name not in _SPECS))


def metrics_in(blocks: Iterable[Mapping[str, Any] | None]) -> tuple[str, ...]:
    """:func:`headline_metrics` of the metric keys found in ``blocks`` (pre / post blocks)."""
    return headline_metrics(key for block in blocks for key in (block or {}))


for _spec in (
    MetricSpec("ES", "efficacy score", "%", True, always=True),
    MetricSpec("PS", "paraphrase score", "%", True, always=True),
    MetricSpec("NS", "neighborhood score", "%", True, always=True),
    MetricSpec("S", "score, harmonic mean", "%", True, always=True),
    MetricSpec("GE", "generation entropy", "bits x 100", True, always=True),
    MetricSpec("ES_magnitude", "efficacy magnitude", "pp", True, headline=False),
    MetricSpec("PS_magnitude", "paraphrase magnitude", "pp", True, headline=False),
    MetricSpec("NS_magnitude", "neighborhood magnitude", "pp", True, headline=False),
):
    register(_spec)
