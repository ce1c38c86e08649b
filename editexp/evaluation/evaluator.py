"""The :class:`Evaluator`: CounterFact scores of facts on the model as it is now.

    evaluator = Evaluator(loaded_model)
    before = evaluator.pre_edit(facts)                  # cached on disk per model and facts
    after = evaluator.score(facts, generate_for={facts[0].case_id})
    evaluator.compare("The Eiffel Tower is in", "Rome", "Paris")

Results are :class:`~editexp.evaluation.counterfact_eval.FactScores`, one per fact in the
order asked; they become JSON only when written (``FactScores.to_json``).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from editexp.cache import atomic_write_json, cache_root, file_lock, stable_hash
from editexp.data.counterfact import Fact
from editexp.evaluation.counterfact_eval import FactScores, evaluate_facts
from editexp.evaluation.scoring import score_continuations
from editexp.models import LoadedModel


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
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.generation_length = generation_length
        self.seed = seed
        self.seconds = 0.0  # spent scoring and generating so far

    @classmethod
    def from_config(cls, model: LoadedModel, cfg: DictConfig) -> Evaluator:
        return cls(model, cfg.eval.batch_size, cfg.eval.generation_length, int(cfg.seed))

    def score(self, facts: Sequence[Fact], generate_for: Collection[int] = ()) -> list[FactScores]:
        """Each fact's scores, in the order of ``facts``; GE for the facts whose case_id is in
        ``generate_for``."""
        # Facts with generation go first: evaluate_facts generates for the leading ones.
        ordered = sorted(facts, key=lambda fact: fact.case_id not in generate_for)
        start = time.perf_counter()
        results = evaluate_facts(
            self.model.model,
            self.model.tokenizer,
            ordered,
            batch_size=self.batch_size,
            generation_facts=sum(1 for fact in facts if fact.case_id in generate_for),
            generation_length=self.generation_length,
            seed=self.seed,
            progress=len(facts) > 8,
        )
        self.seconds += time.perf_counter() - start
        by_case = {result.case_id: result for result in results}
        return [by_case[fact.case_id] for fact in facts]

    def pre_edit(
        self, facts: Sequence[Fact], generate_for: Collection[int] = ()
    ) -> list[FactScores]:
        """:meth:`score` of the unedited model, cached under the model's identity, the facts and
        the generation settings (a sweep's grid points compute it once). Call it before
        editing."""
        key = stable_hash(
            [
                self.model.identity,
                [{k: v for k, v in asdict(fact).items() if k != "extra"} for fact in facts],
                sorted(generate_for),
                self.generation_length,
                self.seed,
            ]
        )
        path = cache_root() / "pre_edit" / f"{self.model.spec.name.replace('/', '--')}-{key}.json"
        with file_lock(path):
            if path.is_file():
                import json

                return [FactScores.from_json(row) for row in json.loads(path.read_text())]
            results = self.score(facts, generate_for)
            atomic_write_json(path, [result.to_json() for result in results])
            return results

    def compare(self, prompt: str, target_a: str, target_b: str) -> Comparison:
        """Which of two continuations of ``prompt`` the model prefers, and by how much."""
        ((score_a, score_b),) = score_continuations(
            self.model.model, self.model.tokenizer, [prompt], [[target_a, target_b]], progress=False
        )
        return Comparison(prompt, target_a, target_b, float(score_a), float(score_b))
