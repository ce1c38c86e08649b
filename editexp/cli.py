"""The ``editexp`` console script: a thin entry that imports torch only when a run starts.

``editexp --help``, ``--version``, ``--cfg job`` and tab completion (``-sc``) compose configs
and print; none of them needs torch, so this module imports only Hydra and editexp's config
helpers, and the runner (:mod:`editexp.runner`, torch and transformers) is imported inside
the task function. ``editexp --version`` prints editexp's version and Hydra's.

``--help`` prints Hydra's help (the ``hydra.help`` template of ``conf/config.yaml``) from the
config file and the config groups in ``conf/``, as Hydra prints it, without composing: Hydra
lists the groups by copying its config repository once per group, which takes a second.
"""

from __future__ import annotations

import string
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from editexp.config_dir import CONFIG_DIR
from editexp.errors import EXIT_INTERRUPTED, cli_errors

PROG = "editexp"


def version_text(prog: str = PROG) -> str:
    """``<prog> <version> (Hydra <version>, torch <version>)``: torch's from its package
    metadata, without importing it."""
    from hydra import __version__ as hydra_version

    from editexp import __version__

    try:
        torch_version = f", torch {installed_version('torch')}"
    except PackageNotFoundError:
        torch_version = ""
    return f"{prog} {__version__} (Hydra {hydra_version}{torch_version})"


def help_text() -> str:
    """What ``editexp --help`` prints: the ``hydra.help`` template with the config groups."""
    help_cfg = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").hydra.help
    groups = "".join(f"{group}: {', '.join(options)}\n" for group, options in config_groups())
    return string.Template(help_cfg.template).substitute(APP_CONFIG_GROUPS=groups)


def config_groups() -> list[tuple[str, list[str]]]:
    """The config groups in ``conf/`` (Hydra's own, ``hydra/...``, left out) and their options,
    sorted as Hydra lists them."""
    root = Path(CONFIG_DIR)
    groups = []
    for folder in sorted(path for path in root.rglob("*") if path.is_dir()):
        group = folder.relative_to(root).as_posix()
        options = sorted(path.stem for path in folder.glob("*.yaml"))
        if options and group != "hydra" and not group.startswith("hydra/"):
            groups.append((group, options))
    return groups


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    """The task function: one run; returns its objective (for Hydra's optimising sweepers)."""
    from editexp.task import run_task  # torch, transformers: only when a run starts

    return run_task(cfg)


def main() -> None:
    """The ``editexp`` console script: user errors as one line on stderr and exit status 2;
    Ctrl-C as one line and exit status 130."""
    if "--version" in sys.argv[1:]:
        print(version_text())
        return
    if sys.argv[1:2] in (["--help"], ["-h"]):
        print(help_text())
        return
    try:
        with cli_errors(PROG):
            _hydra_main()
    except KeyboardInterrupt:  # a launcher waiting for its jobs (the runs say more themselves)
        print(
            f"{PROG}: interrupted; rerunning the same command resumes (finished runs are "
            "skipped, interrupted ones continue from their checkpoints)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
