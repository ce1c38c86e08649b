"""A multirun is checked whole before its first job is submitted.

Every grid point gets the checks a run makes before it loads its model (the config's types
and ranges, the CounterFact file and the selection, the corpus, the model's layer count and
positions from its config and tokenizer) and a check of its job directory for planted links.
A sweep with a bad point is refused with one line that names every bad point and why:
otherwise ``layer=0,9`` would run point 0 to the end and then refuse layer 9 (on SLURM, hours
after submission). The launchers in ``hydra_plugins/editexp_launcher`` call
:func:`check_grid`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import filter_overrides
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from editexp.config import check_appended
from editexp.errors import UserError, one_line
from editexp.run_dir import hydra_written_names, refuse_planted_links

_SHOWN = 5  # bad points named in full; the rest are counted


class SweepError(UserError):
    """Grid points of a multirun that would fail before doing any work."""


def check_grid(
    config_loader: Any, sweep_config: DictConfig, job_overrides: Sequence[Sequence[str]], first: int
) -> None:
    """Refuse the sweep (:class:`SweepError`) when any grid point would be refused by its run.

    ``config_loader`` and ``sweep_config``: the launcher's (Hydra's config loader and the
    multirun's config); ``job_overrides``: the points, numbered from ``first``.
    """
    saved = HydraConfig.instance().cfg
    memo: dict[str, Any] = {}
    problems = []
    try:
        for offset, overrides in enumerate(job_overrides):
            problem = point_problem(config_loader, sweep_config, overrides, first + offset, memo)
            if problem is not None:
                shown = " ".join(filter_overrides(overrides))
                problems.append(f"#{first + offset} ({shown}): {problem}")
    finally:
        HydraConfig.instance().cfg = saved
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise SweepError(
            f"{len(problems)} of {len(job_overrides)} grid points would fail, so no job was "
            f"started: {'; '.join(problems[:_SHOWN])}{more}"
        )


def point_problem(
    config_loader: Any,
    sweep_config: DictConfig,
    overrides: Sequence[str],
    num: int,
    memo: dict[str, Any],
) -> str | None:
    """Why grid point ``num`` would be refused, in one line; None when it passes."""
    try:
        config = config_loader.load_sweep_config(sweep_config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        HydraConfig.instance().set_config(config)
        job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        refuse_planted_links(job_dir, hydra_written_names(config.hydra))
        task = copy.deepcopy(config)
        with open_dict(task):
            del task["hydra"]
        check_appended(overrides, task, config.hydra.runtime.choices)
        check_run(task, memo)
    except (UserError, HydraException, OmegaConfBaseException) as error:
        return one_line(error)
    return None


def check_run(cfg: DictConfig, memo: dict[str, Any]) -> None:
    """The runner's checks before it loads the model; what grid points share (the facts, the
    model's shape) is read once (``memo``)."""
    from editexp.config import run_settings
    from editexp.models import model_shape
    from editexp.run_inputs import check_against_model, read_inputs

    settings = run_settings(cfg)
    inputs_key = OmegaConf.to_yaml(
        {"data": cfg.data, "stats": cfg.stats, "n": settings.n_edits, "seed": settings.seed}
    )
    if inputs_key not in memo:
        memo[inputs_key] = read_inputs(cfg, settings)[0]
    facts = memo[inputs_key]
    shape_key = OmegaConf.to_yaml({"model": cfg.model, "layer": settings.layers[0]})
    if shape_key not in memo:
        memo[shape_key] = model_shape(cfg.model, settings.layers[0])
    check_against_model(cfg, settings, memo[shape_key], facts)
