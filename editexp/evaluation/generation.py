"""Seeded top-k sampling of continuations, as the CounterFact fluency metric (GE) needs.

Each prompt is sampled until its sequence (prompt ids included, BOS too when the tokenizer adds
one) is ``length`` tokens long, as the reference does: end-of-sequence tokens do not stop the
sampling (the reference loop has no stop condition) and special tokens are dropped from the
decoded text. Prompts are batched with left padding; ``model.generate`` derives the position
ids from the attention mask. Only the continuation is returned, decoded from its own ids.

Sampling uses the global torch RNG inside :func:`torch.random.fork_rng`, seeded with ``seed``,
so the caller's RNG state is untouched and the same seed, prompts and ``batch_size`` give the
same texts (a different batching draws the random numbers in a different order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from editexp.tokens import encode_prompt, pad_sequences


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """The sampled continuation of each prompt as text (prompt not included)."""
    continuations = sample_continuation_ids(
        model, tokenizer, prompts, length, top_k, seed, batch_size
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations]


def sample_continuation_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """The sampled continuation ids of each prompt: ``length - len(prompt ids)`` of them."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of prompts")
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    continuations: list[list[int]] = [[] for _ in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sampled = _sample_batch(model, pad_id, [prompt_ids[i] for i in batch], length, top_k)
            for i, ids in zip(batch, sampled):
                continuations[i] = ids
    return continuations


def _sample_batch(
    model: PreTrainedModel,
    pad_id: int,
    prompt_ids: list[list[int]],
    length: int,
    top_k: int,
) -> list[list[int]]:
    """New token ids per prompt, ``length - len(prompt)`` of them (none for a long prompt)."""
    wanted = [max(length - len(ids), 0) for ids in prompt_ids]
    if max(wanted) == 0:
        return [[] for _ in prompt_ids]
    batch = pad_sequences(prompt_ids, pad_id, left_lengths=[len(ids) for ids in prompt_ids])
    config = GenerationConfig(
        do_sample=True,
        top_k=top_k,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=max(wanted),
        pad_token_id=pad_id,
    )
    with _sampling_defaults(model, config):
        output = model.generate(
            input_ids=batch.input_ids.to(model.device),
            attention_mask=batch.attention_mask.to(model.device),
            generation_config=config,
        )
    new_tokens = output[:, batch.input_ids.shape[1] :].tolist()
    return [row[:count] for row, count in zip(new_tokens, wanted)]


@contextmanager
def _sampling_defaults(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the model's generation defaults for one call.

    ``generate`` fills every unset field from ``model.generation_config``; that would bring
    back the model's ``eos_token_id`` (stopping at end-of-sequence) and any sampling settings
    of the checkpoint (temperature, repetition penalty, ...).
    """
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def _cuda_devices(model: PreTrainedModel) -> list[int]:
    device = model.device
    return [device.index or 0] if device.type == "cuda" else []
