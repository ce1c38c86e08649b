"""Metric providers: what the :class:`~editexp.evaluation.evaluator.Evaluator` scores beside
CounterFact's ES, PS, NS and GE.

- a :class:`ModelMetricProvider` scores the model as a whole (held-out perplexity): once
  before editing (cached) and after every update the schedule scores;
- a :class:`FactMetricProvider` scores each fact (values per fact, averaged over facts like
  ES), wherever the facts are scored.

A provider is one module of this package: it registers its metrics' specs
(:func:`editexp.metric_specs.register`) and its factory (:func:`provider`) when imported.
A run turns it on by name in ``eval.metrics`` (its settings under ``eval.<name>``); a provider
outside this package is named by its module path, ``package.module:name``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from editexp.errors import UserError
from editexp.metric_specs import MetricSpec

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from editexp.data.counterfact import Fact
    from editexp.models import LoadedModel


class MetricProvider(ABC):
    """What every provider says: its metrics and what, besides the model's weights, its
    values depend on (the pre-edit cache key)."""

    specs: tuple[MetricSpec, ...] = ()

    @abstractmethod
    def cache_key(self) -> Any:
        """JSON-able settings and data identity that change the provider's values."""


class ModelMetricProvider(MetricProvider):
    """Scores the model as it is now, as a whole: metric name -> value."""

    @abstractmethod
    def score(self, model: LoadedModel) -> dict[str, float]: ...


class FactMetricProvider(MetricProvider):
    """Scores each fact on the model as it is now: per fact, metric name -> value."""

    @abstractmethod
    def score_facts(self, model: LoadedModel, facts: Sequence[Fact]) -> list[dict[str, float]]: ...


Provider = ModelMetricProvider | FactMetricProvider
ProviderFactory = Callable[["DictConfig"], Provider]  # built from the run config
_FACTORIES: dict[str, ProviderFactory] = {}


class MetricConfigError(UserError):
    """An unknown or badly configured metric provider."""


def provider(name: str) -> Callable[[ProviderFactory], ProviderFactory]:
    """Register ``factory(cfg)`` under ``name`` (the ``eval.metrics`` entry)."""

    def register(factory: ProviderFactory) -> ProviderFactory:
        _FACTORIES[name] = factory
        return factory

    return register


def unregister(name: str) -> None:
    """Forget a provider (for tests that register a toy one)."""
    _FACTORIES.pop(name, None)


def _factory(name: str) -> ProviderFactory:
    if name not in _FACTORIES:
        module = name.split(":", 1)[0] if ":" in name else f"{__name__}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise
    if name not in _FACTORIES:
        known = sorted(_FACTORIES)
        raise MetricConfigError(
            f"eval.metrics: unknown metric provider {name!r} (known: {known}; one outside "
            "editexp.evaluation.providers is named package.module:name)"
        )
    return _FACTORIES[name]


def providers_from_config(cfg: DictConfig) -> list[Provider]:
    """The providers ``cfg.eval.metrics`` names, built from the run config."""
    names = list(cfg.eval.get("metrics") or [])
    if len(set(names)) != len(names):
        raise MetricConfigError(f"eval.metrics={names} names a provider twice")
    return [_factory(str(name))(cfg) for name in names]
