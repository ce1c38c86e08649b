"""Batched scoring, generation and CounterFact evaluation against the plain computations.

Scores: the batched path (shared-prompt KV cache, right padding, logits only at target
positions) must equal one full forward per (prompt, target) on a Llama-3-style model (BOS,
rotary positions) and a GPT-2-style model (no BOS, absolute positions). In float64 the two
agree to ~1e-10, so the float32 differences are rounding only.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import cached_model, compose_config, counterfact_dir

from editexp.data.counterfact import load_counterfact, select_facts
from editexp.evaluation.counterfact_eval import (
    FactScores,
    evaluate_facts,
    fact_prompts,
)
from editexp.evaluation.generation import generate_texts
from editexp.evaluation.metrics import FAMILIES, aggregate
from editexp.evaluation.scoring import (
    encode_continuations,
    length_batches,
    score_continuation_unbatched,
    score_continuations,
)
from editexp.models import LoadedModel
from editexp.sampling import sample_continuation_ids
from editexp.tokens import encode_prompt

LLAMA3_BOS = 128000
TINY_MODELS = ["tiny-llama3", "tiny-gpt2"]

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Autonomous University of Madrid, which is located in",
    "and Sallie Beavers Riley. Autonomous University of Madrid is located in",
    "Danielle Darrieux's mother tongue is",
]
TARGETS = [
    ["Paris", "Berlin"],
    ["there", "Xylophone orchestra of the north"],
    ["Sweden", "Spain"],
    ["the Kingdom of Sweden", "Spain"],
    ["English", "French", "Old Church Slavonic"],  # three targets: any number is allowed
]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    return {name: cached_model(name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def counterfact_facts():
    facts, _ = load_counterfact(compose_config(f"data.dir={counterfact_dir()}").data)
    return select_facts(facts, 3, order="seeded", seed=0)


def plain_scores(lm: LoadedModel, prompts=PROMPTS, targets=TARGETS) -> list[list[float]]:
    return [
        [score_continuation_unbatched(lm.model, lm.tokenizer, prompt, target) for target in ts]
        for prompt, ts in zip(prompts, targets)
    ]


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


# --- scoring ------------------------------------------------------------------------------


def test_test_inputs_cover_padding_and_multi_token_targets(tiny):
    encoded = encode_continuations(tiny.tokenizer, PROMPTS, TARGETS)
    assert len({len(item.prompt_ids) for item in encoded}) == len(PROMPTS)
    target_lengths = {len(ids) for item in encoded for ids in item.target_ids}
    assert 1 in target_lengths and max(target_lengths) >= 4


def test_batched_scores_equal_plain_scores(tiny):
    batched = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, batch_size=3)
    assert max_difference(batched, plain_scores(tiny)) < 1e-5


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_batch_size_does_not_change_scores(tiny, batch_size):
    reference = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, batch_size=64)
    scores = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, batch_size)
    assert max_difference(scores, reference) < 1e-5


def test_float64_agreement_is_rounding_only(tiny):
    model = copy.deepcopy(tiny.model).double()
    lm = LoadedModel(model, tiny.tokenizer, tiny.spec, tiny.identity, tiny.config)
    batched = score_continuations(model, tiny.tokenizer, PROMPTS, TARGETS, batch_size=3)
    assert max_difference(batched, plain_scores(lm)) < 1e-10


def test_wrong_positions_would_be_caught(tiny_models):
    """Negative control: GPT-2 scores shifted by 3 positions differ far beyond the tolerance."""
    lm = tiny_models["tiny-gpt2"]
    prompt, target = PROMPTS[2], TARGETS[2][0]
    item = encode_continuations(lm.tokenizer, [prompt], [[target]])[0]
    ids = torch.tensor([item.prompt_ids + item.target_ids[0]])
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] + 3).logits
    log_probs = torch.log_softmax(logits[0], -1)
    start = len(item.prompt_ids)
    shifted = -float(
        torch.stack([log_probs[start - 1 + j, t] for j, t in enumerate(item.target_ids[0])]).mean()
    )
    correct = score_continuations(lm.model, lm.tokenizer, [prompt], [[target]])[0][0]
    assert abs(shifted - correct) > 1e-3


def test_bos_once_at_start_for_llama3_and_absent_for_gpt2(tiny_models):
    for name, lm in tiny_models.items():
        for item in encode_continuations(lm.tokenizer, PROMPTS, TARGETS):
            for target_ids in item.target_ids:
                sequence = item.prompt_ids + target_ids
                if name == "tiny-llama3":
                    assert sequence[0] == LLAMA3_BOS
                    assert sequence.count(LLAMA3_BOS) == 1
                else:
                    assert LLAMA3_BOS not in sequence
                    assert lm.tokenizer.bos_token_id not in sequence


def test_leading_space_in_target_does_not_matter(tiny):
    prompts = PROMPTS[:3]
    bare = score_continuations(tiny.model, tiny.tokenizer, prompts, [["Paris", "Spain"]] * 3)
    spaced = score_continuations(tiny.model, tiny.tokenizer, prompts, [[" Paris", " Spain"]] * 3)
    assert bare == spaced


def test_length_batches_partition_prompts_shortest_first():
    lengths = [30, 5, 6, 5, 41, 7, 29, 6, 5] * 40
    batches = length_batches(lengths, batch_size=64)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= 64 for batch in batches)
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    fixed = [sorted(lengths)[start : start + 64] for start in range(0, len(lengths), 64)]
    assert padded < sum(len(batch) * max(batch) for batch in fixed)
    assert length_batches([], 8) == []


def test_prompt_without_targets_and_mismatched_lengths(tiny):
    scores = score_continuations(tiny.model, tiny.tokenizer, ["a b", "c"], [[], ["d"]])
    assert scores[0] == [] and len(scores[1]) == 1
    with pytest.raises(ValueError, match="target lists"):
        score_continuations(tiny.model, tiny.tokenizer, ["a"], [["b"], ["c"]])


# --- generation ---------------------------------------------------------------------------


def plain_greedy_continuation(lm: LoadedModel, prompt: str, length: int) -> list[int]:
    ids = encode_prompt(lm.tokenizer, prompt)
    start = len(ids)
    with torch.inference_mode():
        while len(ids) < length:
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[start:]


def test_generation_is_seeded_and_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_texts(tiny.model, tiny.tokenizer, PROMPTS, length=20, seed=7, batch_size=2)
    assert torch.equal(torch.get_rng_state(), before)
    again = generate_texts(tiny.model, tiny.tokenizer, PROMPTS, length=20, seed=7, batch_size=2)
    other = generate_texts(tiny.model, tiny.tokenizer, PROMPTS, length=20, seed=8, batch_size=2)
    assert first == again
    assert first != other


def test_generation_length_counts_the_prompt(tiny):
    length = 24
    continuations = sample_continuation_ids(tiny.model, tiny.tokenizer, PROMPTS, length)
    for prompt, ids in zip(PROMPTS, continuations):
        assert len(encode_prompt(tiny.tokenizer, prompt)) + len(ids) == length
    long_prompt = " ".join(["word"] * 40)
    assert sample_continuation_ids(tiny.model, tiny.tokenizer, [long_prompt], length) == [[]]


def test_greedy_generation_equals_plain_loop_without_the_prompt(tiny):
    """top_k=1 is greedy: left-padded batches must give the unpadded continuation exactly."""
    length = 16
    ids = sample_continuation_ids(
        tiny.model, tiny.tokenizer, PROMPTS, length, top_k=1, batch_size=len(PROMPTS)
    )
    assert ids == [plain_greedy_continuation(tiny, prompt, length) for prompt in PROMPTS]
    texts = generate_texts(tiny.model, tiny.tokenizer, PROMPTS, length, top_k=1)
    assert texts == [tiny.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def test_generation_restores_the_model_generation_config(tiny):
    saved = tiny.model.generation_config
    generate_texts(tiny.model, tiny.tokenizer, PROMPTS[:1], length=8)
    assert tiny.model.generation_config is saved


# --- CounterFact evaluation ---------------------------------------------------------------


@pytest.fixture(scope="session")
def evaluated(tiny_models, counterfact_facts):
    lm = tiny_models["tiny-llama3"]
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


def test_evaluation_equals_scoring_each_fact_alone(tiny_models, evaluated, counterfact_facts):
    lm = tiny_models["tiny-llama3"]
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
