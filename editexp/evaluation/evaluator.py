"""The :class:`Evaluator`: CounterFact scores of facts on the model as it is now.

    evaluator = Evaluator(loaded_model)
    before = evaluator.pre_edit(facts)                  # cached on disk per model and facts
    after = evaluator.score(facts, generate_for={facts[0].case_id})
    evaluator.compare("The Eiffel Tower is in", "Rome", "Paris")
    model_before = evaluator.pre_edit_model()           # {"PPL": ...}: model-level providers
    model_after = evaluator.score_model()

Results are :class:`~editexp.evaluation.counterfact_eval.FactScores`, one per fact in the
order asked; they become JSON only when written (``FactScores.to_json``). Beside CounterFact,
the metric providers of ``eval.metrics`` (:mod:`editexp.evaluation.providers`) are scored:
per-fact ones inside :meth:`Evaluator.score` (their values in ``FactScores.extra``),
model-level ones by :meth:`Evaluator.score_model`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from editexp.cache import atomic_write_json, cache_root, load_or_compute, stable_hash
from editexp.data.counterfact import Fact
from editexp.evaluation.counterfact_eval import (
    EvalSettings,
    FactScores,
    evaluate_facts,
    scored_prompts,
)
from editexp.evaluation.providers import (
    FactMetricProvider,
    ModelMetricProvider,
    Provider,
    providers_from_config,
)
from editexp.evaluation.scoring import (
    LayerStates,
    encode_continuations,
    record_layer_states,
    score_continuations,
)
from editexp.models import LoadedModel
from editexp.row_edits import RankOneEdits, RowEdits
from editexp.sampling import SAMPLER_VERSION


@dataclass(frozen=True)
class Comparison:
    """Scores (mean -log p per target token, lower = more likely) of two continuations."""

    prompt: str
    target_a: str
    target_b: str
    score_a: float
    score_b: float

    @property
    def preferred(self) -> str:
        """The target the model finds more likely (ties go to ``target_b``, as in ES)."""
        return self.target_a if self.score_a < self.score_b else self.target_b


class Evaluator:
    """Scores facts' rewrite, paraphrase and neighbourhood prompts (and generates for some)."""

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int = 64,
        generation_length: int = 100,
        seed: int = 0,
        generation_batch_size: int = 256,
        providers: Sequence[Provider] = (),
    ) -> None:
        self.model = model
        self.fact_providers = [p for p in providers if isinstance(p, FactMetricProvider)]
        self.model_providers = [p for p in providers if isinstance(p, ModelMetricProvider)]
        self.batch_size = batch_size  # prompts per scoring batch
        self.generation_length = generation_length
        self.generation_batch_size = generation_batch_size  # prompts sampled together (GE)
        self.seed = seed
        self.seconds = 0.0  # spent scoring and generating so far
        self.layer_states: LayerStates | None = None  # see keep_layer_states
        self.record_missing_states = False

    @classmethod
    def from_config(cls, model: LoadedModel, cfg: DictConfig) -> Evaluator:
        return cls(
            model,
            cfg.eval.batch_size,
            cfg.eval.generation_length,
            int(cfg.seed),
            cfg.eval.generation_batch_size,
            providers_from_config(cfg),
        )

    def keep_layer_states(
        self, layer: int, record_missing: bool = False, max_bytes: int | None = None
    ) -> None:
        """Let scoring start at ``layer``'s input from the unedited model's hidden states there,
        skipping the layers below it: valid while no layer below ``layer`` is edited (call it
        with the lowest edited layer). States are recorded (on the CPU) by :meth:`pre_edit`
        for all its facts; with ``record_missing``, other facts get them from a pass through
        the layers below ``layer`` when first scored. At most ``max_bytes`` of states are
        kept; a scoring with a fact beyond runs full passes."""
        self.layer_states = LayerStates.for_model(self.model, layer, "cpu", max_bytes)
        self.record_missing_states = record_missing

    def score(
        self,
        facts: Sequence[Fact],
        generate_for: Collection[int] = (),
        edits: RankOneEdits | None = None,
        record_states: bool = False,
    ) -> list[FactScores]:
        """Each fact's scores, in the order of ``facts``; GE for the facts whose case_id is in
        ``generate_for``. ``edits`` (one rank-one update per fact, in the order of ``facts``,
        e.g. ``Editor.edit_singular``'s): every fact is scored and sampled with its own update
        only, as if it had been edited alone."""
        order = generation_first(facts, generate_for)
        ordered = [facts[i] for i in order]
        row_edits = None
        if edits is not None:
            if len(edits) != len(facts):
                raise ValueError(f"{len(edits)} edits for {len(facts)} facts")
            row_edits = RowEdits.for_model(self.model, edits.select(order))
        start = time.perf_counter()
        states = self._states_for(ordered) if not record_states else None
        settings = EvalSettings(
            batch_size=self.batch_size,
            generation_facts=sum(1 for fact in facts if fact.case_id in generate_for),
            generation_length=self.generation_length,
            seed=self.seed,
            generation_batch_size=self.generation_batch_size,
            progress=len(facts) > 8,
        )
        with self.model.compute():  # autocast for a mixed precision (scores: exact head)
            results = evaluate_facts(
                self.model.model,
                self.model.tokenizer,
                ordered,
                settings,
                edits=row_edits,
                start_states=states,
                record_states=self.layer_states if record_states else None,
            )
            self._score_fact_providers(ordered, results, edits)
        self.seconds += time.perf_counter() - start
        by_case = {result.case_id: result for result in results}
        return [by_case[fact.case_id] for fact in facts]

    def _score_fact_providers(
        self, facts: Sequence[Fact], results: list[FactScores], edits: RankOneEdits | None
    ) -> None:
        """The per-fact providers' values, into each result's ``extra``."""
        if self.fact_providers and edits is not None:
            raise ValueError("per-fact metric providers cannot score singular (row) edits")
        for fact_provider in self.fact_providers:
            values = fact_provider.score_facts(self.model, facts)
            for result, fact_values in zip(results, values, strict=True):
                result.extra.update(fact_values)

    def score_model(self) -> dict[str, float]:
        """The model-level providers' metrics of the model as it is now ({} without any)."""
        start = time.perf_counter()
        values: dict[str, float] = {}
        with self.model.compute():
            for model_provider in self.model_providers:
                values.update(model_provider.score(self.model))
        self.seconds += time.perf_counter() - start
        return values

    def pre_edit_model(self) -> dict[str, float]:
        """:meth:`score_model` of the unedited model, cached under the model's identity and
        every provider's :meth:`~editexp.evaluation.providers.MetricProvider.cache_key`."""
        if not self.model_providers:
            return {}
        key = stable_hash([self.model.identity, [p.cache_key() for p in self.model_providers]])
        name = self.model.spec.name.replace("/", "--")
        names = {spec.name for p in self.model_providers for spec in p.specs}
        return load_or_compute(
            cache_root() / "pre_edit_model" / f"{name}-{key}.json",
            load=lambda p: {k: float(v) for k, v in json.loads(p.read_text()).items()},
            save=atomic_write_json,
            compute=self.score_model,
            problem=lambda values: None if set(values) == names else f"metrics {sorted(values)}",
            what="pre-edit model metric cache",
        )

    def _states_for(self, facts: Sequence[Fact]) -> LayerStates | None:
        """The layer states to start from for ``facts``, recording missing ones if allowed;
        None: score with full passes."""
        states = self.layer_states
        if states is None or not (states.prompts or self.record_missing_states):
            return None
        missing = [fact for fact in facts if not self._covered(fact)]
        if missing and not self.record_missing_states:
            return None
        if missing:
            self._record_states(missing)
            if not all(self._covered(fact) for fact in missing):
                return None  # beyond eval.layer_states_gb: full passes
        return states

    def _covered(self, fact: Fact) -> bool:
        """Whether every scored sequence of ``fact`` has stored layer states."""
        prompts, targets, _ = scored_prompts([fact])
        encoded = encode_continuations(self.model.tokenizer, prompts, targets)
        return self.layer_states is not None and self.layer_states.covers(encoded)

    def _record_states(self, facts: Sequence[Fact]) -> None:
        """Record the layer states of ``facts``'s prompts with passes through the layers below
        the states' layer, batched exactly as :meth:`score` batches ``facts``."""
        prompts, targets, _ = scored_prompts(facts)
        with self.model.compute():
            record_layer_states(
                self.model.model,
                self.model.tokenizer,
                prompts,
                targets,
                self.layer_states,
                self.batch_size,
            )

    def pre_edit(
        self, facts: Sequence[Fact], generate_for: Collection[int] = ()
    ) -> list[FactScores]:
        """:meth:`score` of the unedited model, cached under the model's identity, the facts and
        the generation settings (a sweep's grid points compute it once). Call it before
        editing.

        With :meth:`keep_layer_states`, the states of all ``facts`` are recorded here, from the
        same batches whether the scores are computed (recorded during that pass) or read from
        the cache (a pass through the layers below only): post-edit scores are then the same
        bit for bit with a cold or a warm cache, and in a resumed run."""
        key = stable_hash(
            [
                self.model.identity,
                [{k: v for k, v in asdict(fact).items() if k != "extra"} for fact in facts],
                sorted(generate_for),
                self.generation_length,
                self.seed,
                SAMPLER_VERSION,
                *([[p.cache_key() for p in self.fact_providers]] if self.fact_providers else []),
            ]
        )
        path = cache_root() / "pre_edit" / f"{self.model.spec.name.replace('/', '--')}-{key}.json"
        case_ids = [fact.case_id for fact in facts]

        def problem(results: list[FactScores]) -> str | None:  # the facts asked, in order
            found = [result.case_id for result in results]
            return None if found == case_ids else f"{len(found)} facts, not the {len(case_ids)}"

        computed = []

        def compute() -> list[FactScores]:
            computed.append(True)
            return self.score(facts, generate_for, record_states=self.layer_states is not None)

        results = load_or_compute(  # checked on read: a bad entry is computed again
            path,
            load=lambda p: [FactScores.from_json(row) for row in json.loads(p.read_text())],
            save=lambda p, results: atomic_write_json(p, [r.to_json() for r in results]),
            compute=compute,
            problem=problem,
            what="pre-edit score cache",
        )
        if self.layer_states is not None and not computed:
            self._record_states([facts[i] for i in generation_first(facts, generate_for)])
        return results

    def compare(self, prompt: str, target_a: str, target_b: str) -> Comparison:
        """Which of two continuations of ``prompt`` the model prefers, and by how much."""
        with self.model.compute():
            ((score_a, score_b),) = score_continuations(
                self.model.model,
                self.model.tokenizer,
                [prompt],
                [[target_a, target_b]],
                progress=False,
            )
        return Comparison(prompt, target_a, target_b, float(score_a), float(score_b))


def generation_first(facts: Sequence[Fact], generate_for: Collection[int]) -> list[int]:
    """Indices of ``facts``, those with generation first (in order), then the others:
    :func:`evaluate_facts` generates for the leading ones."""
    return sorted(range(len(facts)), key=lambda i: facts[i].case_id not in generate_for)
