"""Batched scoring against the plain computation.

The batched path (shared-prompt KV cache, right padding, logits only at target positions) must
equal one full forward per (prompt, target) on a Llama-3-style model (BOS, rotary positions) and
a GPT-2-style model (no BOS, absolute positions). In float64 the two agree to ~1e-10, so the
float32 differences are rounding only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPTS, TARGETS, cached_model, max_difference

from editexp.evaluation.scoring import (
    encode_continuations,
    length_batches,
    score_continuation_unbatched,
    score_continuations,
)
from editexp.models import LoadedModel

LLAMA3_BOS = 128000
TINY_MODELS = ["tiny-llama3", "tiny-gpt2"]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    return {name: cached_model(name) for name in TINY_MODELS}


def plain_scores(lm: LoadedModel, prompts=PROMPTS, targets=TARGETS) -> list[list[float]]:
    return [
        [score_continuation_unbatched(lm.model, lm.tokenizer, prompt, target) for target in ts]
        for prompt, ts in zip(prompts, targets)
    ]


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
