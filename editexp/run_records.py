"""Assembling a run's records (layouts in :mod:`editexp.record`) from its state: a line of
``batches.jsonl`` per update, of ``facts.jsonl`` per edited fact, and ``summary.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from editexp.config import RunSettings
from editexp.data.counterfact import Fact
from editexp.evaluation.counterfact_eval import FactScores
from editexp.evaluation.metrics import aggregate, model_summaries
from editexp.metric_specs import headline_metrics
from editexp.record import BatchRecord, FactRecord, RunRecord, UpdateStats, write_jsonl
from editexp.run_state import RunState
from editexp.run_steps import Booking


@dataclass
class PreEdit:
    """The unedited model's scores: per fact (CounterFact), and model-level metrics."""

    facts: dict[int, FactScores]  # case_id -> scores
    model: dict[str, float] = field(default_factory=dict)  # {"PPL": 41.6}; {}: no providers


def headline(results: list[FactScores]) -> dict[str, float]:
    """The mean of each headline metric over ``results``."""
    aggregated = aggregate([result.metrics() for result in results]) if results else {}
    shown = headline_metrics(aggregated)
    return {key: aggregated[key]["mean"] for key in shown if key in aggregated}


def edited_so_far(state: RunState) -> dict[str, dict[str, float]]:
    """Mean, std, n of each headline metric over every fact edited so far, as last scored
    (each_batch: the running mean of the batches' scorings; every_k / final: this one)."""
    aggregated = aggregate([scores.metrics() for _, scores in state.post.values()])
    return {key: aggregated[key] for key in headline_metrics(aggregated) if key in aggregated}


def batch_record(state: RunState, booking: Booking, batch_size: int) -> BatchRecord:
    """The line of batches.jsonl of one update (its results already in ``state.post``);
    model-level metrics (``booking.model_metrics``) count for the scored update and so far."""
    results, model_metrics = booking.results, booking.model_metrics
    return BatchRecord(
        batch=booking.index,
        edits_done=(booking.index + 1) * batch_size,
        evaluated_facts=len(results),
        metrics={**headline(results), **model_metrics},
        update=booking.stats,
        timing=dict(state.timing),
        edited_so_far=(
            {**edited_so_far(state), **model_summaries(model_metrics)} if results else {}
        ),
    )


def latest_model_metrics(
    batches: list[BatchRecord], pre_model: dict[str, float]
) -> dict[str, dict[str, float]]:
    """The model-level metrics (those of ``pre_model``) of the last update that scored them."""
    for batch in reversed(batches):
        found = {key: batch.edited_so_far[key] for key in pre_model if key in batch.edited_so_far}
        if found:
            return found
    return {}


def fact_records(
    facts: list[Fact], pre: dict[int, FactScores], state: RunState
) -> list[FactRecord]:
    """The lines of facts.jsonl: per edited fact, its update, pre and post scores."""
    each_batch = state.each_batch
    return [
        FactRecord(
            fact.case_id,
            index,
            pre[fact.case_id].to_json(),
            post.to_json(),
            each_batch[fact.case_id].to_json() if fact.case_id in each_batch else {},
        )
        for fact in facts
        if fact.case_id in state.post
        for index, post in [state.post[fact.case_id]]
    ]


def write_rows(
    run_dir: Path, facts: list[Fact], pre: dict[int, FactScores], state: RunState
) -> None:
    write_jsonl(run_dir / "facts.jsonl", fact_records(facts, pre, state))
    write_jsonl(run_dir / "batches.jsonl", state.batches)


def each_batch_aggregate(
    settings: RunSettings, facts: list[Fact], state: RunState, post: dict
) -> dict[str, dict[str, float]]:
    """Every edited fact as scored right after its own update (the paper's each_batch
    numbers): the run's ``post`` aggregate itself except in sequential runs scored on another
    schedule."""
    if settings.mode != "sequential" or settings.schedule == "each_batch":
        return post
    after = state.each_batch
    scores = [after[fact.case_id] for fact in facts if fact.case_id in after]
    return aggregate([result.metrics() for result in scores]) if scores else {}


def run_record(
    settings: RunSettings,
    null_space_dims: list[int] | None,
    facts: list[Fact],
    pre: PreEdit,
    state: RunState,
    run_dir: Path,
    elapsed: float,
) -> RunRecord:
    """summary.json: the run's axes, pre/post aggregates, update norms and timings."""
    post = [state.post[fact.case_id][1] for fact in facts if fact.case_id in state.post]
    post_aggregate = {
        **aggregate([result.metrics() for result in post]),
        **latest_model_metrics(state.batches, pre.model),
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
        null_space_dim=null_space_dims,
        eval_schedule=settings.schedule,
        every_k=settings.every_k if settings.schedule == "every_k" else None,
        edits_done=state.updates_done * settings.batch_size,
        seed=settings.seed,
        hparams=asdict(settings.hparams),
        pre={
            **aggregate([pre.facts[fact.case_id].metrics() for fact in facts]),
            **model_summaries(pre.model),
        },
        post=post_aggregate,
        each_batch=each_batch_aggregate(settings, facts, state, post_aggregate),
        update_mean=UpdateStats.mean([batch.update for batch in state.batches]),
        timing={**state.timing, "total": elapsed},
        run_dir=str(run_dir),
        values=dict(state.values),
        precision=settings.precision,
        config_hash=state.config_hash,
        data_hash=state.data_hash,
    )


def fact_text(facts: list[Fact]) -> dict[int, dict[str, str]]:
    """Per fact, the prompt and both targets (for the tracker's table of facts)."""
    return {
        fact.case_id: {
            "prompt": fact.rewrite_prompt,
            "target_true": fact.target_true,
            "target_new": fact.target_new,
        }
        for fact in facts
    }
