"""``editexp``: one edit-and-evaluate run, the unit of every sweep.

Load the model, the facts and the layer statistics; score the unedited model once (cached);
edit in the chosen mode; evaluate on the chosen schedule; write everything into the run's
Hydra output directory:

- ``.hydra/config.yaml``: the resolved config (Hydra writes it);
- ``facts.jsonl``: per fact, pre- and post-edit scores and metrics;
- ``batches.jsonl``: per update, the edits done so far, the metrics evaluated then, timings;
- ``summary.json``: the run's axes, pre/post ES, PS, NS, S, GE (mean, std), update norms and
  timings;
- ``checkpoint.pt``: the progress so far (the summed weight deltas, rows written); a run
  started again with the same config resumes after its last completed update;
- ``deltas.pt``: the edited matrices' deltas, to apply to a fresh model (``apply_edits``).

Schedules (``eval.schedule``; published numbers differ by it): ``each_batch`` scores each
batch's facts right after its own update (the paper's code), ``final`` scores all edited facts
after the last update, ``every_k`` scores all facts edited so far after every k-th update
(the last one included) and reports the final scoring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editexp.cache import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    file_lock,
    stable_hash,
)
from editexp.config import ConfigError, RunSettings, run_settings
from editexp.data.counterfact import Fact, load_counterfact, select_facts
from editexp.editing.editor import (
    add_to_weight,
    edit_batch,
    restore_weights,
    save_deltas,
    snapshot_weights,
)
from editexp.editing.keys_values import EditRequest, context_prefixes
from editexp.editing.linalg import CovarianceFactor, PastKeys
from editexp.evaluation.counterfact_eval import evaluate_facts, fact_row
from editexp.evaluation.metrics import aggregate
from editexp.models import LoadedModel, load_model
from editexp.stats import load_or_compute_stats
from editexp.stats_cli import CONFIG_DIR
from editexp.tracking import run_identity, tracking

log = logging.getLogger("editexp")

HEADLINE = ("ES", "PS", "NS", "S", "GE")


class SimulatedCrash(RuntimeError):
    """Raised by ``debug.stop_after_updates`` to test that a killed run resumes."""


def _request(fact: Fact) -> EditRequest:
    return EditRequest(fact.case_id, fact.prompt, fact.subject, fact.target_new)


class Run:
    """State of one run: what is done so far lives in ``self.state`` and in checkpoint.pt."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.settings: RunSettings = run_settings(cfg)
        self.checkpoint_path = run_dir / "checkpoint.pt"
        self.started = time.perf_counter()
        self.elapsed_before = 0.0  # seconds spent by earlier, interrupted attempts
        self.timing = {"statistics": 0.0, "keys_values": 0.0, "solve": 0.0, "evaluation": 0.0}
        self.state: dict[str, Any] = {
            "config_hash": stable_hash(_comparable_config(cfg)),
            "updates_done": 0,
            "deltas": {},  # layer -> summed Delta of all updates so far (sequential / batch)
            "batches": [],  # rows of batches.jsonl
            "post": {},  # case_id -> fact row of the scoring that counts
            "update_stats": [],  # per update: delta norm, preservation error
            "past_keys": {},  # layer -> PastKeys of the updates so far (sequential.keep_edits)
            "timing": dict(self.timing),
        }

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg, settings = self.cfg, self.settings
        self.loaded: LoadedModel = load_model(cfg.model, cfg.device)
        facts, self.data_hash = load_counterfact(cfg.data)
        self.facts = select_facts(
            facts,
            settings.n_edits,
            order=cfg.data.order,
            seed=settings.seed,
            case_ids=cfg.data.case_ids,
            unique_subjects=cfg.data.unique_subjects,
        )
        d_k = self.loaded.weight(settings.layers[0]).shape[1]
        if settings.algorithm == "emmet" and settings.lam == 0 and settings.batch_size > d_k:
            raise ConfigError(
                f"EMMET with lambda=0 needs at most d_k={d_k} facts per update, got "
                f"batch_size={settings.batch_size}; use lambda > 0 (e.g. lambda=1e-4)"
            )
        start = time.perf_counter()
        stats = load_or_compute_stats(
            self.loaded,
            list(settings.layers),
            cfg.stats,
            cfg.data,
            held_out_keys=cfg.eval.held_out_keys,
        )
        self.covariances = {
            layer: CovarianceFactor(layer_stats.second_moment)
            for layer, layer_stats in stats.items()
        }
        self.held_out_keys = {
            layer: layer_stats.held_out_keys for layer, layer_stats in stats.items()
        }
        self.timing["statistics"] = time.perf_counter() - start
        prefixes_cfg = cfg.editing.prefixes
        self.prefixes = context_prefixes(
            self.loaded, prefixes_cfg.count, prefixes_cfg.length, prefixes_cfg.seed
        )

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if saved["config_hash"] != self.state["config_hash"]:
            raise ConfigError(
                f"{self.run_dir} holds a run with a different config; choose another output "
                "directory (hydra.run.dir=...) or delete it"
            )
        self.state = saved
        self.timing = dict(saved["timing"])
        self.elapsed_before = saved["elapsed"]
        for layer, delta in saved["deltas"].items():
            add_to_weight(self.loaded, int(layer), delta)
        log.info("Resuming after update %d of %d", saved["updates_done"], self.settings.n_updates)

    def _checkpoint(self) -> None:
        self.state["timing"] = dict(self.timing)
        self.state["elapsed"] = self.elapsed()
        atomic_torch_save(self.checkpoint_path, self.state)
        self._write_rows()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, facts: list[Fact]) -> list[dict]:
        """Fact rows for ``facts`` on the model as it is now (GE on the first facts of the run)."""
        eval_cfg = self.cfg.eval
        generation_ids = {f.case_id for f in self.facts[: eval_cfg.generation_facts]}
        n_generate = sum(1 for fact in facts if fact.case_id in generation_ids)
        ordered = sorted(facts, key=lambda fact: fact.case_id not in generation_ids)
        start = time.perf_counter()
        scores = evaluate_facts(
            self.loaded.model,
            self.loaded.tokenizer,
            ordered,
            batch_size=eval_cfg.batch_size,
            generation_facts=n_generate,
            generation_length=eval_cfg.generation_length,
            seed=self.settings.seed,
            progress=len(facts) > 8,
        )
        self.timing["evaluation"] += time.perf_counter() - start
        rows = {row["case_id"]: row for row in map(fact_row, scores)}
        return [rows[fact.case_id] for fact in facts]

    def pre_edit_rows(self) -> dict[int, dict]:
        """Scores of the unedited model, cached per model, facts and evaluation settings."""
        eval_cfg = self.cfg.eval
        key = stable_hash(
            [
                self.loaded.identity,
                self.data_hash,
                [fact.case_id for fact in self.facts],
                eval_cfg.generation_facts,
                eval_cfg.generation_length,
                self.settings.seed,
            ]
        )
        path = cache_root() / "pre_edit" / f"{self.settings.model_name}-{key}.pt"
        with file_lock(path):  # grid points of a sweep share these: compute them once
            if path.is_file():
                return torch.load(path, weights_only=False)
            rows = {row["case_id"]: row for row in self.evaluate(self.facts)}
            atomic_torch_save(path, rows)
            return rows

    # ------------------------------------------------------------------ editing

    def _update(
        self, facts: list[Fact], past_keys: dict[int, PastKeys] | None = None
    ) -> dict[str, Any]:
        settings = self.settings
        result = edit_batch(
            self.loaded,
            [_request(fact) for fact in facts],
            settings.algorithm,
            settings.layers,
            self.covariances,
            settings.lam,
            settings.hparams,
            self.prefixes,
            batch_size=self.cfg.editing.batch_size,
            progress=len(facts) > 1,
            past_keys=past_keys,
            nullspace_threshold=settings.nullspace_threshold,
        )
        self.timing["keys_values"] += result.timing["keys_values"]
        self.timing["solve"] += result.timing["solve"]
        return {
            "deltas": result.deltas,
            "keys": result.keys,
            "delta_norm": sum(float(d.norm()) for d in result.deltas.values()),
            "preservation_error": self._preservation_error(result.deltas),
            "value_steps": float(result.values.steps.float().mean()),
        }

    def _preservation_error(self, deltas: dict[int, torch.Tensor]) -> float:
        """||Delta K0|| / ||W K0|| over held-out corpus keys, summed over edited layers."""
        total = 0.0
        for layer, delta in deltas.items():
            keys = self.held_out_keys.get(layer)
            if keys is None or keys.numel() == 0:
                continue
            weight = self.loaded.weight(layer).detach().float().cpu()
            held = keys.float().cpu()
            total += float((delta @ held).norm() / (weight @ held).norm())
        return total

    def run_singular(self, tracker) -> None:
        """Each fact edited alone, evaluated, and the weights restored bit for bit."""
        snapshot = snapshot_weights(self.loaded, self.settings.layers)
        for index in range(self.state["updates_done"], len(self.facts)):
            fact = self.facts[index]
            update = self._update([fact])
            (row,) = self.evaluate([fact])
            restore_weights(self.loaded, snapshot)
            self._record(index, [fact], [row], update, tracker, keep_deltas=False)

    def run_batches(self, tracker) -> None:
        """One update (batch) or n_edits / batch_size updates one after another (sequential)."""
        settings = self.settings
        size, n_updates = settings.batch_size, settings.n_updates
        for index in range(self.state["updates_done"], n_updates):
            batch = self.facts[index * size : (index + 1) * size]
            past_keys = self._past_keys()
            update = self._update(batch, past_keys)
            if past_keys is not None:  # this update's keys are preserved by the next ones
                for layer, keys in update["keys"].items():
                    past_keys[layer].add(keys)
            done = (index + 1) * size
            last = index == n_updates - 1
            rows: list[dict] = []
            evaluated: list[Fact] = []
            if settings.schedule == "each_batch":
                evaluated = batch
            elif last or (settings.schedule == "every_k" and (index + 1) % settings.every_k == 0):
                evaluated = self.facts[:done]
            if evaluated:
                rows = self.evaluate(evaluated)
            self._record(index, evaluated, rows, update, tracker, keep_deltas=True)
            stop_after = self.cfg.get("debug", {}).get("stop_after_updates")
            if stop_after is not None and self.state["updates_done"] >= stop_after and not last:
                raise SimulatedCrash(f"debug.stop_after_updates={stop_after}")

    def _past_keys(self) -> dict[int, PastKeys] | None:
        """K_past K_past^T per layer of the updates so far, if this run keeps earlier edits
        (saved in checkpoint.pt with the deltas, so a resumed run continues the same sum)."""
        if not self.settings.keep_edits:
            return None
        past_keys = self.state.setdefault("past_keys", {})
        for layer in self.settings.layers:
            if layer not in past_keys:
                device = self.covariances[layer].matrix.device
                past_keys[layer] = PastKeys.empty(self.covariances[layer].dim, device)
        return past_keys

    def _record(self, index, facts, rows, update, tracker, keep_deltas: bool) -> None:
        for fact, row in zip(facts, rows):
            self.state["post"][fact.case_id] = {**row, "update": index}
        if keep_deltas:
            for layer, delta in update["deltas"].items():
                previous = self.state["deltas"].get(layer)
                self.state["deltas"][layer] = delta if previous is None else previous + delta
        metrics = _headline(aggregate([fact_metric_values_row(r) for r in rows])) if rows else {}
        edits_done = (index + 1) * self.settings.batch_size
        batch_row = {
            "batch": index,
            "edits_done": edits_done,
            "evaluated_facts": len(rows),
            "metrics": metrics,
            "update": {k: update[k] for k in ("delta_norm", "preservation_error", "value_steps")},
            "timing": dict(self.timing),
        }
        self.state["batches"].append(batch_row)
        self.state["update_stats"].append(batch_row["update"])
        self.state["updates_done"] = index + 1
        self._checkpoint()
        tracker.log_update({**metrics, **batch_row["update"]}, edits_done)

    # ------------------------------------------------------------------ outputs

    def _write_rows(self) -> None:
        pre = getattr(self, "pre_rows", {})
        lines = []
        for fact in self.facts:
            if fact.case_id not in self.state["post"]:
                continue
            post = self.state["post"][fact.case_id]
            lines.append(
                {
                    "case_id": fact.case_id,
                    "update": post["update"],
                    "pre": pre.get(fact.case_id),
                    "post": {k: v for k, v in post.items() if k != "update"},
                }
            )
        atomic_write_text(self.run_dir / "facts.jsonl", "".join(_json_line(x) for x in lines))
        atomic_write_text(
            self.run_dir / "batches.jsonl", "".join(_json_line(x) for x in self.state["batches"])
        )

    def summary(self) -> dict[str, Any]:
        settings = self.settings
        post_rows = [
            self.state["post"][f.case_id] for f in self.facts if f.case_id in self.state["post"]
        ]
        pre_rows = [self.pre_rows[f.case_id] for f in self.facts]
        updates = self.state["update_stats"]
        return {
            "algorithm": settings.algorithm,
            "model": settings.model_name,
            "layer": list(settings.layers),
            "mode": settings.mode,
            "batch_size": settings.batch_size,
            "n_edits": settings.n_edits,
            "lambda": settings.lam,
            "keep_edits": settings.keep_edits,
            "nullspace_threshold": settings.nullspace_threshold,
            "null_space_dim": self._null_space_dims(),
            "eval_schedule": settings.schedule,
            "every_k": settings.every_k if settings.schedule == "every_k" else None,
            "edits_done": self.state["updates_done"] * settings.batch_size,
            "seed": settings.seed,
            "hparams": asdict(settings.hparams),
            "pre": aggregate([fact_metric_values_row(row) for row in pre_rows]),
            "post": aggregate([fact_metric_values_row(row) for row in post_rows]),
            "update": {
                "delta_norm": _mean([u["delta_norm"] for u in updates]),
                "preservation_error": _mean([u["preservation_error"] for u in updates]),
                "value_steps": _mean([u["value_steps"] for u in updates]),
            },
            "timing": {**self.timing, "total": self.elapsed()},
            "run_dir": str(self.run_dir),
        }

    def _null_space_dims(self) -> list[int] | None:
        """AlphaEdit: the dimension r of the null space at each edited layer."""
        threshold = self.settings.nullspace_threshold
        if threshold is None:
            return None
        layers = self.settings.layers
        return [int(self.covariances[layer].null_space(threshold).shape[1]) for layer in layers]


