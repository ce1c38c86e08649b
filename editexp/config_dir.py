"""Where the Hydra configs are: ``conf/`` at the top of a checkout (an editable install), or
``editexp/conf/`` inside an installed wheel (pyproject.toml maps ``conf/`` there at build
time). An absolute path: Hydra resolves a relative config_path against the calling *module*
when started from a console script, and against the file only when the file is run directly.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _config_dir() -> Path:
    installed, checkout = _PACKAGE / "conf", _PACKAGE.parent / "conf"
    return installed if (installed / "config.yaml").is_file() else checkout


CONFIG_DIR = str(_config_dir())
