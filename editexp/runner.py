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
- ``checkpoint.pt``: the progress so far (the edited matrices as they are, the summed weight
  deltas, rows written); a run started again with the same config and data resumes after its
  last completed update, bit for bit as if it had not stopped;
- ``deltas.pt``: the edited matrices' deltas, to apply to a fresh model (``Editor.apply``);
- ``run.json``: the config and data the attempt belongs to.

The run directory holds one config and one attempt at a time (:mod:`editexp.run_dir`): the
run locks it, checks what it holds against its own config and data before skipping or
resuming, and ``force=true`` moves earlier results aside. Everything the user gave (config,
facts, corpus) is checked before the model loads.

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
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editexp.cache import atomic_torch_save
from editexp.config import CONFIG_DIR, ConfigError, RunSettings, run_settings
from editexp.data.corpus import CorpusSource
from editexp.data.counterfact import Fact, check_prompt_lengths, load_counterfact, select_facts
from editexp.editing.editor import Editor, save_deltas
from editexp.editing.linalg import PastKeys
from editexp.errors import cli_errors, one_line
from editexp.evaluation.counterfact_eval import FactScores
from editexp.evaluation.evaluator import Evaluator
from editexp.evaluation.generation_facts import spread_generation_facts
from editexp.evaluation.metrics import aggregate, model_summaries
from editexp.metric_specs import headline_metrics
from editexp.models import ModelShape, load_model, model_shape
from editexp.record import (
    BatchRecord,
    FactRecord,
    RunRecord,
    UpdateStats,
    write_jsonl,
)
from editexp.run_dir import RunDirectory, RunDirError, RunIdentity, hydra_files, write_hydra_files
from editexp.tracking import (
    Tracker,
    WandbIdentity,
    flat_axes,
    run_id_for,
    run_identity,
    tracking,
)

log = logging.getLogger("editexp")

PHASES = ("statistics", "keys_values", "solve", "evaluation")


class SimulatedCrash(RuntimeError):
    """Raised by ``debug.stop_after_updates`` to test that a killed run resumes."""


@dataclass
class Progress:
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
    timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    elapsed_before: float = 0.0  # seconds spent by earlier, interrupted attempts
    values: dict[str, int] = field(default_factory=lambda: {"computed": 0, "read": 0})
    # facts' values computed here and read from the sweep's cache, over all attempts

    @property
    def updates_done(self) -> int:
        return len(self.batches)

    def save(self, path: Path, elapsed: float) -> None:
        payload = {
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
            "past_keys": self.past_keys,
            "timing": self.timing,
            "elapsed": elapsed,
            "values": self.values,
        }
        atomic_torch_save(path, payload)

    @classmethod
    def from_saved(cls, saved: dict) -> Progress:
        """The progress in a checkpoint (as ``RunDirectory.read_checkpoint`` returns it)."""
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
            past_keys=saved["past_keys"],
            timing=saved["timing"],
            elapsed_before=saved["elapsed"],
            values=saved.get("values", {"computed": 0, "read": 0}),
        )


def choose_facts(cfg: DictConfig, settings: RunSettings) -> list[Fact]:
    """The run's facts (the CounterFact file read and checked, the selection made)."""
    return read_inputs(cfg, settings)[0]


def read_inputs(cfg: DictConfig, settings: RunSettings) -> tuple[list[Fact], RunIdentity]:
    """The run's facts and its identity (config and data hashes), read and checked before any
    model is loaded: the CounterFact file, the selection and the statistics corpus."""
    facts, counterfact_hash = load_counterfact(cfg.data)
    chosen = select_facts(
        facts,
        settings.n_edits,
        order=cfg.data.order,
        seed=settings.seed,
        case_ids=cfg.data.case_ids,
        unique_subjects=cfg.data.unique_subjects,
    )
    corpus = CorpusSource.from_config(cfg.stats, cfg.data)
    corpus.check()
    data = {"counterfact": counterfact_hash, "corpus": corpus.identity()}
    return chosen, RunIdentity.of(cfg, data)


