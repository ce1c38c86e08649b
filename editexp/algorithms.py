"""The registry of editing algorithms: one :class:`Algorithm` record per algorithm.

A record says everything the rest of the code asks about an algorithm: where its closed-form
update is, whether a one-fact update has the rank-one form r w^T, how it reads lambda, what it
needs besides C0 (earlier updates' keys, the null space of C0), and the defaults of its
hyperparameters. The config checks (:mod:`editexp.config`), the solver dispatch
(:mod:`editexp.editing.solvers`) and singular mode (:mod:`editexp.editing.rank_one`) read it;
none of them names an algorithm.

The defaults of ``model.hparams.<name>`` are the record's ``defaults``: a model config
(``conf/model/<model>.yaml``) names only what differs for that model, and :func:`register`
puts the defaults into Hydra's config store, so ``model.hparams.<name>.<key>=...`` overrides
work for every registered algorithm.

Nothing here imports torch: checking a config stays cheap. A record names its closed form as
``"module:function"`` (imported when first solved) or holds the function itself.

Adding an algorithm: a module holding its closed form and its record (``register(Algorithm(
...))``, ``editexp/editing/<name>.py`` is found by name) and ``conf/algorithm/<name>.yaml``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from editexp.errors import UserError

# Where a registered algorithm's defaults go in Hydra's config store (config.yaml's defaults
# list places it at model.hparams, before the model config that overrides it).
DEFAULTS_CONFIG = "algorithm_defaults"


class UnknownAlgorithmError(UserError):
    """An algorithm name that no record is registered under."""


@dataclass(frozen=True)
class ValueHparams:
    """How v* is optimised (``model.hparams.<algorithm>`` without lambda and the solver's own
    hyperparameters)."""

    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 1e-3
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05


VALUE_DEFAULTS: dict[str, Any] = asdict(ValueHparams())


@dataclass(frozen=True)
class Algorithm:
    """One editing algorithm, as the config checks, the editor and singular mode see it.

    ``solver`` computes Delta (d_v, d_k), float64, as ``solver(keys (d_k, E), residuals
    (d_v, E), covariance: CovarianceFactor, params: SolveParams)``
    (:class:`editexp.editing.linalg.SolveParams`).
    """

    name: str  # algorithm=<name>
    title: str  # in messages: "MEMIT"
    solver: str | Callable[..., Any]  # "module:function", or the function
    # The one-fact update is r w^T with w = C0^-1 k / (lambda + k^T C0^-1 k) (lambda = 0 when
    # the algorithm takes none): singular mode solves all facts with one C0 solve. Otherwise
    # each fact's update is solved alone and factored as r w^T.
    rank_one: bool = False
    takes_lambda: bool = True  # False: lambda must be null (ROME)
    # lambda = 0 imposes (W + Delta) K = V exactly: fewer than d_k facts per update (EMMET).
    # Otherwise lambda = 0 leaves an unregularised least-squares system (MEMIT: K K^T).
    exact_at_zero_lambda: bool = False
    one_fact_per_update: bool = False  # ROME: batch_size 1; its mode defaults to singular
    single_layer: bool = False  # edits one layer per update
    keeps_past_keys: bool = True  # can preserve earlier updates' keys (sequential.keep_edits)
    needs_null_space: bool = False  # needs hparams.nullspace_threshold: C0's null space
    defaults: Mapping[str, Any] = field(default_factory=dict)  # model.hparams.<name>

    def closed_form(self) -> Callable[..., Any]:
        """The function computing Delta (imported on first use when named by path)."""
        if callable(self.solver):
            return self.solver
        module, _, function = self.solver.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def hparam_names(self) -> tuple[str, ...]:
        """The keys ``model.hparams.<name>`` may hold."""
        return tuple(self.defaults)


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` (or replace the record of that name) and its config defaults."""
    unknown = set(algorithm.defaults) - set(VALUE_DEFAULTS) - {"lambda", "nullspace_threshold"}
    if unknown:
        raise ValueError(f"{algorithm.name}: unknown hyperparameters {sorted(unknown)}")
    _REGISTRY[algorithm.name] = algorithm
    _store_defaults()
    return algorithm


def unregister(name: str) -> None:
    """Remove a record (a test's toy algorithm)."""
    _REGISTRY.pop(name, None)
    _store_defaults()


def _store_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    node = {name: dict(record.defaults) for name, record in _REGISTRY.items()}
    ConfigStore.instance().store(name=DEFAULTS_CONFIG, node=node)


def algorithm_names() -> list[str]:
    """The registered algorithms."""
    return sorted(_REGISTRY)


def get_algorithm(name: Any) -> Algorithm:
    """The record of ``name``; one not registered yet is looked for in
    ``editexp.editing.<name>``, whose import registers it."""
    if isinstance(name, str) and name.isidentifier() and name not in _REGISTRY:
        try:
            importlib.import_module(f"editexp.editing.{name}")
        except ModuleNotFoundError:
            pass
    if not isinstance(name, str) or name not in _REGISTRY:
        accepted = ", ".join(sorted(_REGISTRY))
        raise UnknownAlgorithmError(f"algorithm={name!r}; expected one of {accepted}")
    return _REGISTRY[name]


def _values(**changes: Any) -> dict[str, Any]:
    return {**VALUE_DEFAULTS, **changes}


def register_builtins() -> None:
    """The four algorithms of this package (their closed forms in ``editexp/editing``)."""
    register(
        Algorithm(
            name="rome",
            title="ROME",
            solver="editexp.editing.rome:solve",
            rank_one=True,
            takes_lambda=False,
            one_fact_per_update=True,
            single_layer=True,
            keeps_past_keys=False,
            defaults={"lambda": None, **VALUE_DEFAULTS},
        )
    )
    register(
        Algorithm(
            name="memit",
            title="MEMIT",
            solver="editexp.editing.memit:solve",
            rank_one=True,
            defaults=_values(**{"lambda": 15000.0}),  # MEMIT's GPT-J value
        )
    )
    register(
        Algorithm(
            name="emmet",
            title="EMMET",
            solver="editexp.editing.emmet:solve",
            rank_one=True,
            exact_at_zero_lambda=True,
            defaults=_values(**{"lambda": 0.0}),  # the paper's: exact constraints
        )
    )
    register(
        Algorithm(
            name="alphaedit",
            title="AlphaEdit",
            solver="editexp.editing.alphaedit:solve",
            needs_null_space=True,
            # alpha = 1 (the paper's), AlphaEdit's code threshold 2e-2
            defaults=_values(**{"lambda": 1.0, "nullspace_threshold": 2.0e-2}),
        )
    )


register_builtins()
