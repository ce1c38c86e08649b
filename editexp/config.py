"""The run config: composing it (with or without Hydra) and its typed, validated view.

Everything that can be checked without loading a model is checked here, before any expensive
work, with an error that names the bad value and what would be accepted. Nothing here imports
torch, so a bad config fails in a fraction of a second.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from editexp.algorithms import (
    VALUE_DEFAULTS,
    Algorithm,
    UnknownAlgorithmError,
    ValueHparams,
    algorithm_names,
    get_algorithm,
)
from editexp.config_dir import CONFIG_DIR
from editexp.errors import UserError
from editexp.objective import Objective, parse_objective
from editexp.precision import DEFAULT_PRECISION, PRECISION_HINT, PRECISIONS

__all__ = [
    "ConfigError",
    "RunSettings",
    "ValueHparams",
    "check_appended",
    "compose",
    "run_settings",
]


MODES = ("singular", "batch", "sequential")
SCHEDULES = ("each_batch", "final", "every_k")
GENERATION_AT = ("every_scoring", "final")  # eval.generation_at


class ConfigError(UserError):
    """A run config that cannot work, naming the bad value and what would be accepted."""


def model_names() -> list[str]:
    """The models with a config in ``conf/model``."""
    return sorted(path.stem for path in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def compose(
    model: str | Mapping[str, Any] = "smollm2-135m", algorithm: str = "memit", **overrides: Any
) -> DictConfig:
    """The run config of ``conf/`` without a Hydra app: ``model`` (a name in
    ``conf/model``, or a whole model config), ``algorithm``, then ``overrides`` by
    config key.

    Keys with dots go in as ``**{"editing.prefixes.count": 2}``; ``lam`` stands for
    ``lambda`` (a Python keyword). ``logger`` is ``none``: a library user tracks nothing.
    An algorithm that edits one fact per update (ROME) defaults to ``mode=singular``.
    """
    if algorithm_record(algorithm).one_fact_per_update:
        overrides.setdefault("mode", "singular")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    name = model if isinstance(model, str) else "smollm2-135m"
    if name not in model_names():
        raise ConfigError(f"model={name!r}; expected one of {', '.join(model_names())}")
    groups = [f"model={name}", f"algorithm={algorithm}", "logger=none"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose from its tree
        cfg = hydra_compose("config", overrides=groups)
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=groups)
    if not isinstance(model, str):
        cfg.model = OmegaConf.create(dict(model))
    for key, value in overrides.items():
        key = "lambda" if key == "lam" else key
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"{key}={value!r}: the config has no key {key!r}")
        OmegaConf.update(cfg, key, value, merge=isinstance(value, Mapping))
    return cfg


_ABSENT = object()

# Keys a run reads when they are given but the config does not define: the only ones a command
# line may append (+key=value); a key below one of them is fine too.
OPTIONAL_KEYS = ("debug.stop_after_updates", "eval.metrics", "eval.perplexity")
# Keys that were settings once, and what replaced them.
REPLACED_KEYS = {"model.dtype": PRECISION_HINT, "stats.dtype": PRECISION_HINT}


def check_appended(overrides: Iterable[str], cfg: DictConfig, groups: Mapping[str, Any]) -> None:
    """Refuse ``+key=value`` for a key the config does not know (``+lamda=10`` would run with
    the default lambda), as :func:`compose` refuses it. ``groups``: the config groups chosen
    (``hydra.runtime.choices``); ``+experiment=...`` appends a group, not a key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not override.is_add() or key in groups or _is_optional(key):
            continue
        known = [name for name in _flat_keys(cfg) if name != key]
        close = difflib.get_close_matches(key, [*known, *OPTIONAL_KEYS], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        if key in REPLACED_KEYS:
            hint = f" (it was replaced by {REPLACED_KEYS[key]})"
        raise ConfigError(
            f"{override.input_line}: the config has no key {key!r}{hint}; only a config group "
            f"(+experiment=...) or one of {', '.join(OPTIONAL_KEYS)} may be appended with +"
        )


def _is_optional(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in OPTIONAL_KEYS)


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a config, dotted (``eval.schedule``), without resolving a value."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_interpolation():
        return []
    keys = []
    for name in node.keys():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        keys += _flat_keys(node._get_node(name), dotted + ".")
    return keys


@dataclass(frozen=True)
class RunSettings:
    model_name: str
    algorithm: str
    mode: str
    layers: tuple[int, ...]
    n_edits: int
    batch_size: int  # facts per update as actually run: 1 (singular), n_edits (batch)
    lam: float | None
    hparams: ValueHparams
    schedule: str
    every_k: int
    seed: int
    generation_at: str = "every_scoring"  # GE at every scoring, or at the last update's only
    keep_edits: bool = False  # sequential: earlier updates' keys join each solve
    nullspace_threshold: float | None = None  # AlphaEdit: eigenvalues of C0 below it span P
    objective: Objective = Objective("post", "S")  # what the Hydra task function returns
    precision: str = "32-true"  # editexp/precision.py

    @property
    def n_updates(self) -> int:
        return self.n_edits // self.batch_size

    def check_model(self, d_k: int) -> None:
        """The checks that need the loaded model's key dimension d_k."""
        algorithm = get_algorithm(self.algorithm)
        if algorithm.exact_at_zero_lambda and self.lam == 0 and self.batch_size >= d_k:
            raise ConfigError(
                f"{algorithm.title} with lambda=0 needs fewer than d_k={d_k} facts per update, got "
                f"batch_size={self.batch_size}; use lambda > 0 (e.g. lambda=1e-4)"
            )


def parse_layers(value: Any) -> tuple[int, ...]:
    """``layer`` (an int or a list of ints, no repeats) as a sorted tuple; ``editexp`` and
    ``editexp-stats`` both check it here."""
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if any(isinstance(item, bool) or not isinstance(item, int) for item in items):
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        raise ConfigError(f"layer={shown!r}; expected an int or a list of ints")
    if not items:
        raise ConfigError("layer=[] is empty; expected an int or a non-empty list of ints")
    if len(set(items)) != len(items):
        raise ConfigError(f"layer={items} repeats a layer")
    return tuple(sorted(items))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; expected one of {', '.join(choices)}")
    return str(value)


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name}={value!r}; expected a positive integer")
    return value


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if not _is_int(value) or (minimum is not None and value < minimum):
        accepted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"{name}={value!r}; expected {accepted}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}; expected true or false")
    return value


