"""Seeded top-k sampling of continuations: the context prefixes of keys and values
(:mod:`editexp.editing.prefixes`) and the CounterFact fluency metric (GE) both sample with it.


Each prompt is sampled until its sequence (prompt ids included, BOS too when the tokenizer adds
one) is ``length`` tokens long, as the reference does: end-of-sequence tokens do not stop the
sampling (the reference loop has no stop condition) and special tokens are dropped from the
decoded text. Only the continuation is returned, decoded from its own ids.

Every prompt has its own seed (:func:`generation_seed` of the run seed, the fact's case id and
the prompt's index), which fixes all its random numbers in advance: draw j of a prompt is
``u_j``, the j-th number of ``torch.Generator().manual_seed(seed).rand``. Token j is then the
inverse-CDF pick of ``u_j`` among the ``top_k`` most likely tokens, renormalised (the same
distribution as top-k sampling with temperature 1). So a prompt gives the same text alone, in
any batch, with any batch size, and no global RNG state is read or changed.

The sampling loop is written out (no ``model.generate``): the prompts of a batch are left-padded
so that they end at the same column, run once with a KV cache, then one token per step with
positions continuing each prompt's own, on a KV cache allocated once; logits are computed only
for the last position. Singular edits: ``edits`` with ``prompt_edits``
(see :class:`~editexp.row_edits.RowEdits`) give each prompt its own fact's update, so many
singularly edited facts generate in one batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from editexp.progress import terminal_bar
from editexp.row_edits import PromptEdits, RowEdits
from editexp.tokens import encode_prompt, pad_sequences

# Part of every cache key of sampled text (pre-edit GE, context prefixes): bump it when the
# sampler's draws change.
SAMPLER_VERSION = "per-prompt-inverse-cdf-1"


def generation_seed(seed: int, case_id: int, index: int) -> int:
    """The seed of prompt ``index`` of fact ``case_id`` in a run seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{case_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_continuation_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    length: int = 100,
    top_k: int = 5,
    seed: int | Sequence[int] = 0,
    batch_size: int = 32,
    edits: PromptEdits | None = None,
) -> list[list[int]]:
    """The sampled continuation ids of each prompt: ``length - len(prompt ids)`` of them;
    with ``edits``, prompt i runs with edit ``edits.rows[i]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of prompts")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}; expected a positive number of tokens")
    if isinstance(seed, int):
        seeds = [generation_seed(seed, -1, i) for i in range(len(prompts))]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if edits is not None and len(edits.rows) != len(prompts):
        raise ValueError(f"{len(edits.rows)} prompt edits for {len(prompts)} prompts")

    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    wanted = [max(length - len(ids), 0) for ids in prompt_ids]
    order = sorted(
        (i for i in range(len(prompts)) if wanted[i] > 0), key=lambda i: len(prompt_ids[i])
    )
    continuations: list[list[int]] = [[] for _ in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hook = edits.edits.installed() if edits is not None else nullcontext()
    bar = terminal_bar(len(order), "sampling", "prompt")  # GE, context prefixes
    with torch.inference_mode(), hook, bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            draws = [
                torch.rand(wanted[i], generator=torch.Generator().manual_seed(seeds[i]))
                for i in batch
            ]
            rows = [edits.rows[i] for i in batch] if edits is not None else None
            sampled = _sample_batch(
                model,
                pad_id,
                [prompt_ids[i] for i in batch],
                draws,
                top_k,
                edits.edits if edits is not None else None,
                rows,
            )
            for i, ids in zip(batch, sampled):
                continuations[i] = ids
            bar.update(len(batch))
    return continuations


def top_k_pick(logits: torch.Tensor, draws: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token ids (B,) from logits (B, vocab) and uniform draws (B,) in [0, 1): the inverse CDF
    of the softmax over the ``top_k`` largest logits, in descending order."""
    values, indices = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)
    cumulative = torch.softmax(values, dim=-1).cumsum(dim=-1)  # (B, k)
    threshold = draws.to(cumulative.device).unsqueeze(1) * cumulative[:, -1:]
    picked = (cumulative <= threshold).sum(dim=1).clamp(max=values.shape[1] - 1)
    return indices.gather(1, picked.unsqueeze(1)).squeeze(1)


def _sample_batch(
    model: PreTrainedModel,
    pad_id: int,
    prompt_ids: list[list[int]],
    draws: list[torch.Tensor],
    top_k: int,
    edits: RowEdits | None,
    edit_rows: list[int] | None,
) -> list[list[int]]:
    """``len(draws[b])`` new token ids for each prompt b of one batch.

    The KV cache is allocated once for the whole sequence (a growing cache would copy itself
    at every step); every row runs until the batch's longest continuation is done (prompts
    are batched by length, so rows want about as many tokens).
    """
    device = model.device
    base, head = model.base_model, lm_head(model)
    counts = [len(row_draws) for row_draws in draws]
    steps = max(counts)
    draw_table = torch.zeros(len(draws), steps)
    for row, row_draws in enumerate(draws):
        draw_table[row, : len(row_draws)] = row_draws
    batch = pad_sequences(prompt_ids, pad_id, left_lengths=[len(ids) for ids in prompt_ids])
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    position_ids = batch.position_ids.to(device)
    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + steps)
    tokens = torch.zeros(len(prompt_ids), steps, dtype=torch.long)
    if edits is not None:
        edits.select(edit_rows)
    for step in range(steps):
        hidden = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        picked = top_k_pick(_logits(model, head, hidden), draw_table[:, step], top_k)
        tokens[:, step] = picked.cpu()
        input_ids = picked.unsqueeze(1)
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(counts), 1)], 1)
    return [tokens[row, :count].tolist() for row, count in enumerate(counts)]


def lm_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head; inside autocast, with its matrix cast once (autocast would cast a float32
    head at every step, the same numbers each time)."""
    head = model.get_output_embeddings()
    device_type = head.weight.device.type
    if not torch.is_autocast_enabled(device_type):
        return head
    dtype = torch.get_autocast_dtype(device_type)
    weight = head.weight.to(dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    return lambda hidden: torch.nn.functional.linear(hidden.to(dtype), weight, bias)


def _logits(
    model: PreTrainedModel, head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor
) -> torch.Tensor:
    """Next-token logits from final hidden states (B, d), as the causal-LM head computes them."""
    logits = head(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
