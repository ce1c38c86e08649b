"""The typed, validated view of a composed run config.

Everything that can be checked without loading a model is checked here, before any expensive
work, with an error that names the bad value and what would be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from editexp.editing.editor import ALGORITHMS
from editexp.editing.keys_values import ValueHparams

MODES = ("singular", "batch", "sequential")
SCHEDULES = ("each_batch", "final", "every_k")


class ConfigError(ValueError):
    """A run config that cannot work, naming the bad value and what would be accepted."""


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
    keep_edits: bool = False  # sequential: earlier updates' keys join each solve
    nullspace_threshold: float | None = None  # AlphaEdit: eigenvalues of C0 below it span P

    @property
    def n_updates(self) -> int:
        return self.n_edits // self.batch_size


def parse_layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, ListConfig | list | tuple):
        items = list(value)
    else:
        items = [value]
    try:
        layers = tuple(int(item) for item in items)
    except (TypeError, ValueError):
        raise ConfigError(f"layer={value!r}; expected an int or a list of ints") from None
    if not layers:
        raise ConfigError("layer=[] is empty; expected an int or a non-empty list of ints")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layer={list(layers)} repeats a layer")
    return tuple(sorted(layers))


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; expected one of {', '.join(choices)}")
    return str(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}; expected a positive integer")
    return value


def run_settings(cfg: DictConfig) -> RunSettings:
    """Validate a composed config and return its typed view."""
    algorithm = _choice("algorithm", cfg.algorithm.name, ALGORITHMS)
    mode = _choice("mode", cfg.mode, MODES)
    schedule = _choice("eval.schedule", cfg.eval.schedule, SCHEDULES)
    every_k = _positive_int("eval.every_k", cfg.eval.every_k)
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
    if algorithm == "rome":
        if batch_size != 1:
            raise ConfigError(
                f"ROME edits one fact per update but this run has {batch_size} per update "
                f"(mode={mode}); use mode=singular, mode=sequential batch_size=1, or "
                "algorithm=memit / emmet"
            )
        if len(layers) != 1:
            raise ConfigError(f"ROME edits a single layer; got layer={list(layers)}")

    hparams_cfg = cfg.model.hparams.get(algorithm)
    if hparams_cfg is None:
        raise ConfigError(f"model {cfg.model.name!r} has no hparams.{algorithm} block")
    lam = cfg["lambda"] if cfg["lambda"] is not None else hparams_cfg.get("lambda")
    if algorithm == "rome":
        if cfg["lambda"] is not None:
            raise ConfigError(f"lambda={cfg['lambda']} has no meaning for ROME; leave it null")
        lam = None
    else:
        if lam is None:
            raise ConfigError(f"{algorithm} needs lambda; set lambda=<float >= 0>")
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise ConfigError(f"lambda={lam!r}; expected a float >= 0 or null") from None
        if not lam >= 0 or lam == float("inf"):
            raise ConfigError(f"lambda={lam}; expected a finite float >= 0")
    keep_edits = cfg.sequential.keep_edits
    if not isinstance(keep_edits, bool):
        raise ConfigError(f"sequential.keep_edits={keep_edits!r}; expected true or false")
    keep_edits = keep_edits and mode == "sequential"
    if keep_edits and algorithm == "rome":
        raise ConfigError(
            "sequential.keep_edits=true needs algorithm=memit, emmet or alphaedit; ROME edits "
            "one fact with an equality constraint (EMMET with batch_size=1 keeps earlier edits)"
        )
    threshold = None
    if algorithm == "alphaedit":
        threshold = hparams_cfg.get("nullspace_threshold")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold < float("inf")
        ):
            raise ConfigError(
                f"model.hparams.alphaedit.nullspace_threshold={threshold!r}; expected a float > 0"
            )
        threshold = float(threshold)
    hparams_dict = OmegaConf.to_container(hparams_cfg)
    not_values = ("lambda", "nullspace_threshold")
    values = {k: v for k, v in hparams_dict.items() if k not in not_values}
    try:
        hparams = ValueHparams(**values)
    except TypeError as error:
        raise ConfigError(f"model.hparams.{algorithm}: {error}") from None
    _positive_int(f"model.hparams.{algorithm}.v_steps", hparams.v_steps)
    return RunSettings(
        model_name=str(cfg.model.name),
        algorithm=algorithm,
        mode=mode,
        layers=layers,
        n_edits=n_edits,
        batch_size=batch_size,
        lam=lam,
        hparams=hparams,
        schedule="each_batch" if mode != "sequential" else schedule,
        every_k=every_k,
        seed=int(cfg.seed),
        keep_edits=keep_edits,
        nullspace_threshold=threshold,
    )