def fact_metric_values_row(row: dict) -> dict[str, float]:
    """The metric values of a stored fact row (the numbers `aggregate` takes)."""
    return {
        key: value
        for key, value in row.items()
        if isinstance(value, int | float) and key not in ("case_id", "update")
    }


def _headline(aggregated: dict) -> dict[str, float]:
    return {key: aggregated[key]["mean"] for key in HEADLINE if key in aggregated}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _json_line(payload: Any) -> str:
    import json

    return json.dumps(payload) + "\n"


def _comparable_config(cfg: DictConfig) -> dict:
    """The parts of the config that change results (not logging, forcing, devices)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("logger", "force", "device", "debug"):
        container.pop(key, None)
    return container


def format_table(summary: dict) -> str:
    """A readable pre/post table of the headline metrics."""

    def cell(block: dict, key: str) -> str:
        if key not in block:
            return "-"
        mean, std = block[key]["mean"], block[key].get("std")
        return f"{mean:7.2f}" + (f" ({std:6.2f})" if std is not None else "")

    lam = summary["lambda"]
    title = (
        f"{summary['algorithm'].upper()} on {summary['model']}, layer {summary['layer']}, "
        f"mode={summary['mode']}, {summary['edits_done']} edits in batches of "
        f"{summary['batch_size']}"
        + (f", lambda={lam:g}" if lam is not None else "")
        + (", keeping earlier edits' keys" if summary.get("keep_edits") else "")
    )
    lines = [title, f"{'metric':<8}{'pre':>18}{'post':>18}"]
    for key in HEADLINE:
        lines.append(f"{key:<8}{cell(summary['pre'], key):>18}{cell(summary['post'], key):>18}")
    timing = summary["timing"]
    lines.append(
        "time (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timing.items())
    )
    return "\n".join(lines)


def run(
    cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, sweep_dir: str | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip) one grid point; returns its summary."""
    summary_path = run_dir / "summary.json"
    runner = Run(cfg, run_dir)  # validates the config before any expensive work
    if summary_path.is_file() and not cfg.force:
        import json

        summary = json.loads(summary_path.read_text())
        print(f"{summary_path} exists; skipping (force=true reruns)\n" + format_table(summary))
        return summary
    if cfg.force and runner.checkpoint_path.is_file():
        runner.checkpoint_path.unlink()
    name, group = run_identity(overrides or [], sweep_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with tracking(cfg.logger, resolved, run_dir, name, group) as tracker:
        runner.setup()
        runner.pre_rows = runner.pre_edit_rows()
        runner._resume()
        for row in runner.state["batches"]:  # a resumed run's W&B curve starts at update 1
            tracker.log_update({**row["metrics"], **row["update"]}, row["edits_done"])
        if runner.settings.mode == "singular":
            runner.run_singular(tracker)
        else:
            runner.run_batches(tracker)
        summary = runner.summary()
        if cfg.save_deltas and runner.state["deltas"]:
            save_deltas(run_dir / "deltas.pt", runner.loaded, runner.state["deltas"])
        atomic_write_json(summary_path, summary)
        tracker.log_summary(summary)
    print(format_table(summary))
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else None
    try:
        run(cfg, run_dir, list(hydra_cfg.overrides.task), sweep_dir)
    except ConfigError as error:
        if sweep_dir is not None:
            raise  # an Exception: Hydra records the failed grid point and runs the others
        raise SystemExit(f"editexp: {error}") from None


if __name__ == "__main__":
    main()
