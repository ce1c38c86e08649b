"""``editexp``: one edit-and-evaluate run, the unit of every sweep.

Load the model and the facts; build an :class:`~editexp.editing.editor.Editor` (statistics,
prefixes) and an :class:`~editexp.evaluation.evaluator.Evaluator`; score the unedited model
once (cached); then one loop over the run's updates: edit, score what the schedule says,
record. Everything goes into the run's Hydra output directory (layouts in
:mod:`editexp.record`):

- ``.hydra/config.yaml``: the resolved config (Hydra writes it);
- ``facts.jsonl``: per fact, pre- and post-edit scores and metrics;
- ``batches.jsonl``: per update, the edits done so far, the metrics evaluated then, timings;
- ``summary.json``: the run's axes, pre/post ES, PS, NS, S, GE (mean, std), update norms and
  timings;
- ``checkpoint.pt``: the run's state so far (:mod:`editexp.run_state`: the edited matrices as
  they are, the summed weight deltas, rows written); a run started again with the same config
  and data resumes after its last completed update, bit for bit as if it had not stopped;
- ``deltas.pt``: the edited matrices' deltas, to apply to a fresh model (``Editor.apply``);
- ``run.json``: the config and data the attempt belongs to;
- ``attempt.json``, while an attempt runs: its seconds so far (:mod:`editexp.heartbeat`), so
  that a resumed run's timing counts what a killed attempt ran after its last checkpoint.

The run directory holds one config and one attempt at a time (:mod:`editexp.run_dir`): the
run locks it, checks what it holds against its own config and data before skipping or
resuming, and ``force=true`` moves earlier results aside. Everything the user gave (config,
facts, corpus) is checked before the model loads.

The pieces: inputs checked in :mod:`editexp.run_inputs`, the steps of every mode in
:mod:`editexp.run_steps`, the recorder (checkpoint, rows, tracker) in :mod:`editexp.recorder`,
records assembled in :mod:`editexp.run_records`, phase timings in :mod:`editexp.timing`.

Modes: ``singular`` edits each fact alone and restores the weights bit for bit after scoring
it; ``batch`` makes one update of all facts; ``sequential`` makes n_edits / batch_size updates
one after another. Schedules (``eval.schedule``; published numbers differ by it):
``each_batch`` scores each batch's facts right after its own update (the paper's code),
``final`` scores all edited facts after the last update, ``every_k`` scores all facts edited
so far after every k-th update (the last one included) and reports the final scoring; it also
keeps each batch's scores right after its own update (scoring the batch alone when the k-th
update has not come), so the same run gives the paper's each_batch numbers.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from editexp.config import RunSettings, run_settings
from editexp.data.counterfact import Fact
from editexp.editing.editor import Editor, save_deltas
from editexp.evaluation.evaluator import Evaluator
from editexp.heartbeat import Heartbeat
from editexp.models import LoadedModel, load_model, model_shape
from editexp.progress import UpdateProgress
from editexp.record import RunRecord
from editexp.recorder import Recorder
from editexp.run_dir import RunDirectory, RunDirError, hydra_files, write_hydra_files
from editexp.run_inputs import check_against_model, generation_case_ids, read_inputs
from editexp.run_records import PreEdit, fact_records, fact_text, run_record
from editexp.run_state import RunState, claim, fingerprint
from editexp.run_steps import Steps, scorings_per_fact
from editexp.timing import PhaseTimer
from editexp.tracking import RunAxes, WandbIdentity, flat_axes, run_id_for, run_identity, tracking

log = logging.getLogger("editexp")


class SimulatedCrash(RuntimeError):
    """Raised by ``debug.stop_after_updates`` to test that a killed run resumes."""


def show(text: str) -> None:
    """Text for the user: logged when logging reaches a console (under Hydra: the console and
    the job's log file, <run dir>/<job name>.log), else printed."""
    if log.isEnabledFor(logging.INFO) and _logs_to_console(log):
        log.info(text)
    else:
        print(text, flush=True)


def _logs_to_console(logger: logging.Logger) -> bool:
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            stream = getattr(handler, "stream", None)
            if not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr):
                return True
        current = current.parent if current.propagate else None
    return False


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] | None = None,
    sweep_dir: str | None = None,
    experiment: str | None = None,
) -> RunRecord:
    """Run (or resume, or skip) one grid point; returns its record.

    The config, the facts and the corpus are checked first (against the model's config and
    tokenizer, before its weights load); then the run directory is locked
    for the whole run and what it holds is checked against this run's config and data.
    ``experiment``: the preset this run belongs to (``+experiment=...``), for W&B.
    """
    started = time.perf_counter()
    settings = run_settings(cfg)  # validates the config before any expensive work
    facts, identity = read_inputs(cfg, settings)
    shape = model_shape(cfg.model, settings.layers[0])  # its config and tokenizer, no weights
    check_against_model(cfg, settings, shape, facts)
    directory = RunDirectory(run_dir)
    with directory.owned():
        state = claim(directory, identity, cfg.force, hydra_files(cfg, run_dir))
        if isinstance(state, RunRecord):
            skipping = f"{directory.summary_path} exists; skipping (force=true reruns)"
            show(skipping + "\n" + state.table())
            return state
        name, group = run_identity(overrides or [], sweep_dir)
        run_id = run_id_for(directory.path, fresh=bool(cfg.force))
        wandb = WandbIdentity(run_id, name, group, experiment)
        with Heartbeat(directory.heartbeat_path, lambda: state.elapsed(started)):
            return edit_and_evaluate(cfg, settings, facts, state, directory, wandb, started)


