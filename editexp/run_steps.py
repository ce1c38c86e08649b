"""A run's updates as steps, the same for every mode: each step edits, scores what the
schedule says and returns its bookings, one per update of the record.

``batch`` and ``sequential``: a step is one update of ``batch_size`` facts, written into the
model. ``singular``: a step is a chunk of ``editing.batch_size`` facts each edited alone on the
unedited model (:meth:`Editor.edit_singular`: no weight is written) and scored with only its
own rank-one update; each fact is one update of the record, as if edited, scored and restored
one after another (``tests/test_singular.py`` proves it equals that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from editexp.config import RunSettings
from editexp.data.counterfact import Fact
from editexp.editing.editor import Editor
from editexp.evaluation.counterfact_eval import FactScores
from editexp.evaluation.evaluator import Evaluator
from editexp.record import UpdateStats
from editexp.run_state import RunState
from editexp.timing import PhaseTimer

EDIT_PHASES = ("keys_values", "solve")  # the editor's own timing of an update


@dataclass
class Booking:
    """One update of the record: its index, the facts scored after it, its statistics."""

    index: int
    results: list[FactScores]
    stats: UpdateStats
    model_metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"PPL": 41.6}


@dataclass
class Steps:
    """The steps of one run, from where its state stands."""

    settings: RunSettings
    facts: list[Fact]
    editor: Editor
    evaluator: Evaluator
    state: RunState
    timer: PhaseTimer
    generate_for: set[int]
    chunk_size: int  # singular: facts edited (each alone) per step

    def starts(self) -> range:
        """The first update of every step still to do."""
        done = self.state.updates_done
        if self.settings.mode == "singular":
            return range(done, len(self.facts), self.chunk_size)
        return range(done, self.settings.n_updates)

    def take(self, first: int) -> list[Booking]:
        """Edit and score the step starting at update ``first``."""
        if self.settings.mode == "singular":
            return self._singular_chunk(first)
        return [self._update(first)]

    def _update(self, index: int) -> Booking:
        """Update ``index``: its batch written into the model, then the schedule's scoring."""
        size, facts = self.settings.batch_size, self.facts
        written = facts[index * size : (index + 1) * size]
        update = self.editor.edit(written, revertible=False)
        self.timer.add_all(update.timing, EDIT_PHASES)
        scored = scored_after(self.settings, facts, index)
        last = index == self.settings.n_updates - 1
        generate_for = self.generate_for
        if self.settings.generation_at == "final" and not last:
            generate_for = set()
        with self.timer.phase("evaluation"):
            results = self.evaluator.score(scored, generate_for) if scored else []
            model_metrics = self.evaluator.score_model() if scored else {}
            if self.settings.schedule == "every_k":
                right_after = scores_right_after(self.evaluator, written, results)
                self.state.each_batch.update(right_after)
        self.state.add_deltas(update.deltas)
        model = self.editor.model
        self.state.weights = {
            layer: model.weight(layer).detach().cpu().clone() for layer in self.settings.layers
        }
        stats = UpdateStats(update.delta_norm, update.preservation_error, update.value_steps)
        return Booking(index, results, stats, model_metrics)

    def _singular_chunk(self, start: int) -> list[Booking]:
        """Facts ``start`` on (a chunk), each edited alone and scored with its own update."""
        chunk = self.facts[start : start + self.chunk_size]
        singular = self.editor.edit_singular(chunk)
        self.timer.add_all(singular.timing, EDIT_PHASES)
        with self.timer.phase("evaluation"):
            results = self.evaluator.score(chunk, self.generate_for, edits=singular.edits)
        stats = zip(singular.delta_norms, singular.preservation_errors, singular.value_steps)
        return [
            Booking(start + offset, [result], UpdateStats(norm, error, steps))
            for offset, (result, (norm, error, steps)) in enumerate(zip(results, stats))
        ]


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