def _number(name: str, value: Any, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 with ``positive``); ints are fine, bools are not."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name}={value!r}; expected a finite number {bound}")
    return float(value)


def _optional_str(name: str, value: Any, accepted: str) -> None:
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise ConfigError(f"{name}={value!r}; expected {accepted}")


DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)")


def check_device(value: Any) -> str:
    """``device``: auto, cpu, mps, cuda or cuda:N; a CUDA device must exist."""
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"device={value!r}; expected auto, cpu, cuda, cuda:<index> or mps")
    if value.startswith("cuda"):
        import torch  # only here: composing and checking a config does not need torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= available:
            raise ConfigError(
                f"device={value} but torch sees {available} CUDA device(s); use device=auto "
                "(cuda when present, else cpu) or device=cpu"
            )
    return value


def check_inputs(cfg: DictConfig) -> None:
    """Types and ranges of everything outside the sweep axes (run_settings checks those)."""
    _int("seed", cfg.seed)
    _int("data.fact_set", cfg.data.get("fact_set", 0), minimum=0)
    check_device(cfg.device)
    _choice("precision", cfg.get("precision", DEFAULT_PRECISION), tuple(PRECISIONS))
    _bool("force", cfg.force)
    _bool("save_deltas", cfg.save_deltas)
    _check_stats(cfg.stats)
    prefixes = cfg.editing.prefixes
    _int("editing.prefixes.count", prefixes.count, minimum=0)
    _positive_int("editing.prefixes.length", prefixes.length)
    _int("editing.prefixes.seed", prefixes.seed)
    _positive_int("editing.batch_size", cfg.editing.batch_size)
    _bool("editing.cache", cfg.editing.get("cache", True))
    _check_eval(cfg.eval)
    _check_data(cfg.data)
    _check_logger(cfg.get("logger"))


