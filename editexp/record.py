"""The run record: what one run wrote, as types with one JSON layout each.

- :class:`RunRecord`: ``summary.json`` (the run's axes, pre/post metrics, update statistics,
  timings); ``editexp`` writes it and ``editexp-report`` reads it through this class.
- :class:`BatchRecord`: a line of ``batches.jsonl``, one per update.
- :class:`FactRecord`: a line of ``facts.jsonl``, one per edited fact.

Each has ``to_json()`` and ``from_json()``; nothing else knows the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from editexp.cache import atomic_write_json, atomic_write_text
from editexp.metric_specs import metrics_in, spec

# metric -> its summary over facts {"mean", "std", "n"} (S and model-level metrics such as
# PPL: mean only), as metrics.aggregate returns
Aggregate = dict[str, dict[str, float]]


@dataclass
class UpdateStats:
    """What one update did to the weights (or the mean over a run's updates)."""

    delta_norm: float  # Frobenius norms of the deltas, summed over layers
    preservation_error: float  # ||Delta K0|| / ||W' K0|| on held-out keys, summed over layers
    value_steps: float  # Adam steps per fact of the value optimisation, mean

    @classmethod
    def mean(cls, stats: list[UpdateStats]) -> UpdateStats | None:
        if not stats:
            return None
        return cls(*(sum(getattr(s, f.name) for s in stats) / len(stats) for f in fields(cls)))


@dataclass
class BatchRecord:
    """One update of a run: a line of ``batches.jsonl``."""

    batch: int  # index of the update, from 0
    edits_done: int  # facts written so far
    evaluated_facts: int  # facts scored after this update (0: the schedule skipped it)
    metrics: dict[str, float]  # headline means over those facts, and model-level metrics
    update: UpdateStats
    timing: dict[str, float]  # seconds so far, per phase
    # mean, std, n over every fact edited so far as last scored ({} when nothing was scored)
    edited_so_far: Aggregate = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> BatchRecord:
        return cls(**{**row, "update": UpdateStats(**row["update"])})


@dataclass
class FactRecord:
    """One edited fact: a line of ``facts.jsonl`` (scores as ``FactScores.to_json`` rows)."""

    case_id: int
    batch: int  # the update that wrote it
    pre: dict[str, Any]
    post: dict[str, Any]  # from the scoring that counts (the last one that included it)
    # sequential every_k runs: the scores right after the fact's own update (the paper's
    # each_batch schedule, from the same run); {} where that is ``post`` or was not scored
    each_batch: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> FactRecord:
        return cls(**row)


@dataclass
class RunRecord:
    """``summary.json``: one finished run."""

    algorithm: str
    model: str
    layer: list[int]
    mode: str
    batch_size: int  # facts per update as run: 1 (singular), n_edits (batch)
    n_edits: int
    lam: float | None  # "lambda" in JSON
    keep_edits: bool  # sequential: earlier updates' keys joined each solve
    nullspace_threshold: float | None  # AlphaEdit: eigenvalues of C0 below it span P
    null_space_dim: list[int] | None  # AlphaEdit: dimension of P's range per edited layer
    eval_schedule: str
    every_k: int | None
    edits_done: int
    seed: int
    hparams: dict[str, float]
    pre: Aggregate
    post: Aggregate
    update_mean: UpdateStats | None  # over the run's updates
    timing: dict[str, float]  # seconds per phase, and total
    run_dir: str
    # facts whose values this run computed, and read from the sweep's value cache
    values: dict[str, int] = field(default_factory=dict)
    # every fact as scored right after its own update: the paper's each_batch schedule. The same
    # as ``post`` except in sequential every_k runs, which also score each batch right after
    # its update ({} for the final schedule, which does not)
    each_batch: Aggregate = field(default_factory=dict)
    precision: str = "32-true"  # editexp/precision.py (summaries of older versions: 32-true)
    config_hash: str | None = None  # what the run directory checks before skipping it
    data_hash: str | None = None  # (editexp.run_dir; None in summaries of older versions)
    # where it ran: the model's device ("cpu", "cuda:0") and torch's CPU threads, which turn
    # the timings into CPU-hours (editexp-report's cost table; None in older summaries)
    device: str | None = None
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["lambda"] = row.pop("lam")
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RunRecord:
        row = dict(row)
        row["lam"] = row.pop("lambda")
        if row["update_mean"] is not None:
            row["update_mean"] = UpdateStats(**row["update_mean"])
        return cls(**row)

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        return cls.from_json(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    def field(self, name: str) -> Any:
        """A grid field by its JSON name (lists as tuples, so that it can be a dict key)."""
        value = getattr(self, "lam" if name == "lambda" else name)
        return tuple(value) if isinstance(value, list) else value

    def metric(self, stage: str, metric: str, stat: str = "mean") -> float | None:
        """``stage`` ("pre", "post" or "each_batch") ``metric``'s ``stat``, None when not
        measured."""
        value = getattr(self, stage).get(metric, {}).get(stat)
        return None if value is None else float(value)

    def table(self) -> str:
        """A readable pre/post table of the headline metrics."""

        def cell(stage: str, key: str) -> str:
            mean, std = self.metric(stage, key), self.metric(stage, key, "std")
            if mean is None:
                return "-"
            decimals = spec(key).decimals
            return f"{mean:7.{decimals}f}" + (f" ({std:6.{decimals}f})" if std is not None else "")

        title = (
            f"{self.algorithm.upper()} on {self.model}, layer {self.layer}, mode={self.mode}, "
            f"{self.edits_done} edits in batches of {self.batch_size}"
            + (f", lambda={self.lam:g}" if self.lam is not None else "")
            + (", keeping earlier edits' keys" if self.keep_edits else "")
        )
        lines = [title, f"{'metric':<8}{'pre':>18}{'post':>18}"]
        lines += [
            f"{key:<8}{cell('pre', key):>18}{cell('post', key):>18}"
            for key in metrics_in([self.pre, self.post])
        ]
        lines.append(
            "time (s): " + ", ".join(f"{name} {sec:.1f}" for name, sec in self.timing.items())
        )
        return "\n".join(lines)


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in records))
