"""CounterFact evaluation: the structure of a fact's scores, equal to scoring each fact alone, and
fact rows that are JSON and aggregate.
"""

from __future__ import annotations

import json

import pytest
from conftest import max_difference

from editexp.evaluation.counterfact_eval import (
    FactScores,
    evaluate_facts,
    fact_prompts,
)
from editexp.evaluation.metrics import FAMILIES, aggregate
from editexp.evaluation.scoring import (
    score_continuations,
)


@pytest.fixture(scope="session")
def evaluated(tiny_llama3, counterfact_facts):
    lm = tiny_llama3
    return evaluate_facts(
        lm.model,
        lm.tokenizer,
        counterfact_facts,
        batch_size=16,
        generation_facts=1,
        generation_length=30,
        progress=False,
    )


def test_evaluation_structure(evaluated, counterfact_facts):
    assert [result.case_id for result in evaluated] == [f.case_id for f in counterfact_facts]
    for result, fact in zip(evaluated, counterfact_facts):
        assert set(result.scores) == set(FAMILIES)
        assert len(result.scores["rewrite"]) == 1
        assert len(result.scores["paraphrase"]) == len(fact.paraphrase_prompts)
        assert len(result.scores["neighborhood"]) == len(fact.neighborhood_prompts)
        assert all(len(pair) == 2 for pairs in result.scores.values() for pair in pairs)
    first, *rest = evaluated
    assert len(first.generation_texts) == len(counterfact_facts[0].generation_prompts)
    assert isinstance(first.GE, float) and first.GE > 0
    assert all(result.generation_texts is None and result.GE is None for result in rest)


def test_evaluation_equals_scoring_each_fact_alone(tiny_llama3, evaluated, counterfact_facts):
    lm = tiny_llama3
    for result, fact in zip(evaluated, counterfact_facts):
        for family, prompts in fact_prompts(fact).items():
            pair_targets = [[fact.target_new, fact.target_true]] * len(prompts)
            alone = score_continuations(lm.model, lm.tokenizer, prompts, pair_targets)
            together = [list(pair) for pair in result.scores[family]]
            assert max_difference(together, alone) < 1e-5


def test_fact_rows_are_json_and_metrics_aggregate(evaluated):
    rows = [json.loads(json.dumps(result.to_json())) for result in evaluated]
    for row, result in zip(rows, evaluated):
        assert row["case_id"] == result.case_id
        assert {"ES", "PS", "NS", "ES_magnitude", "PS_magnitude", "NS_magnitude"} <= set(row)
        assert row["scores"]["rewrite"] == [list(result.scores["rewrite"][0])]
        assert ("GE" in row) == (result.GE is not None)
    summary = aggregate([result.metrics() for result in evaluated])
    assert [FactScores.from_json(row) for row in rows] == evaluated
    assert summary["ES"]["n"] == len(evaluated) and summary["GE"]["n"] == 1
    assert "S" in summary