WANDB_MODES = ("offline", "online", "disabled")


def _check_logger(logger: DictConfig | None) -> None:
    """W&B's ``logger.mode``, checked before the run starts ($WANDB_MODE, when set, wins)."""
    if logger is not None and logger.get("name") == "wandb" and logger.get("mode") is not None:
        _choice("logger.mode", logger.mode, WANDB_MODES)


def _check_stats(stats: DictConfig) -> None:
    for key in ("n_tokens", "seq_len", "batch_size"):
        _positive_int(f"stats.{key}", stats[key])
    if stats.get("dtype") is not None:
        raise ConfigError(
            f"stats.dtype={stats.dtype} is not a setting; the statistics run in the run's "
            f"precision: {PRECISION_HINT}"
        )
    corpus_files = stats.corpus.get("files")
    if corpus_files is not None and not (
        isinstance(corpus_files, ListConfig | list)
        and corpus_files
        and all(isinstance(path, str) and path for path in corpus_files)
    ):
        raise ConfigError(
            f"stats.corpus.files={corpus_files!r}; expected a non-empty list of text file paths "
            "(or null for <data.dir>/corpus/*.txt)"
        )


def _check_eval(evaluation: DictConfig) -> None:
    _positive_int("eval.batch_size", evaluation.batch_size)
    if evaluation.get("layer_states_gb") is not None:
        _number("eval.layer_states_gb", evaluation.layer_states_gb)
    generation_facts = evaluation.generation_facts
    if not (isinstance(generation_facts, str) and generation_facts.strip().lower() == "all"):
        if not _is_int(generation_facts) or generation_facts < 0:
            raise ConfigError(
                f"eval.generation_facts={generation_facts!r}; expected a number of facts >= 0 "
                "or 'all'"
            )
    _positive_int("eval.generation_length", evaluation.generation_length)
    _positive_int("eval.generation_batch_size", evaluation.generation_batch_size)
    _int("eval.held_out_keys", evaluation.held_out_keys, minimum=0)


def _check_data(data: DictConfig) -> None:
    _choice("data.order", data.order, ("seeded", "file", "case_ids"))
    _bool("data.unique_subjects", data.unique_subjects)
    _optional_str("data.dir", data.get("dir"), "a folder path or null")
    _optional_str("data.counterfact", data.get("counterfact"), "a CounterFact JSON path or null")
    case_ids = data.get("case_ids")
    if isinstance(case_ids, ListConfig | list):
        _check_case_id_list(case_ids)
    elif case_ids is not None:
        _optional_str("data.case_ids", case_ids, "a list of integer case_ids or a file path")
    if case_ids is not None and data.order == "file":
        raise ConfigError(
            "data.case_ids is set but data.order=file; data.case_ids implies "
            "data.order=case_ids (set it, or leave data.case_ids null)"
        )


def _check_case_id_list(case_ids: Any) -> None:
    bad = [item for item in case_ids if not _is_int(item)]
    if bad or not case_ids:
        raise ConfigError(
            f"data.case_ids has {bad[0]!r}; expected a list of integer case_ids or a file"
            if bad
            else "data.case_ids=[] is empty; expected a list of integer case_ids or a file"
        )
    repeated = sorted(item for item, n in Counter(case_ids).items() if n > 1)
    if repeated:
        raise ConfigError(
            f"data.case_ids repeats {repeated[:10]}; each fact may be edited once per run"
        )


