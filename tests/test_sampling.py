"""The seeded top-k sampler: the pick is the inverse CDF of the top-k softmax, and a prompt samples
the same text alone, in any batch and at any ``eval.generation_batch_size``.
"""

from __future__ import annotations

import torch
from conftest import PROMPTS, compose_config

from editexp.sampling import generation_seed, sample_continuation_ids, top_k_pick


def test_top_k_pick_is_the_inverse_cdf_of_the_top_k_softmax():
    probabilities = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])  # top 3: 1 (.5), 3 (.3), 2 (.1)
    logits = probabilities.log().expand(6, -1)
    draws = torch.tensor([0.0, 0.55, 0.56, 0.8, 0.9, 0.999])  # x (0.9 total): cut at .5, .8
    picked = top_k_pick(logits, draws, top_k=3)
    assert picked.tolist() == [1, 1, 3, 3, 2, 2]
    assert top_k_pick(logits, torch.rand(6), top_k=1).tolist() == [1] * 6


def test_a_prompt_samples_the_same_alone_or_in_any_batch(tiny):
    seeds = [generation_seed(3, 100 + i, i) for i in range(len(PROMPTS))]
    together = sample_continuation_ids(tiny.model, tiny.tokenizer, PROMPTS, 30, 5, seeds, 64)
    in_pairs = sample_continuation_ids(tiny.model, tiny.tokenizer, PROMPTS, 30, 5, seeds, 2)
    reversed_order = sample_continuation_ids(
        tiny.model, tiny.tokenizer, PROMPTS[::-1], 30, 5, seeds[::-1], 3
    )
    alone = [
        sample_continuation_ids(tiny.model, tiny.tokenizer, [p], 30, 5, [s])[0]
        for p, s in zip(PROMPTS, seeds)
    ]
    assert together == in_pairs == reversed_order[::-1] == alone
    other = sample_continuation_ids(
        tiny.model, tiny.tokenizer, PROMPTS, 30, 5, [s + 1 for s in seeds], 64
    )
    assert other != together
    assert generation_seed(0, 1, 2) != generation_seed(0, 2, 1) != generation_seed(1, 1, 2)


def test_generation_batch_size_from_the_config_changes_no_text(
    tiny, counterfact_facts, monkeypatch
):
    """``eval.generation_batch_size`` reaches the sampler and changes only the speed."""
    import editexp.evaluation.counterfact_eval as counterfact_eval
    from editexp.evaluation.evaluator import Evaluator

    sampler_batch_sizes = []

    def spy(*args, batch_size, **kwargs):
        sampler_batch_sizes.append(batch_size)
        return generate_texts(*args, batch_size=batch_size, **kwargs)

    generate_texts = counterfact_eval.generate_texts
    monkeypatch.setattr(counterfact_eval, "generate_texts", spy)
    chosen = counterfact_facts[:3]
    results = {}
    for size in (1, 4, 256):
        cfg = compose_config("eval.generation_length=16", f"eval.generation_batch_size={size}")
        scored = Evaluator.from_config(tiny, cfg).score(
            chosen, generate_for={fact.case_id for fact in chosen}
        )
        results[size] = [(fact.generation_texts, fact.GE) for fact in scored]
    assert sampler_batch_sizes == [1, 4, 256]
    assert all(texts for texts, _ in results[1])
    assert results[1] == results[4] == results[256]
