"""A run's state between updates, and ``checkpoint.pt``, which holds it after every update.

The checkpoint holds only tensors, numbers, strings, lists, tuples and dicts, so it loads
with ``torch.load(..., weights_only=True)``: records are stored as their JSON rows and the
editor's past keys as ``{"gram": tensor, "count": int}`` per layer, rebuilt on load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editexp.cache import atomic_torch_save
from editexp.editing.linalg import PastKeys
from editexp.evaluation.counterfact_eval import FactScores
from editexp.heartbeat import read_heartbeat
from editexp.record import BatchRecord, RunRecord
from editexp.run_dir import RunDirectory, RunIdentity
from editexp.timing import INTERRUPTED, PHASES

log = logging.getLogger("editexp")


@dataclass
class RunState:
    """What a run has done so far; ``checkpoint.pt`` holds it after every update."""

    config_hash: str
    data_hash: str
    base: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> W0 fingerprint
    batches: list[BatchRecord] = field(default_factory=list)  # one per update done
    post: dict[int, tuple[int, FactScores]] = field(default_factory=dict)  # case_id ->
    # (update, scores) of the scoring that counts: the last one that included the fact
    each_batch: dict[int, FactScores] = field(default_factory=dict)  # case_id -> scores right
    # after its own update (sequential every_k runs; the paper's each_batch schedule)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> summed Delta
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> W as edited so
    # far: a resumed run restores it as it was, so it goes on bit for bit (W0 + deltas in order)
    past_keys: dict[int, PastKeys] | None = None  # the Editor's, when it keeps earlier edits
    timing: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys((*PHASES, INTERRUPTED), 0.0)
    )
    elapsed_before: float = 0.0  # seconds spent by earlier, interrupted attempts
    values: dict[str, int] = field(default_factory=lambda: {"computed": 0, "read": 0})
    # facts' values computed here and read from the sweep's cache, over all attempts

    @property
    def updates_done(self) -> int:
        return len(self.batches)

    def elapsed(self, started: float) -> float:
        """Seconds over all attempts, this one started at ``started`` (``time.perf_counter``)."""
        return self.elapsed_before + time.perf_counter() - started

    def count_interrupted(self, heartbeat: float | None) -> None:
        """Count what a killed attempt ran after the state was saved: ``heartbeat``, its last
        seconds over all attempts (editexp.heartbeat), beyond ``elapsed_before``."""
        lost = 0.0 if heartbeat is None else heartbeat - self.elapsed_before
        if lost > 0:
            self.timing[INTERRUPTED] = self.timing.get(INTERRUPTED, 0.0) + lost
            self.elapsed_before += lost
            log.info("counting %.0f s that a killed attempt ran after its last checkpoint", lost)

    def add_deltas(self, deltas: dict[int, torch.Tensor]) -> None:
        """Sum an update's deltas (layer -> Delta) into the run's."""
        for layer, delta in deltas.items():
            previous = self.deltas.get(layer)
            self.deltas[layer] = delta if previous is None else previous + delta

    def save(self, path: Path, elapsed: float) -> None:
        atomic_torch_save(path, self.payload(elapsed))

    def payload(self, elapsed: float) -> dict[str, Any]:
        """The checkpoint's contents (``elapsed``: seconds over all attempts so far)."""
        return {
            "config_hash": self.config_hash,
            "data_hash": self.data_hash,
            "updates_done": self.updates_done,
            "base": self.base,
            "weights": self.weights,
            "batches": [batch.to_json() for batch in self.batches],
            "post": {
                case: (index, scores.to_json()) for case, (index, scores) in self.post.items()
            },
            "each_batch": {case: scores.to_json() for case, scores in self.each_batch.items()},
            "deltas": self.deltas,
            "past_keys": _past_keys_rows(self.past_keys),
            "timing": self.timing,
            "elapsed": elapsed,
            "values": self.values,
        }

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunState:
        """The state in a checkpoint (as ``RunDirectory.read_checkpoint`` returns it)."""
        return cls(
            config_hash=saved["config_hash"],
            data_hash=saved["data_hash"],
            base=saved["base"],
            weights=saved["weights"],
            batches=[BatchRecord.from_json(row) for row in saved["batches"]],
            post={
                case: (index, FactScores.from_json(row))
                for case, (index, row) in saved["post"].items()
            },
            each_batch={
                case: FactScores.from_json(row) for case, row in saved.get("each_batch", {}).items()
            },
            deltas=saved["deltas"],
            past_keys=_past_keys_from_rows(saved["past_keys"]),
            timing=saved["timing"],
            elapsed_before=saved["elapsed"],
            values=saved.get("values", {"computed": 0, "read": 0}),
        )


def _past_keys_rows(past_keys: dict[int, PastKeys] | None) -> dict[int, dict] | None:
    if past_keys is None:
        return None
    return {layer: {"gram": keys.gram, "count": keys.count} for layer, keys in past_keys.items()}


def _past_keys_from_rows(rows: dict[int, Any] | None) -> dict[int, PastKeys] | None:
    if rows is None:
        return None
    return {layer: PastKeys(row["gram"], int(row["count"])) for layer, row in rows.items()}


def fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of W0 in float64: tells another model's weights apart."""
    values = weight.detach().double()
    return float(values.sum()), float(values.square().sum())


def claim(
    directory: RunDirectory,
    identity: RunIdentity,
    force: bool,
    own_hydra_files: dict[Path, str] | None,
) -> RunRecord | RunState:
    """What the locked directory holds for this run: the record of the same finished run (to
    skip), the state of the same unfinished one (to resume), or a fresh start; the last two
    count the time a killed attempt ran after its last checkpoint (its heartbeat)."""
    if force:
        moved = directory.move_aside()
        if moved is not None:
            log.info("force=true: moved the earlier results of %s to %s", directory.path, moved)
    else:
        summary = directory.read_summary()
        if summary is not None:
            directory.check(identity, summary, "a finished run")
            try:
                return RunRecord.from_json(summary)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise directory.damaged(directory.summary_path, repr(error)) from None
        saved = directory.read_checkpoint()
        if saved is not None:
            directory.check(identity, saved, "an unfinished run")
            try:
                state = RunState.from_saved(saved)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise directory.damaged(directory.checkpoint_path, repr(error)) from None
            state.count_interrupted(read_heartbeat(directory.heartbeat_path))
            return state
        if directory.has_rows():  # rows without a checkpoint: never mix them with ours
            directory.move_aside()
    directory.start_attempt(identity, own_hydra_files)
    state = RunState(identity.config_hash, identity.data_hash)
    state.count_interrupted(read_heartbeat(directory.heartbeat_path))  # killed before update 1
    return state