@dataclass(frozen=True)
class RunShape:
    """What a run edits: mode, layers, facts and facts per update."""

    mode: str
    layers: tuple[int, ...]
    n_edits: int
    batch_size: int


@dataclass(frozen=True)
class SolverSettings:
    """How each update is solved: lambda, v* optimisation, earlier keys, null space."""

    lam: float | None
    hparams: ValueHparams
    keep_edits: bool
    nullspace_threshold: float | None


def run_settings(cfg: DictConfig) -> RunSettings:
    """Validate a composed config and return its typed view."""
    try:
        return _run_settings(cfg)
    except OmegaConfBaseException as error:  # an interpolation that cannot resolve, a missing key
        raise ConfigError(f"config: {error}") from None


def _run_settings(cfg: DictConfig) -> RunSettings:
    check_inputs(cfg)
    algorithm = algorithm_record(cfg.algorithm.name)
    shape = _run_shape(cfg, algorithm)
    solver = _solver_settings(cfg, algorithm, shape.mode)
    schedule = _choice("eval.schedule", cfg.eval.schedule, SCHEDULES)
    every_k = _positive_int("eval.every_k", cfg.eval.every_k)
    generation_at = _choice(
        "eval.generation_at", cfg.eval.get("generation_at", "every_scoring"), GENERATION_AT
    )
    if shape.mode != "sequential":
        schedule = "each_batch"
    elif generation_at == "final" and schedule == "each_batch":
        raise ConfigError(
            "eval.generation_at=final with eval.schedule=each_batch: each fact is scored once, "
            "right after its own update, so GE would cover the last batch's facts only; "
            "use eval.schedule=every_k or final, or eval.generation_at=every_scoring"
        )
    generation_facts = cfg.eval.generation_facts  # a count or "all" (checked above)
    with_ge = generation_facts == "all" or generation_facts > 0
    objective = parse_objective(cfg.get("objective", "post.S"), schedule, with_ge)
    return RunSettings(
        model_name=str(cfg.model.name),
        algorithm=algorithm.name,
        mode=shape.mode,
        layers=shape.layers,
        n_edits=shape.n_edits,
        batch_size=shape.batch_size,
        lam=solver.lam,
        hparams=solver.hparams,
        schedule=schedule,
        every_k=every_k,
        seed=cfg.seed,
        generation_at=generation_at,
        keep_edits=solver.keep_edits,
        nullspace_threshold=solver.nullspace_threshold,
        objective=objective,
        precision=str(cfg.get("precision", DEFAULT_PRECISION)),
    )


def algorithm_record(name: Any) -> Algorithm:
    """The registry's record of ``name``; an unknown name is a :class:`ConfigError`."""
    try:
        return get_algorithm(name)
    except UnknownAlgorithmError as error:
        raise ConfigError(str(error)) from None


def _run_shape(cfg: DictConfig, algorithm: Algorithm) -> RunShape:
    mode = _choice("mode", cfg.mode, MODES)
    n_edits = _positive_int("n_edits", cfg.n_edits)
    batch_size = _positive_int("batch_size", cfg.batch_size)
    layers = parse_layers(cfg.layer)
    n_layers = int(cfg.model.n_layers)
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise ConfigError(
            f"layer={outside} is outside model {cfg.model.name!r}, which has layers "
            f"0..{n_layers - 1}"
        )
    if mode == "singular":
        batch_size = 1
    elif mode == "batch":
        batch_size = n_edits
    elif n_edits % batch_size:
        raise ConfigError(
            f"mode=sequential needs n_edits divisible by batch_size; got n_edits={n_edits}, "
            f"batch_size={batch_size} (e.g. n_edits={n_edits - n_edits % batch_size or batch_size})"
        )
    if algorithm.one_fact_per_update and batch_size != 1:
        batched = ", ".join(name for name in algorithm_names() if name != algorithm.name)
        raise ConfigError(
            f"{algorithm.title} edits one fact per update but this run has {batch_size} per "
            f"update (mode={mode}); use mode=singular, mode=sequential batch_size=1, or "
            f"another algorithm ({batched})"
        )
    if algorithm.single_layer and len(layers) != 1:
        raise ConfigError(f"{algorithm.title} edits a single layer; got layer={list(layers)}")
    return RunShape(mode, layers, n_edits, batch_size)


