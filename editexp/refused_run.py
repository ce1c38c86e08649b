"""A run refused before it starts leaves nothing behind.

Hydra creates a single run's directory and writes its log file and ``.hydra/`` files there
before the task function runs, so a run that then refuses its config or its inputs would
leave a directory with an empty ``runner.log``. :class:`NoteNewRunDir` (a Hydra callback,
``hydra.callbacks`` in ``conf/config.yaml``) notes, before Hydra creates anything, whether
the run directory is new and which of the folders above it Hydra will create;
:func:`remove_refused_run` then removes exactly what Hydra wrote there and those folders,
each only when empty. A directory that existed before (an earlier run's results) is never
touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Run directory (resolved) -> the folders that did not exist before Hydra made them, the run
# directory first, then the folders above it.
_NEW_FOLDERS: dict[Path, list[Path]] = {}
_WRITTEN: dict[Path, list[str]] = {}


class NoteNewRunDir(Callback):
    """Notes whether a single run's directory is new, before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from editexp.run_dir import hydra_written_names

        run_dir = Path(str(config.hydra.run.dir)).absolute()
        folders = []
        folder = run_dir
        while not folder.exists() and folder != folder.parent:
            folders.append(folder)
            folder = folder.parent
        _NEW_FOLDERS[run_dir.resolve()] = folders
        _WRITTEN[run_dir.resolve()] = hydra_written_names(config.hydra)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute().resolve()
        _NEW_FOLDERS.pop(run_dir, None)
        _WRITTEN.pop(run_dir, None)


def remove_refused_run(run_dir: Path) -> None:
    """Remove what Hydra wrote for a refused run into ``run_dir`` when the directory is new
    (noted by :class:`NoteNewRunDir`), and the folders Hydra created for it once empty."""
    key = Path(run_dir).absolute().resolve()
    folders = _NEW_FOLDERS.pop(key, [])
    written = _WRITTEN.pop(key, [])
    if not folders:
        return
    _close_log_files(key)
    for name in written:
        path = key / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    subfolders = {(key / name).parent for name in written} - {key}
    for folder in [*sorted(subfolders, reverse=True), *folders]:
        try:
            folder.rmdir()  # only an empty folder: anything else there stays
        except OSError:
            return


def _close_log_files(run_dir: Path) -> None:
    """Close (and detach) the log handlers Hydra opened on files in ``run_dir``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        filename = getattr(handler, "baseFilename", None)
        if filename and Path(filename).resolve().parent == run_dir:
            handler.close()
            root.removeHandler(handler)
