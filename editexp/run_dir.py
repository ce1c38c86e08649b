"""A run directory holds one config and one attempt at a time: nothing lost, nothing mixed.

- **Lock.** A run holds ``<run dir>/.editexp.lock`` (an exclusive ``flock``) from before it
  reads anything in the directory until it ends. The lock file names its holder (host, pid,
  SLURM job, start time); a second job on the same directory fails at once with that name.
  The kernel drops the lock when its holder dies, so a killed job never blocks the next one.
- **Identity.** ``config_hash`` (every setting that changes results: not the logger, the
  device, ``force`` or where the data lives) and ``data_hash`` (the contents of the CounterFact
  file and of the statistics corpus) go into ``run.json`` when an attempt starts, and into
  ``checkpoint.pt`` and ``summary.json``. Before a finished run is skipped or a checkpoint is
  resumed they are compared with the new run's; a difference is refused with a message that
  says what differs and how to proceed.
- **force=true** moves the earlier attempt's files into ``.attempts/<time>/`` before the new
  attempt writes anything (``summary.json`` first), so a killed rerun never leaves a finished
  summary beside half-rewritten rows.
- **Untrusted contents.** Others may write into a directory on a shared file system:
  ``checkpoint.pt`` is loaded as plain data only (``weights_only``), and nothing is written
  through a symbolic link in the directory (:func:`refuse_planted_links`, ``O_NOFOLLOW`` for
  the lock; :class:`RefusePlantedLinks` before Hydra writes its log and ``.hydra/``).
- :func:`summary_problem` lets ``editexp-report`` check a point's summary against the config
  Hydra wrote for that point.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pickle
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from editexp.cache import atomic_write_json, atomic_write_text, stable_hash, write_problem
from editexp.errors import EXIT_USER_ERROR, UserError, one_line
from editexp.precision import DEFAULT_PRECISION, PRECISIONS

LOCK_NAME = ".editexp.lock"
RECORD_NAME = "run.json"
ATTEMPTS_DIR = ".attempts"
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.pt"
HEARTBEAT_NAME = "attempt.json"  # the running attempt's seconds so far (editexp.heartbeat)
# What one attempt writes into its run directory, moved aside together by force=true
# (summary.json first: an interrupted move never leaves a summary beside other rows).
RESULT_NAMES = (
    SUMMARY_NAME,
    "deltas.pt",
    CHECKPOINT_NAME,
    HEARTBEAT_NAME,
    "facts.jsonl",
    "batches.jsonl",
    "wandb",
    RECORD_NAME,
)
# Keys added after runs were made, with the default that reproduces those runs: left out of a
# run's identity when they hold it.
KEYS_ADDED_LATER = {
    "data.split": "all",
    "data.fact_set": 0,
    "eval.generation_at": "every_scoring",
}
# Config keys that do not change results: tracking, devices, rerun switches, and where the
# data lives (its contents are the data hash).
NOT_RESULTS = (
    "logger",
    "force",
    "device",
    "debug",
    "objective",
    "save_deltas",
    "eval.generation_batch_size",  # every prompt samples the same text in any batch
    "data.dir",
    "data.counterfact",
    "data.download_url",
    "data.hf_dataset",
    "stats.corpus.files",
)
_HOW = (
    "rerun with force=true to move its results aside (into {attempts}) and start over, or "
    "give this run another directory (hydra.run.dir=... or hydra.sweep.dir=...)"
)


class RunDirError(UserError):
    """The run directory cannot be used as asked: in use, or holding another config's run."""


# --------------------------------------------------------------------------- identity