def check_against_model(
    cfg: DictConfig, settings: RunSettings, shape: ModelShape, facts: list[Fact]
) -> None:
    """What needs the model's sizes, checked from its config and tokenizer before it loads:
    d_k (EMMET's batch, the statistics' tokens), its positions (prompts, generations)."""
    d_k = shape.d_k
    settings.check_model(d_k=d_k)
    if cfg.stats.n_tokens < d_k:
        raise ConfigError(
            f"stats.n_tokens={cfg.stats.n_tokens} is less than d_k={d_k} of model "
            f"{settings.model_name!r}: C0 would be singular; use stats.n_tokens >= {d_k} "
            "(the default is 100000)"
        )
    positions = shape.positions
    if positions and cfg.eval.generation_length > positions:
        raise ConfigError(
            f"eval.generation_length={cfg.eval.generation_length} is more than model "
            f"{settings.model_name!r}'s {positions} positions"
        )
    prefix_tokens = cfg.editing.prefixes.length + 8 if cfg.editing.prefixes.count else 0
    check_prompt_lengths(facts, shape.tokenizer, positions, prefix_tokens)
    CorpusSource.from_config(cfg.stats, cfg.data).check_tokens(shape.tokenizer, d_k)


def fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of W0 in float64: tells another model's weights apart."""
    values = weight.detach().double()
    return float(values.sum()), float(values.square().sum())


def generation_case_ids(facts: list[Fact], count: int | str, batch_size: int) -> set[int]:
    """The facts whose generations are scored (GE): ``count`` (or ``all``) spread over the run,
    every update's batch contributing (:func:`spread_generation_facts`)."""
    return set(spread_generation_facts([fact.case_id for fact in facts], batch_size, count))


def scored_after(settings: RunSettings, facts: list[Fact], index: int) -> list[Fact]:
    """The facts the schedule scores after update ``index``."""
    size = settings.batch_size
    if settings.schedule == "each_batch":
        return facts[index * size : (index + 1) * size]
    last = index == settings.n_updates - 1
    if last or (settings.schedule == "every_k" and (index + 1) % settings.every_k == 0):
        return facts[: (index + 1) * size]
    return []


def scores_right_after(
    evaluator: Evaluator, written: list[Fact], results: list[FactScores]
) -> dict[int, FactScores]:
    """The ``written`` facts' scores right after the update that wrote them, i.e. the paper's
    each_batch schedule inside an every_k run: taken from this update's scoring ``results``
    when it included them, else scored now (without generation, so GE stays every_k's)."""
    own = {fact.case_id for fact in written}
    right_after = [result for result in results if result.case_id in own]
    if len(right_after) != len(own):
        right_after = evaluator.score(written)
    return {result.case_id: FactScores(result.case_id, result.scores) for result in right_after}


