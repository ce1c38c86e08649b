"""Seeded sampled continuations as text, for the CounterFact fluency metric (GE); the sampler
itself is :mod:`editexp.sampling`."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editexp.row_edits import PromptEdits
from editexp.sampling import sample_continuation_ids


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    length: int = 100,
    top_k: int = 5,
    seed: int | Sequence[int] = 0,
    batch_size: int = 32,
    edits: PromptEdits | None = None,
) -> list[str]:
    """The sampled continuation of each prompt as text (prompt not included).

    ``seed``: one seed per prompt, or an int ``s`` that gives prompt i the seed
    ``generation_seed(s, -1, i)``.
    """
    continuations = sample_continuation_ids(
        model, tokenizer, prompts, length, top_k, seed, batch_size, edits
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations]