def comparable_config(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The resolved config without the keys that do not change results (``NOT_RESULTS``)."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    else:
        container = json.loads(json.dumps(cfg, default=str))
    for dotted in NOT_RESULTS:
        _pop(container, dotted)
    _as_dtypes(container)
    for dotted, default in KEYS_ADDED_LATER.items():  # runs made before them keep their hash
        _pop(container, dotted, only_if=default)
    return container


_ANY = object()


def _pop(container: dict[str, Any], dotted: str, only_if: Any = _ANY) -> None:
    """Remove the key ``dotted`` ("a.b.c") from ``container`` (only when it holds ``only_if``,
    where that is given)."""
    *parents, last = dotted.split(".")
    node: Any = container
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node and only_if in (_ANY, node[last]):
        node.pop(last)


def _as_dtypes(container: dict[str, Any]) -> None:
    """``precision`` replaced ``model.dtype`` and ``stats.dtype``: a run in a ``-true``
    precision (one those two keys could say) is compared as they said it, so runs made before
    keep their config hash."""
    precision = PRECISIONS.get(container.get("precision", DEFAULT_PRECISION))
    if precision is None or precision.mixed:  # bf16-mixed: no such run existed before
        return
    container.pop("precision", None)
    for block in ("model", "stats"):
        if isinstance(container.get(block), dict):
            container[block]["dtype"] = precision.weights_name


@dataclass(frozen=True)
class RunIdentity:
    """What a run's results depend on: its config and the contents of its data."""

    config: dict[str, Any]  # comparable_config(cfg)
    data: dict[str, str]  # e.g. {"counterfact": sha256, "corpus": identity}

    @classmethod
    def of(cls, cfg: DictConfig, data: Mapping[str, str]) -> RunIdentity:
        return cls(comparable_config(cfg), dict(data))

    @property
    def config_hash(self) -> str:
        return stable_hash(self.config)

    @property
    def data_hash(self) -> str:
        return stable_hash(self.data)

    def hashes(self) -> dict[str, str]:
        """The two hashes, as stored in checkpoint.pt and summary.json."""
        return {"config_hash": self.config_hash, "data_hash": self.data_hash}

    def record(self) -> dict[str, Any]:
        return {**self.hashes(), "config": self.config, "data": self.data}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(value: Any) -> str:
    return value if value == "(unset)" else json.dumps(value, default=str)


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """``"lambda: 1.0 -> 100.0, n_edits: 16 -> 32"`` for two (nested) mappings."""
    before, after = _flatten(dict(old)), _flatten(dict(new))
    changed = [
        key for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)
    ]
    shown = [
        f"{key}: {_show(before.get(key, '(unset)'))} -> {_show(after.get(key, '(unset)'))}"
        for key in changed[:limit]
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


# --------------------------------------------------------------------------- the directory


class RunDirectory:
    """One run's output directory: lock it, check what it holds, move old attempts aside."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.summary_path = self.path / SUMMARY_NAME
        self.checkpoint_path = self.path / CHECKPOINT_NAME
        self.heartbeat_path = self.path / HEARTBEAT_NAME
        self.record_path = self.path / RECORD_NAME

    # ---------------------------------------------------------------- lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock for the whole run; fail at once if another job holds it."""
        lock_path = self.path / LOCK_NAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = os.fdopen(open_no_follow(lock_path), "r+")
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise planted_link(lock_path) from None
            raise RunDirError(
                f"cannot use the run directory {self.path}: {write_problem(error) or error}"
            ) from error
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunDirError(
                    f"{self.path} is in use by another editexp run ({holder}); wait for it to "
                    "finish, or give this run another directory (hydra.run.dir=... or "
                    "hydra.sweep.dir=...)"
                ) from None
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(_holder())
                handle.flush()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """:meth:`locked`; a job refused here (:class:`RunDirError`) puts back the ``.hydra/``
        files of the attempt that owns the directory, which Hydra overwrote before it started."""
        try:
            refuse_planted_links(self.path, [LOCK_NAME, ATTEMPTS_DIR, *RESULT_NAMES])
            with self.locked():
                yield
        except RunDirError:
            self.restore_hydra_files()
            raise

    # ---------------------------------------------------------------- reading results

    def read_summary(self) -> dict[str, Any] | None:
        """The finished run's summary, or None; a damaged one is refused naming the file."""
        if not self.summary_path.is_file():
            return None
        try:
            summary = json.loads(self.summary_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self.damaged(self.summary_path, _reason(error)) from None
        if not isinstance(summary, dict):
            raise self.damaged(self.summary_path, f"a JSON {type(summary).__name__}, not an object")
        return summary

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The interrupted attempt's progress, or None; a damaged one is refused naming the file."""
        if not self.checkpoint_path.is_file():
            return None
        import torch

        try:  # plain data only: unpickling anything else could run code planted in the file
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            reason = "it holds more than plain data: damaged, or not written by editexp; not loaded"
            raise self.damaged(self.checkpoint_path, reason) from None
        except Exception as error:  # EOFError, a zip error: a damaged file
            raise self.damaged(self.checkpoint_path, _reason(error)) from None
        if not isinstance(checkpoint, dict) or "updates_done" not in checkpoint:
            raise self.damaged(self.checkpoint_path, "not an editexp checkpoint")
        return checkpoint

    def damaged(self, path: Path, reason: str) -> RunDirError:
        how = _HOW.format(attempts=self.path / ATTEMPTS_DIR)
        return RunDirError(f"{path} is damaged ({reason}); {how}")

    def read_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def check(self, identity: RunIdentity, stored: Mapping[str, Any], what: str) -> None:
        """Refuse to skip or resume when ``stored`` (a summary or checkpoint) has other hashes."""
        record = self.read_record() or {}
        if record.get("config_hash") != stored.get("config_hash"):
            record = {}  # run.json of another attempt: only the hashes can be compared
        how = _HOW.format(attempts=self.path / ATTEMPTS_DIR)
        if stored.get("config_hash") != identity.config_hash:
            if stored.get("config_hash") is None:
                detail = "written without a config hash, by an older editexp"
            elif "config" in record:
                detail = describe_differences(record["config"], identity.config)
            else:
                detail = f"config hash {stored.get('config_hash')} -> {identity.config_hash}"
            raise RunDirError(f"{self.path} holds {what} of a different config ({detail}); {how}")
        if stored.get("data_hash") != identity.data_hash:
            if "data" in record:
                detail = describe_differences(record["data"], identity.data)
            else:
                detail = f"data hash {stored.get('data_hash')} -> {identity.data_hash}"
            raise RunDirError(
                f"{self.path} holds {what} made with other data ({detail}): the data changed "
                f"since; restore it to finish that run, or {how}"
            )

    # ---------------------------------------------------------------- attempts

    def existing_results(self) -> list[Path]:
        return [self.path / name for name in RESULT_NAMES if (self.path / name).exists()]

    def has_rows(self) -> bool:
        """Result rows or files beyond ``run.json``, the heartbeat and W&B's folder (which an
        attempt killed before its first update leaves, and the next attempt may simply take
        over)."""
        taken_over = (RECORD_NAME, HEARTBEAT_NAME, "wandb")
        return any(path.name not in taken_over for path in self.existing_results())

    def move_aside(self) -> Path | None:
        """Move every result of earlier attempts into ``.attempts/<time>/``; returns it."""
        existing = self.existing_results()
        if not existing:
            return None
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        target = self.path / ATTEMPTS_DIR / f"{stamp}-{os.getpid()}"
        try:
            target.mkdir(parents=True, exist_ok=False)
            for path in existing:  # RESULT_NAMES order: summary.json first
                os.replace(path, target / path.name)
        except OSError as error:
            raise RunDirError(
                f"cannot move the earlier results of {self.path} aside: "
                f"{write_problem(error) or error}"
            ) from error
        return target

    def start_attempt(
        self, identity: RunIdentity, hydra_files: Mapping[Path, str] | None = None
    ) -> None:
        """Write ``run.json``: the identity of the attempt that now owns the directory, and its
        ``.hydra/`` files (for :meth:`restore_hydra_files`)."""
        record = identity.record()
        record["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        record["hydra_files"] = {
            str(path.relative_to(self.path)): text
            for path, text in (hydra_files or {}).items()
            if path.is_relative_to(self.path)
        }
        atomic_write_json(self.record_path, record)

    def restore_hydra_files(self) -> None:
        """Put back the ``.hydra/`` files of the attempt that owns the directory: Hydra has
        overwritten them with those of a job that was then refused."""
        record = self.read_record() or {}
        files = record.get("hydra_files")
        if not isinstance(files, dict):
            return
        with contextlib.suppress(OSError, UserError):
            for name, text in files.items():
                if isinstance(text, str) and inside(self.path, self.path / str(name)):
                    atomic_write_text(self.path / str(name), text)


# --------------------------------------------------------------------------- planted links


def open_no_follow(path: Path) -> int:
    """A file descriptor of ``path`` for reading and writing, created if missing; a symbolic
    link there fails with ELOOP instead of being followed."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o666)


def inside(root: Path, path: Path) -> bool:
    """``path`` is not a symbolic link and its folder, links resolved, is ``root`` or below it:
    an atomic write there (a new file renamed onto it) stays inside ``root``."""
    if path.is_symlink():
        return False
    return path.parent.resolve().is_relative_to(Path(root).resolve())


def planted_link(path: Path) -> RunDirError:
    try:
        target = f" to {os.readlink(path)}"
    except OSError:
        target = ""
    return RunDirError(
        f"{path} is a symbolic link{target}; editexp does not write through links in a run "
        "directory (on a shared file system others may have planted it): remove it, or give "
        "this run another directory (hydra.run.dir=... or hydra.sweep.dir=...)"
    )


def refuse_planted_links(run_dir: Path, names: list[str]) -> None:
    """Refuse a run directory in which a file or folder that Hydra or editexp writes (``names``,
    relative paths), or a folder above one inside the directory, is a symbolic link."""
    for name in names:
        path = Path(run_dir)
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise planted_link(path)


def hydra_written_names(hydra_cfg: DictConfig) -> list[str]:
    """What Hydra writes into a job's directory before the job starts: its log file and its
    ``.hydra/`` files (``hydra_cfg``: the ``hydra`` node of a job's config)."""
    names = []
    if "file" in (OmegaConf.select(hydra_cfg, "job_logging.handlers") or {}):
        names.append(f"{hydra_cfg.job.name}.log")
    if hydra_cfg.output_subdir is not None:
        subdir = str(hydra_cfg.output_subdir)
        names += [f"{subdir}/{file}" for file in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    return names


class RefusePlantedLinks(Callback):
    """Hydra callback (``hydra.callbacks`` in config.yaml): a single run's directory is checked
    for planted links before Hydra writes its log and ``.hydra/`` files there. The launchers
    check every grid point's directory (``hydra_plugins/editexp_launcher``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            refuse_planted_links(Path(str(config.hydra.run.dir)), hydra_written_names(config.hydra))
        except RunDirError as error:  # Hydra turns a callback's exception into a warning
            print(f"editexp: error: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())[:160]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _holder() -> str:
    parts = [f"pid {os.getpid()} on {socket.gethostname()}"]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        parts.append(f"SLURM job {array}_{task}" if array and task else f"SLURM job {job}")
    parts.append(f"since {datetime.datetime.now().isoformat(timespec='seconds')}")
    parts.append(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- Hydra's files


def hydra_files(cfg: DictConfig, run_dir: Path) -> dict[Path, str] | None:
    """The ``.hydra/*.yaml`` files of the job Hydra runs in ``run_dir``, as Hydra writes them,
    from memory; None when Hydra is not running a job there (the Python API, or a Hydra
    config left behind by an earlier ``compose``/``hydra.main`` call in the same process).

    A job refused for this directory (the lock, another config) has already had Hydra
    overwrite them: it puts back the owner's (kept in ``run.json``), and the owner writes its
    own again when it finishes.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None or OmegaConf.is_missing(hydra_cfg.runtime, "output_dir"):
        return None
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if output_dir.resolve() != Path(run_dir).resolve():
        return None
    folder = output_dir / str(hydra_cfg.output_subdir)
    return {
        folder / "config.yaml": OmegaConf.to_yaml(cfg),
        folder / "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
        folder / "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }


def write_hydra_files(files: Mapping[Path, str] | None) -> None:
    for path, text in (files or {}).items():
        atomic_write_text(path, text)


# --------------------------------------------------------------------------- the report


def summary_problem(summary: Any, job_dir: Path | None) -> str | None:
    """Why ``summary`` is not the result of the grid point whose job directory holds it
    (None when it is, or when the job has no ``.hydra/config.yaml`` to compare with)."""
    if not isinstance(summary, dict):
        return f"summary.json holds a JSON {type(summary).__name__}, not an object"
    for stage in ("pre", "post"):
        block = summary.get(stage, {})
        if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
            return f"summary.json has a malformed {stage!r} block"
    if job_dir is None or not (job_dir / ".hydra" / "config.yaml").is_file():
        return None
    stored = summary.get("config_hash")
    if stored is None:
        return None  # written before summaries carried a hash: nothing to compare
    try:
        expected = comparable_config(OmegaConf.load(job_dir / ".hydra" / "config.yaml"))
    except Exception as error:  # an interpolation only Hydra resolves, a damaged file
        return f"cannot read its .hydra/config.yaml to check it ({type(error).__name__})"
    if stable_hash(expected) == stored:
        return None
    fields = {"algorithm": ("algorithm", "name"), "model": ("model", "name")}
    shown = []
    keys = ["algorithm", "model", "layer", "mode", "n_edits", "lambda", "seed"]
    if expected.get("mode") == "sequential":
        keys.append("batch_size")
    for key in keys:
        path = fields.get(key, (key,))
        value: Any = expected
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if key in summary and value is not None and summary[key] != value:
            if not (key == "layer" and summary[key] == [value]):
                shown.append(f"{key}={summary[key]!r} but the grid point has {value!r}")
    detail = "; ".join(shown) or "its config hash differs from the grid point's"
    return f"summary.json is for another config ({detail}); rerun that point with force=true"