def scorings_per_fact(settings: RunSettings) -> int:
    """How often the schedule scores the first fact after editing it (at most)."""
    if settings.mode != "sequential" or settings.schedule != "every_k":
        return 1
    return -(-settings.n_updates // settings.every_k)  # ceil: the last update scores too


def edited_so_far(progress: Progress) -> dict[str, dict[str, float]]:
    """Mean, std, n of each headline metric over every fact edited so far, as last scored
    (each_batch: the running mean of the batches' scorings; every_k / final: this one)."""
    aggregated = aggregate([scores.metrics() for _, scores in progress.post.values()])
    return {key: aggregated[key] for key in headline_metrics(aggregated) if key in aggregated}


def log_update(tracker: Tracker, batch: BatchRecord) -> None:
    tracker.log_update(
        step=batch.batch + 1,
        edits_done=batch.edits_done,
        scored=batch.metrics,
        so_far={key: stats["mean"] for key, stats in batch.edited_so_far.items()},
        update=asdict(batch.update),
    )


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


def headline(results: list[FactScores]) -> dict[str, float]:
    aggregated = aggregate([result.metrics() for result in results]) if results else {}
    return {
        key: aggregated[key]["mean"] for key in headline_metrics(aggregated) if key in aggregated
    }


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
        progress = claim(directory, identity, cfg.force, hydra_files(cfg, run_dir))
        if isinstance(progress, RunRecord):
            skipping = f"{directory.summary_path} exists; skipping (force=true reruns)"
            show(skipping + "\n" + progress.table())
            return progress
        name, group = run_identity(overrides or [], sweep_dir)
        run_id = run_id_for(directory.path, fresh=bool(cfg.force))
        wandb = WandbIdentity(run_id, name, group, experiment)
        return edit_and_evaluate(cfg, settings, facts, progress, directory, wandb, started)


def claim(
    directory: RunDirectory,
    identity: RunIdentity,
    force: bool,
    own_hydra_files: dict[Path, str] | None,
) -> RunRecord | Progress:
    """What the locked directory holds for this run: the record of the same finished run (to
    skip), the progress of the same unfinished one (to resume), or a fresh start."""
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
                return Progress.from_saved(saved)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise directory.damaged(directory.checkpoint_path, repr(error)) from None
        if directory.has_rows():  # rows without a checkpoint: never mix them with ours
            directory.move_aside()
    directory.start_attempt(identity, own_hydra_files)
    return Progress(identity.config_hash, identity.data_hash)


def edit_and_evaluate(
    cfg: DictConfig,
    settings: RunSettings,
    facts: list[Fact],
    progress: Progress,
    directory: RunDirectory,
    wandb: WandbIdentity,
    started: float,
) -> RunRecord:
    """The run's updates from where ``progress`` stands, in the directory ``run`` holds."""
    run_dir, checkpoint = directory.path, directory.checkpoint_path
    own_hydra_files = hydra_files(cfg, run_dir)
    write_hydra_files(own_hydra_files)  # a refused job may have overwritten them
    axes = flat_axes(
        model=settings.model_name,
        algorithm=settings.algorithm,
        layers=settings.layers,
        batch_size=settings.batch_size,
        n_edits=settings.n_edits,
        lam=settings.lam,
        mode=settings.mode,
        experiment=wandb.experiment,
        eval_schedule=settings.schedule,
    )
    config = {**axes, "cfg": OmegaConf.to_container(cfg, resolve=True)}
    tags = [settings.model_name, settings.algorithm]
    with tracking(cfg.logger, wandb, config, run_dir, tags) as tracker:
        loaded = load_model(cfg.model, cfg.device)
        base = {layer: fingerprint(loaded.weight(layer)) for layer in settings.layers}
        if progress.batches:
            log.info("Resuming after update %d of %d", progress.updates_done, settings.n_updates)
        editor = Editor(loaded, cfg)
        evaluator = Evaluator.from_config(loaded, cfg)
        states_gb = float(cfg.eval.get("layer_states_gb", 0) or 0)
        if states_gb > 0:  # layers below the lowest edited one never change in this run
            evaluator.keep_layer_states(
                min(settings.layers), scorings_per_fact(settings) > 1, int(states_gb * 2**30)
            )
        generate_for = generation_case_ids(facts, cfg.eval.generation_facts, settings.batch_size)
        pre = dict(zip([f.case_id for f in facts], evaluator.pre_edit(facts, generate_for)))
        pre_model = evaluator.pre_edit_model()  # model-level metrics ({} without providers)
        if not progress.batches:
            progress.timing["statistics"] = editor.statistics_seconds
            progress.timing["evaluation"] = evaluator.seconds
            progress.base = base
        elif progress.base != base:
            raise RunDirError(
                f"{checkpoint} was edited from other weights than model "
                f"{settings.model_name!r} has now (did its files change?); rerun with "
                "force=true to start over"
            )
        with torch.no_grad():  # exactly the matrices the interrupted attempt had edited
            for layer, weight in progress.weights.items():
                loaded.weight(layer).copy_(weight)
        if progress.past_keys is not None:  # a resumed run continues the same sums
            editor.past_keys = progress.past_keys
        progress.past_keys = editor.past_keys
        if not tracker.continues:  # no earlier attempt logged them: the curve starts at 1
            for batch in progress.batches:
                log_update(tracker, batch)

        def elapsed() -> float:
            return progress.elapsed_before + time.perf_counter() - started

        values_before = dict(progress.values)  # of earlier attempts; the editor counts this one

        def record_update(
            index: int,
            results: list[FactScores],
            stats: UpdateStats,
            save: bool = True,
            model_metrics: dict[str, float] | None = None,
        ) -> None:
            """Book update ``index`` (the facts it scored, its statistics); ``save``: write the
            checkpoint and rows now (else a later update of the same chunk does)."""
            progress.values = {
                "computed": values_before["computed"] + editor.values.computed,
                "read": values_before["read"] + editor.values.read,
            }
            for result in results:
                progress.post[result.case_id] = (index, result)
            batch = BatchRecord(
                batch=index,
                edits_done=(index + 1) * settings.batch_size,
                evaluated_facts=len(results),
                metrics={**headline(results), **(model_metrics or {})},
                update=stats,
                timing=dict(progress.timing),
                edited_so_far=(
                    {**edited_so_far(progress), **model_summaries(model_metrics)} if results else {}
                ),
            )
            progress.batches.append(batch)
            if save:
                progress.save(checkpoint, elapsed())
                write_rows(run_dir, facts, pre, progress)
            log_update(tracker, batch)
            stop_after = cfg.get("debug", {}).get("stop_after_updates")
            last = index == settings.n_updates - 1
            if save and stop_after is not None and progress.updates_done >= stop_after and not last:
                raise SimulatedCrash(f"debug.stop_after_updates={stop_after}")

        if settings.mode == "singular":
            run_singular(cfg, editor, evaluator, facts, generate_for, progress, record_update)
        size = settings.batch_size
        for index in range(progress.updates_done, settings.n_updates):
            update = editor.edit(facts[index * size : (index + 1) * size], revertible=False)
            progress.timing["keys_values"] += update.timing["keys_values"]
            progress.timing["solve"] += update.timing["solve"]
            scored = scored_after(settings, facts, index)
            before = evaluator.seconds
            results = evaluator.score(scored, generate_for) if scored else []
            model_metrics = evaluator.score_model() if scored else {}
            if settings.schedule == "every_k":
                written = facts[index * size : (index + 1) * size]
                progress.each_batch.update(scores_right_after(evaluator, written, results))
            progress.timing["evaluation"] += evaluator.seconds - before
            for layer, delta in update.deltas.items():
                previous = progress.deltas.get(layer)
                progress.deltas[layer] = delta if previous is None else previous + delta
            progress.weights = {
                layer: loaded.weight(layer).detach().cpu().clone() for layer in settings.layers
            }
            stats = UpdateStats(update.delta_norm, update.preservation_error, update.value_steps)
            record_update(index, results, stats, model_metrics=model_metrics)

        record = run_record(settings, editor, facts, pre, pre_model, progress, run_dir, elapsed())
        files = [directory.summary_path, run_dir / "facts.jsonl", run_dir / "batches.jsonl"]
        if cfg.save_deltas and progress.deltas:
            save_deltas(run_dir / "deltas.pt", loaded, progress.deltas)
            files.append(run_dir / "deltas.pt")
        write_hydra_files(own_hydra_files)
        record.write(directory.summary_path)
        fact_text = {
            fact.case_id: {
                "prompt": fact.rewrite_prompt,
                "target_true": fact.target_true,
                "target_new": fact.target_new,
            }
            for fact in facts
        }
        fact_rows = [row.to_json() for row in fact_records(facts, pre, progress)]
        step = progress.updates_done + 1
        tracker.log_results(record.to_json(), step, fact_rows, files, fact_text)
    show("Results:\n" + record.table())
    return record


def run_singular(cfg, editor, evaluator, facts, generate_for, progress, record_update) -> None:
    """Singular mode: every fact edited alone on the unedited model, at batch cost.

    ``editing.batch_size`` facts at a time: their values and keys in batches, each fact's
    update solved alone, then one batched evaluation in which every fact carries only its own
    rank-one update (:meth:`Editor.edit_singular`); no weight is written. Each fact is still
    one update of the record, as if edited, scored and restored one after another (which
    ``tests/test_singular.py`` proves it equals).
    """
    chunk_size = int(cfg.editing.batch_size)
    for start in range(progress.updates_done, len(facts), chunk_size):
        chunk = facts[start : start + chunk_size]
        singular = editor.edit_singular(chunk)
        progress.timing["keys_values"] += singular.timing["keys_values"]
        progress.timing["solve"] += singular.timing["solve"]
        before = evaluator.seconds
        results = evaluator.score(chunk, generate_for, edits=singular.edits)
        progress.timing["evaluation"] += evaluator.seconds - before
        stats = zip(singular.delta_norms, singular.preservation_errors, singular.value_steps)
        for offset, (result, (norm, error, steps)) in enumerate(zip(results, stats)):
            save = offset == len(chunk) - 1
            record_update(start + offset, [result], UpdateStats(norm, error, steps), save)


def fact_records(
    facts: list[Fact], pre: dict[int, FactScores], progress: Progress
) -> list[FactRecord]:
    """The lines of facts.jsonl: per edited fact, its update, pre and post scores."""
    each_batch = progress.each_batch
    return [
        FactRecord(
            fact.case_id,
            index,
            pre[fact.case_id].to_json(),
            post.to_json(),
            each_batch[fact.case_id].to_json() if fact.case_id in each_batch else {},
        )
        for fact in facts
        if fact.case_id in progress.post
        for index, post in [progress.post[fact.case_id]]
    ]


def write_rows(
    run_dir: Path, facts: list[Fact], pre: dict[int, FactScores], progress: Progress
) -> None:
    write_jsonl(run_dir / "facts.jsonl", fact_records(facts, pre, progress))
    write_jsonl(run_dir / "batches.jsonl", progress.batches)


def each_batch_aggregate(
    settings: RunSettings, facts: list[Fact], progress: Progress, post: dict
) -> dict[str, dict[str, float]]:
    """Every edited fact as scored right after its own update (the paper's each_batch
    numbers): the run's ``post`` aggregate itself except in sequential runs scored on another
    schedule."""
    if settings.mode != "sequential" or settings.schedule == "each_batch":
        return post
    after = progress.each_batch
    scores = [after[fact.case_id] for fact in facts if fact.case_id in after]
    return aggregate([result.metrics() for result in scores]) if scores else {}


def latest_model_metrics(
    batches: list[BatchRecord], pre_model: dict[str, float]
) -> dict[str, dict[str, float]]:
    """The model-level metrics (those of ``pre_model``) of the last update that scored them."""
    for batch in reversed(batches):
        found = {key: batch.edited_so_far[key] for key in pre_model if key in batch.edited_so_far}
        if found:
            return found
    return {}


def run_record(
    settings: RunSettings,
    editor: Editor,
    facts: list[Fact],
    pre: dict[int, FactScores],
    pre_model: dict[str, float],
    progress: Progress,
    run_dir: Path,
    elapsed: float,
) -> RunRecord:
    post = [progress.post[fact.case_id][1] for fact in facts if fact.case_id in progress.post]
    post_aggregate = {
        **aggregate([result.metrics() for result in post]),
        **latest_model_metrics(progress.batches, pre_model),
    }
    return RunRecord(
        algorithm=settings.algorithm,
        model=settings.model_name,
        layer=list(settings.layers),
        mode=settings.mode,
        batch_size=settings.batch_size,
        n_edits=settings.n_edits,
        lam=settings.lam,
        keep_edits=settings.keep_edits,
        nullspace_threshold=settings.nullspace_threshold,
        null_space_dim=editor.null_space_dims(),
        eval_schedule=settings.schedule,
        every_k=settings.every_k if settings.schedule == "every_k" else None,
        edits_done=progress.updates_done * settings.batch_size,
        seed=settings.seed,
        hparams=asdict(settings.hparams),
        pre={
            **aggregate([pre[fact.case_id].metrics() for fact in facts]),
            **model_summaries(pre_model),
        },
        post=post_aggregate,
        each_batch=each_batch_aggregate(settings, facts, progress, post_aggregate),
        update_mean=UpdateStats.mean([batch.update for batch in progress.batches]),
        timing={**progress.timing, "total": elapsed},
        run_dir=str(run_dir),
        values=dict(progress.values),
        config_hash=progress.config_hash,
        data_hash=progress.data_hash,
    )


def use_slurm_cpus() -> int | None:
    """In a SLURM job, run torch on the CPUs the job was given (``SLURM_CPUS_PER_TASK``), not on
    every core of the node, unless ``OMP_NUM_THREADS`` says otherwise. Clusters without CPU
    binding (``TaskPlugin=task/none``) otherwise start every job with all cores' threads, and
    two jobs on one node then each run 10-20x slower. Returns the thread count it set."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus or "OMP_NUM_THREADS" in os.environ or not cpus.isdigit():
        return None
    torch.set_num_threads(int(cpus))
    return int(cpus)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    use_slurm_cpus()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = hydra_cfg.runtime.choices.get("experiment")
    if hydra_cfg.mode.name == "MULTIRUN":
        # An Exception (not SystemExit): Hydra records the failed grid point and runs the
        # others; `main` prints a user error of the first failed point as one line.
        try:
            run(cfg, run_dir, list(hydra_cfg.overrides.task), hydra_cfg.sweep.dir, experiment)
        except Exception as error:
            log.error("grid point %s failed: %s", hydra_cfg.job.num, one_line(error))
            raise
    else:
        with cli_errors("editexp"):  # exits here: Hydra would add a line of its own
            run(cfg, run_dir, list(hydra_cfg.overrides.task), None, experiment)


def main() -> None:
    """The ``editexp`` console script: user errors as one line on stderr and exit status 2."""
    with cli_errors("editexp"):
        _hydra_main()


if __name__ == "__main__":
    main()