def edit_and_evaluate(
    cfg: DictConfig,
    settings: RunSettings,
    facts: list[Fact],
    state: RunState,
    directory: RunDirectory,
    wandb: WandbIdentity,
    started: float,
) -> RunRecord:
    """The run's updates from where ``state`` stands, in the directory ``run`` holds."""
    own_hydra_files = hydra_files(cfg, directory.path)
    write_hydra_files(own_hydra_files)  # a refused job may have overwritten them
    config, tags = tracker_config(cfg, settings, wandb.experiment)
    with tracking(cfg.logger, wandb, config, directory.path, tags) as tracker:
        loaded = load_model(cfg.model, cfg.device, cfg.get("precision"))
        base = {layer: fingerprint(loaded.weight(layer)) for layer in settings.layers}
        if state.batches:
            log.info("Resuming after update %d of %d", state.updates_done, settings.n_updates)
        editor = Editor(loaded, cfg)
        evaluator = evaluator_for(loaded, cfg, settings)
        generate_for = generation_case_ids(facts, cfg.eval.generation_facts, settings.batch_size)
        scores = evaluator.pre_edit(facts, generate_for)
        pre = PreEdit(dict(zip([f.case_id for f in facts], scores)), evaluator.pre_edit_model())
        restore(state, editor, evaluator, base, settings.model_name, directory.checkpoint_path)
        recorder = Recorder(
            state, tracker, directory, facts, pre, settings.batch_size, editor.values, started
        )
        recorder.relog()
        timer = PhaseTimer(state.timing)
        chunk_size = int(cfg.editing.batch_size)
        steps = Steps(settings, facts, editor, evaluator, state, timer, generate_for, chunk_size)
        progress = UpdateProgress(settings.n_updates, settings.n_edits, state.updates_done)
        with progress:
            edit_all(steps, recorder, cfg.get("debug", {}).get("stop_after_updates"), progress)
        record = finish(steps, recorder, bool(cfg.save_deltas), own_hydra_files)
    show("Results:\n" + record.table())
    return record


def edit_all(
    steps: Steps,
    recorder: Recorder,
    stop_after: int | None = None,
    progress: UpdateProgress | None = None,
) -> None:
    """The run's loop, the same for every mode: each step edits and scores, the recorder books
    its updates, then writes the checkpoint and rows, and ``progress`` logs the step.
    ``stop_after``: raise :class:`SimulatedCrash` once that many updates are done (before the
    last one)."""
    n_updates = steps.settings.n_updates
    for first in steps.starts():
        for booking in steps.take(first):
            recorder.book(booking)
        recorder.save()
        done = recorder.state.updates_done
        if progress is not None:
            progress.step(done, done * steps.settings.batch_size)
        if stop_after is not None and stop_after <= done < n_updates:
            raise SimulatedCrash(f"debug.stop_after_updates={stop_after}")


