"""CounterFact evaluation of a set of facts on the model as it is now.

Every rewrite, paraphrase and neighbourhood prompt of every fact is scored in one
:func:`~editexp.evaluation.scoring.score_continuations` call (so batches mix facts and stay
full), each prompt against ``(target_new, target_true)``. Generation (GE) is optional and
limited to the first ``generation_facts`` facts, since it is by far the slowest part; each
generation prompt has its own seed (run seed, case id, prompt index), so a fact's texts do not
depend on which facts generate with it.

Singular edits: with ``edits`` (one rank-one update per fact, in the order of ``facts``) every
fact's prompts, scored and sampled, carry only their own fact's update, so E singularly edited
facts are evaluated in one batched call, with no weight written. ``start_states`` /
``record_states`` are the scoring shortcuts of :mod:`editexp.evaluation.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editexp.data.counterfact import Fact
from editexp.evaluation.generation import generate_texts
from editexp.evaluation.metrics import fact_metrics, generation_entropy
from editexp.evaluation.scoring import LayerStates, ScoringShortcuts, score_continuations
from editexp.row_edits import PromptEdits, RowEdits
from editexp.sampling import generation_seed


@dataclass
class FactScores:
    """A fact's evaluation on the model as it was then: the typed per-fact result."""

    case_id: int
    # family ("rewrite", "paraphrase", "neighborhood") -> (score_new, score_true) per prompt
    scores: dict[str, list[tuple[float, float]]]
    generation_texts: list[str] | None = None
    GE: float | None = None  # mean generation_entropy of generation_texts, in bits
    extra: dict[str, float] = field(default_factory=dict)  # per-fact metric providers' values

    def metrics(self) -> dict[str, float]:
        """ES/PS/NS, their magnitudes (see :func:`fact_metrics`), GE when it was measured and
        the per-fact providers' metrics.

        Only numbers, so a list of these goes straight into :func:`metrics.aggregate`.
        """
        values = fact_metrics(self.scores)
        if self.GE is not None:
            values["GE"] = self.GE
        values.update(self.extra)
        return values

    def to_json(self) -> dict[str, Any]:
        """``case_id``, the :meth:`metrics` at the top level, the raw ``scores`` (lists of
        ``[score_new, score_true]``) and, for facts with generation, ``generation_texts``."""
        row: dict[str, Any] = {"case_id": self.case_id}
        row.update(self.metrics())
        row["scores"] = {
            family: [[float(new), float(true)] for new, true in pairs]
            for family, pairs in self.scores.items()
        }
        if self.generation_texts is not None:
            row["generation_texts"] = list(self.generation_texts)
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> FactScores:
        scores = {
            family: [(float(new), float(true)) for new, true in pairs]
            for family, pairs in row["scores"].items()
        }
        known = {"case_id", "GE", *fact_metrics(scores)}
        extra = {
            key: float(value)
            for key, value in row.items()
            if key not in known and isinstance(value, int | float) and not isinstance(value, bool)
        }
        return cls(row["case_id"], scores, row.get("generation_texts"), row.get("GE"), extra)


def fact_prompts(fact: Fact) -> dict[str, list[str]]:
    """The scored prompts of a fact, per family (families without prompts are left out)."""
    families = {
        "rewrite": [fact.rewrite_prompt],
        "paraphrase": list(fact.paraphrase_prompts),
        "neighborhood": list(fact.neighborhood_prompts),
    }
    return {family: prompts for family, prompts in families.items() if prompts}


def scored_prompts(
    facts: Sequence[Fact],
) -> tuple[list[str], list[list[str]], list[tuple[int, str]]]:
    """Every scored prompt of ``facts``, its targets ``[target_new, target_true]`` and its
    slot ``(fact index, family)``."""
    prompts: list[str] = []
    targets: list[list[str]] = []
    slots: list[tuple[int, str]] = []
    for index, fact in enumerate(facts):
        for family, family_prompts in fact_prompts(fact).items():
            prompts.extend(family_prompts)
            targets.extend([[fact.target_new, fact.target_true]] * len(family_prompts))
            slots.extend([(index, family)] * len(family_prompts))
    return prompts, targets, slots


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate_facts` scores and samples."""

    batch_size: int = 64  # prompts scored together
    generation_facts: int = 0  # GE for the first this many facts
    generation_length: int = 100  # tokens per generated text, prompt included
    seed: int = 0  # the run seed: each generation prompt's seed derives from it
    generation_batch_size: int = 256  # prompts sampled together
    progress: bool = True  # a progress bar over scoring batches


def evaluate_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    settings: EvalSettings | None = None,
    *,
    edits: RowEdits | None = None,
    start_states: LayerStates | None = None,
    record_states: LayerStates | None = None,
    **options: Any,
) -> list[FactScores]:
    """Scores of every fact's prompts, and generated texts and GE for the first few facts.

    ``settings`` (or single :class:`EvalSettings` fields as keywords, e.g. ``progress=False``):
    ``batch_size`` prompts are scored together, ``generation_batch_size`` sampled together
    (sampling is one token of every prompt per step: bigger batches use the CPU's matrix
    units better, and every prompt samples the same text in any batch).
    ``edits``: fact i is evaluated with edit i only (``len(edits) == len(facts)``).
    """
    settings = replace(settings or EvalSettings(), **options)
    if edits is not None and edits.n_edits != len(facts):
        raise ValueError(f"{edits.n_edits} edits for {len(facts)} facts; expected one per fact")
    prompts, targets, slots = scored_prompts(facts)
    rows = [index for index, _ in slots]
    shortcuts = ScoringShortcuts(
        edits=None if edits is None else PromptEdits(edits, rows),
        start_states=start_states,
        record_states=record_states,
    )
    scores = score_continuations(
        model, tokenizer, prompts, targets, settings.batch_size, settings.progress, shortcuts
    )

    results = [FactScores(case_id=fact.case_id, scores={}) for fact in facts]
    for (index, family), (score_new, score_true) in zip(slots, scores):
        results[index].scores.setdefault(family, []).append((score_new, score_true))
    _add_generations(model, tokenizer, facts, settings, edits, results)
    return results


def _add_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    settings: EvalSettings,
    edits: RowEdits | None,
    results: list[FactScores],
) -> None:
    """Sample the generation prompts of the first ``settings.generation_facts`` facts (fact i
    with edit i) and set their texts and GE in ``results``."""
    generated = [
        (index, fact)
        for index, fact in enumerate(facts[: settings.generation_facts])
        if fact.generation_prompts
    ]
    if not generated:
        return
    generation_prompts, seeds, prompt_edits = [], [], []
    for index, fact in generated:
        for position, prompt in enumerate(fact.generation_prompts):
            generation_prompts.append(prompt)
            seeds.append(generation_seed(settings.seed, fact.case_id, position))
            prompt_edits.append(index)
    texts = generate_texts(
        model,
        tokenizer,
        generation_prompts,
        settings.generation_length,
        seed=seeds,
        batch_size=settings.generation_batch_size,
        edits=None if edits is None else PromptEdits(edits, prompt_edits),
    )
    start = 0
    for index, fact in generated:
        fact_texts = texts[start : start + len(fact.generation_prompts)]
        start += len(fact_texts)
        results[index].generation_texts = fact_texts
        results[index].GE = float(np.mean([generation_entropy(text) for text in fact_texts]))