def _solver_settings(cfg: DictConfig, algorithm: Algorithm, mode: str) -> SolverSettings:
    block = hparams_block(cfg, algorithm)
    keep_edits = cfg.sequential.keep_edits
    if not isinstance(keep_edits, bool):
        raise ConfigError(f"sequential.keep_edits={keep_edits!r}; expected true or false")
    keep_edits = keep_edits and mode == "sequential"
    if keep_edits and not algorithm.keeps_past_keys:
        keeping = ", ".join(n for n in algorithm_names() if algorithm_record(n).keeps_past_keys)
        raise ConfigError(
            f"sequential.keep_edits=true needs an algorithm that keeps earlier edits' keys "
            f"({keeping}); {algorithm.title} cannot"
        )
    threshold = None
    if algorithm.needs_null_space:
        threshold = _null_space_threshold(algorithm, block.get("nullspace_threshold"))
    values = {key: value for key, value in block.items() if key in VALUE_DEFAULTS}
    hparams = ValueHparams(**values)
    _check_hparams(algorithm.name, hparams)
    lam = _lambda(cfg["lambda"], block.get("lambda"), algorithm)
    return SolverSettings(lam, hparams, keep_edits, threshold)


def hparams_block(cfg: DictConfig, algorithm: Algorithm) -> dict[str, Any]:
    """``model.hparams.<algorithm>`` over the registry's defaults (a model config names only
    what differs for it)."""
    named = cfg.model.get("hparams", {}).get(algorithm.name) or {}
    if isinstance(named, DictConfig):
        named = OmegaConf.to_container(named, resolve=True)
    unknown = sorted(set(named) - set(algorithm.hparam_names))
    if unknown:
        raise ConfigError(
            f"model.hparams.{algorithm.name}.{unknown[0]}: no such hyperparameter; expected "
            f"{', '.join(algorithm.hparam_names)}"
        )
    return {**algorithm.defaults, **named}


def _lambda(given: Any, default: Any, algorithm: Algorithm) -> float | None:
    """The run's ``lambda`` (null: the model's default for the algorithm), checked."""
    if not algorithm.takes_lambda:
        if given is not None:
            raise ConfigError(f"lambda={given} has no meaning for {algorithm.title}; leave it null")
        return None
    lam = given if given is not None else default
    if lam is None:
        raise ConfigError(f"{algorithm.name} needs lambda; set lambda=<float >= 0>")
    try:
        if isinstance(lam, bool):
            raise TypeError
        lam = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"lambda={lam!r}; expected a float >= 0 or null") from None
    if not lam >= 0 or lam == float("inf"):
        raise ConfigError(f"lambda={lam}; expected a finite float >= 0")
    return lam


def _null_space_threshold(algorithm: Algorithm, threshold: Any) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 < threshold < float("inf")
    ):
        raise ConfigError(
            f"model.hparams.{algorithm.name}.nullspace_threshold={threshold!r}; expected a "
            "float > 0"
        )
    return float(threshold)


def _check_hparams(algorithm: str, hparams: ValueHparams) -> None:
    prefix = f"model.hparams.{algorithm}"
    _positive_int(f"{prefix}.v_steps", hparams.v_steps)
    _number(f"{prefix}.v_lr", hparams.v_lr, positive=True)
    _number(f"{prefix}.clamp_norm_factor", hparams.clamp_norm_factor, positive=True)
    for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
        _number(f"{prefix}.{name}", getattr(hparams, name))