def tracker_config(
    cfg: DictConfig, settings: RunSettings, experiment: str | None
) -> tuple[dict, list[str]]:
    """The tracker's run config (the run's axes flat, the resolved config) and tags."""
    axes = RunAxes(
        model=settings.model_name,
        algorithm=settings.algorithm,
        layers=settings.layers,
        batch_size=settings.batch_size,
        n_edits=settings.n_edits,
        lam=settings.lam,
        mode=settings.mode,
        experiment=experiment,
        eval_schedule=settings.schedule,
        precision=settings.precision,
    )
    config = {**flat_axes(axes), "cfg": OmegaConf.to_container(cfg, resolve=True)}
    return config, [settings.model_name, settings.algorithm]


def evaluator_for(loaded: LoadedModel, cfg: DictConfig, settings: RunSettings) -> Evaluator:
    """The run's Evaluator, keeping layer states below the lowest edited layer when
    ``eval.layer_states_gb`` allows (those layers never change in this run)."""
    evaluator = Evaluator.from_config(loaded, cfg)
    states_gb = float(cfg.eval.get("layer_states_gb", 0) or 0)
    if states_gb > 0:
        evaluator.keep_layer_states(
            min(settings.layers), scorings_per_fact(settings) > 1, int(states_gb * 2**30)
        )
    return evaluator


def restore(
    state: RunState,
    editor: Editor,
    evaluator: Evaluator,
    base: dict[int, tuple[float, float]],
    model_name: str,
    checkpoint: Path,
) -> None:
    """Start ``state`` (statistics and pre-edit timings, the W0 fingerprints ``base``), or
    resume it: the matrices exactly as the interrupted attempt had edited them, the same past
    keys."""
    if not state.batches:
        state.timing["statistics"] = editor.statistics_seconds
        state.timing["evaluation"] = evaluator.seconds
        state.base = base
    elif state.base != base:
        raise RunDirError(
            f"{checkpoint} was edited from other weights than model {model_name!r} has now "
            "(did its files change?); rerun with force=true to start over"
        )
    with torch.no_grad():
        for layer, weight in state.weights.items():
            editor.model.weight(layer).copy_(weight)
    if state.past_keys is not None:  # a resumed run continues the same sums
        editor.past_keys = state.past_keys
    state.past_keys = editor.past_keys


def finish(
    steps: Steps, recorder: Recorder, with_deltas: bool, own_hydra_files: dict[Path, str]
) -> RunRecord:
    """Write summary.json (and deltas.pt when ``with_deltas``), log the results; the record."""
    state, directory, facts, pre = recorder.state, recorder.directory, steps.facts, recorder.pre
    run_dir = directory.path
    null_space_dims = steps.editor.null_space_dims()
    record = run_record(
        steps.settings, null_space_dims, facts, pre, state, run_dir, recorder.elapsed()
    )
    record.device = str(steps.editor.model.device)
    record.threads = torch.get_num_threads()
    files = [directory.summary_path, run_dir / "facts.jsonl", run_dir / "batches.jsonl"]
    if with_deltas and state.deltas:
        save_deltas(run_dir / "deltas.pt", steps.editor.model, state.deltas)
        files.append(run_dir / "deltas.pt")
    write_hydra_files(own_hydra_files)
    record.write(directory.summary_path)
    fact_rows = [row.to_json() for row in fact_records(facts, pre.facts, state)]
    step = state.updates_done + 1
    recorder.tracker.log_results(record.to_json(), step, fact_rows, files, fact_text(facts))
    return record


if __name__ == "__main__":  # `python -m editexp.runner` is `python -m editexp` (editexp.cli)
    import runpy

    runpy.run_module("editexp", run_name="__main__")
