"""Generated text for GE: seeded without touching the global RNG, the length counts the prompt,
greedy equals the plain loop, and the model's generation config is left as it was.
"""

from __future__ import annotations

import torch
from conftest import PROMPTS

from editexp.evaluation.generation import generate_texts
from editexp.models import LoadedModel
from editexp.sampling import sample_continuation_ids
from editexp.tokens import encode_prompt


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
