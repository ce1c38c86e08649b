"""Runs of a sweep share work: values read from the value cache, singular mode at batch cost,
scoring from stored layer states, each equal to the plain computation (tiny-llama3)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config

from editexp.data.counterfact import Fact
from editexp.editing.editor import Editor
from editexp.evaluation.evaluator import Evaluator
from editexp.models import load_model
from editexp.run_inputs import choose_facts, generation_case_ids
from editexp.runner import SimulatedCrash, run

FAST = [
    "model=tiny-llama3",
    "logger=none",
    "stats.n_tokens=3000",
    "stats.seq_len=64",
    "eval.generation_length=20",
    "eval.held_out_keys=32",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.memit.v_steps=4",
    "model.hparams.rome.v_steps=4",
    "model.hparams.emmet.v_steps=4",
]


def run_dir_rows(run_dir, name):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def post_scores(run_dir) -> dict[int, dict]:
    return {row["case_id"]: row["post"]["scores"] for row in run_dir_rows(run_dir, "facts.jsonl")}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(
        abs(x - y)
        for case in a
        for family in a[case]
        for pair_a, pair_b in zip(a[case][family], b[case][family])
        for x, y in zip(pair_a, pair_b)
    )


def test_a_second_lambda_computes_no_values(tmp_path, cache_dir):
    common = [*FAST, "algorithm=memit", "mode=batch", "n_edits=3", "eval.generation_facts=0"]
    first = run(compose_config(*common, "lambda=10"), tmp_path / "a").to_json()
    second = run(compose_config(*common, "lambda=1000"), tmp_path / "b").to_json()
    assert first["values"] == {"computed": 3, "read": 0}
    assert second["values"] == {"computed": 0, "read": 3}
    # the same facts through the other algorithm, and a cache-less run, agree with them
    rome = run(
        compose_config(
            *FAST, "algorithm=rome", "mode=singular", "n_edits=3", "eval.generation_facts=0"
        ),
        tmp_path / "c",
    ).to_json()
    assert rome["values"] == {"computed": 0, "read": 3}
    fresh = run(
        compose_config(*common, "lambda=1000", "editing.cache=false"), tmp_path / "d"
    ).to_json()
    assert fresh["values"] == {"computed": 3, "read": 0}
    assert max_difference(post_scores(tmp_path / "b"), post_scores(tmp_path / "d")) < 1e-5


def test_sequential_runs_read_the_values_of_the_same_updates_only(tmp_path, cache_dir):
    """A sequential run's first batch reads the unedited model's values; a later batch reads
    values only where another run made the very same updates before it."""
    common = [*FAST, "algorithm=memit", "eval.generation_facts=0"]
    sequential = [*common, "mode=sequential", "batch_size=2"]
    run(compose_config(*common, "mode=batch", "n_edits=4"), tmp_path / "batch")
    longer = run(compose_config(*sequential, "n_edits=6"), tmp_path / "longer").to_json()
    # batch 1 on the unedited model (read); batches 2 and 3 on edited ones (computed)
    assert longer["values"] == {"computed": 4, "read": 2}
    # the first two updates of the longer run: every value read, and the same as computed
    shorter = run(compose_config(*sequential, "n_edits=4"), tmp_path / "shorter").to_json()
    assert shorter["values"] == {"computed": 0, "read": 4}
    fresh = run(compose_config(*sequential, "n_edits=4", "editing.cache=false"), tmp_path / "f")
    assert fresh.to_json()["values"] == {"computed": 4, "read": 0}
    assert max_difference(post_scores(tmp_path / "shorter"), post_scores(tmp_path / "f")) < 1e-5
    # another lambda: another first update, so batch 2 is edited into other weights
    other = run(compose_config(*sequential, "n_edits=4", "lambda=10"), tmp_path / "other")
    assert other.to_json()["values"] == {"computed": 2, "read": 2}


@pytest.mark.parametrize("algorithm", ["rome", "memit"])
def test_singular_run_equals_editing_each_fact_alone(tmp_path, cache_dir, algorithm):
    """The runner's batched singular mode against the Editor / Evaluator loop: edit one fact,
    score it, revert (float64, so that batching changes nothing beyond 1e-9)."""
    overrides = [
        *FAST,
        "precision=64-true",
        f"algorithm={algorithm}",
        "mode=singular",
        "n_edits=3",
        "eval.generation_facts=2",
        "editing.batch_size=2",  # two chunks: 2 facts, then 1
    ]
    cfg = compose_config(*overrides)
    record = run(cfg, tmp_path / "batched").to_json()
    assert record["edits_done"] == 3 and record["values"] == {"computed": 3, "read": 0}

    loaded = load_model(cfg.model, "cpu", cfg.precision)
    editor, evaluator = Editor(loaded, cfg), Evaluator.from_config(loaded, cfg)
    facts: list[Fact] = choose_facts(cfg, editor.settings)
    generate_for = generation_case_ids(facts, 2, editor.settings.batch_size)
    alone, stats = {}, []
    for fact in facts:
        update = editor.edit(fact)
        (result,) = evaluator.score([fact], generate_for)
        alone[fact.case_id] = result
        stats.append((update.delta_norm, update.preservation_error, update.value_steps))
        update.revert()
    batched_rows = {
        row["case_id"]: row["post"] for row in run_dir_rows(tmp_path / "batched", "facts.jsonl")
    }
    assert (
        max_difference(
            post_scores(tmp_path / "batched"),
            {case: result.to_json()["scores"] for case, result in alone.items()},
        )
        < 1e-5
    )
    for case, result in alone.items():
        assert batched_rows[case].get("generation_texts") == result.generation_texts
    batches = run_dir_rows(tmp_path / "batched", "batches.jsonl")
    assert [row["batch"] for row in batches] == [0, 1, 2]
    for row, (norm, error, steps) in zip(batches, stats):
        assert row["update"]["delta_norm"] == pytest.approx(norm, rel=1e-5)
        assert row["update"]["preservation_error"] == pytest.approx(error, rel=1e-5)
        assert row["update"]["value_steps"] == steps


def test_singular_run_resumes_after_a_chunk(tmp_path, cache_dir):
    overrides = [
        *FAST,
        "algorithm=rome",
        "mode=singular",
        "n_edits=3",
        "eval.generation_facts=0",
        "editing.batch_size=2",
    ]
    with pytest.raises(SimulatedCrash):
        run(compose_config(*overrides, "+debug.stop_after_updates=1"), tmp_path / "run")
    assert len(run_dir_rows(tmp_path / "run", "batches.jsonl")) == 2  # the first chunk
    resumed = run(compose_config(*overrides, "+debug.stop_after_updates=1"), tmp_path / "run")
    complete = run(compose_config(*overrides), tmp_path / "whole").to_json()
    assert resumed.edits_done == 3
    assert max_difference(post_scores(tmp_path / "run"), post_scores(tmp_path / "whole")) < 1e-5
    assert complete["values"]["read"] == 3  # the resumed run computed them


def test_evaluator_scores_from_layer_states_as_from_scratch(tmp_path, cache_dir):
    cfg = compose_config(*FAST, "algorithm=memit", "n_edits=3", "layer=2")
    loaded = load_model(cfg.model, "cpu", cfg.precision)
    editor, plain = Editor(loaded, cfg), Evaluator.from_config(loaded, cfg)
    facts = choose_facts(cfg, editor.settings)
    skipping = Evaluator.from_config(loaded, cfg)
    skipping.keep_layer_states(2, record_missing=True)
    update = editor.edit(facts)
    with_states = skipping.score(facts, generate_for={facts[1].case_id})
    assert skipping.layer_states.prompts  # the states were recorded and used
    without = plain.score(facts, generate_for={facts[1].case_id})
    for a, b in zip(with_states, without):
        for family in a.scores:
            for pair_a, pair_b in zip(a.scores[family], b.scores[family]):
                assert pair_a == pytest.approx(pair_b, abs=1e-5)
        assert a.generation_texts == b.generation_texts
    update.revert()
    assert torch.equal(loaded.edit_module(2).weight, editor._unedited[2])


def test_evaluator_gives_each_fact_its_own_edit_whatever_the_generation_order(cache_dir):
    """Facts with GE are evaluated first inside Evaluator.score: the edits must follow them."""
    cfg = compose_config(*FAST, "algorithm=rome", "mode=singular", "n_edits=3")
    loaded = load_model(cfg.model, "cpu", cfg.precision)
    editor, evaluator = Editor(loaded, cfg), Evaluator.from_config(loaded, cfg)
    facts = choose_facts(cfg, editor.settings)
    singular = editor.edit_singular(facts)
    generate_for = {facts[2].case_id}  # the last fact generates, so it is evaluated first
    together = evaluator.score(facts, generate_for, edits=singular.edits)
    for index, (fact, result) in enumerate(zip(facts, together)):
        weight = loaded.weight(singular.edits.layer)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight += singular.edits.delta(index)
        try:
            (alone,) = evaluator.score([fact], generate_for)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert result.case_id == alone.case_id == fact.case_id
        for family in alone.scores:
            for pair_a, pair_b in zip(result.scores[family], alone.scores[family]):
                assert pair_a == pytest.approx(pair_b, abs=1e-5)
        assert result.generation_texts == alone.generation_texts
