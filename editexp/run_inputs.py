"""A run's inputs (facts, corpus) read and checked against its config and model's sizes,
before any model weights load."""

from __future__ import annotations

from omegaconf import DictConfig

from editexp.config import ConfigError, RunSettings
from editexp.data.corpus import CorpusSource
from editexp.data.counterfact import (
    Fact,
    check_prompt_lengths,
    load_counterfact,
    select_facts,
    split_facts,
)
from editexp.evaluation.generation_facts import spread_generation_facts
from editexp.models import ModelShape
from editexp.run_dir import RunIdentity


def choose_facts(cfg: DictConfig, settings: RunSettings) -> list[Fact]:
    """The run's facts (the CounterFact file read and checked, the selection made)."""
    return read_inputs(cfg, settings)[0]


def read_inputs(cfg: DictConfig, settings: RunSettings) -> tuple[list[Fact], RunIdentity]:
    """The run's facts and its identity (config and data hashes), read and checked before any
    model is loaded: the CounterFact file, the selection and the statistics corpus."""
    facts, counterfact_hash = load_counterfact(cfg.data)
    chosen = select_facts(
        split_facts(facts, cfg.data.get("split", "all")),
        settings.n_edits,
        order=cfg.data.order,
        seed=settings.seed,
        case_ids=cfg.data.case_ids,
        unique_subjects=cfg.data.unique_subjects,
        fact_set=cfg.data.get("fact_set", 0),
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


def generation_case_ids(facts: list[Fact], count: int | str, batch_size: int) -> set[int]:
    """The facts whose generations are scored (GE): ``count`` (or ``all``) spread over the run,
    every update's batch contributing (:func:`spread_generation_facts`)."""
    return set(spread_generation_facts([fact.case_id for fact in facts], batch_size, count))
