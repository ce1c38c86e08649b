"""Teacher-forced scores of target continuations, batched across prompts.

A *score* is the mean over a target's tokens of ``-log p`` (natural log), each token predicted
from the prompt and the target tokens before it; lower means more likely. Text becomes ids only
through :mod:`editexp.tokens` (the prompt with the tokenizer's own BOS, the target with its
leading space), so every tokenizer goes through the same code.

How a batch of prompts is scored without wasted work (see :func:`score_continuations`):

1. The prompts, right-padded, run once through the base model (no LM head) with a KV cache.
   The hidden state at each prompt's last real token predicts the first token of *all* of its
   targets.
2. For each (prompt, target) with more than one target token, the prompt's cache is copied and
   the target's tokens except its last run on top of it, right-padded, with explicit positions
   (``prompt length + j``, so absolute position embeddings such as GPT-2's are those of the
   unpadded sequence) and an attention mask that hides the prompt's padding. Single-token
   targets (most of CounterFact's) skip this step.
3. Only the hidden states that predict a target token go through the unembedding and a
   log-softmax, the prompt's last one once for all of its targets.

:func:`score_continuation_unbatched` is the plain computation (one full forward per pair,
logits everywhere) that tests and benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from editexp.tokens import encode_prompt, encode_target, pad_sequences


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's ids and the ids of each of its targets as continuations of it."""

    prompt_ids: list[int]
    target_ids: list[list[int]]


def encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[Sequence[str]],
) -> list[EncodedPrompt]:
    """Ids of every prompt and of its targets (the scored sequence is prompt ids + target ids)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} target lists")
    encoded = []
    for prompt, prompt_targets in zip(prompts, targets):
        target_ids = [encode_target(tokenizer, prompt, target) for target in prompt_targets]
        for target, ids in zip(prompt_targets, target_ids):
            if not ids:
                raise ValueError(f"target {target!r} of prompt {prompt!r} encodes to no tokens")
        encoded.append(EncodedPrompt(encode_prompt(tokenizer, prompt), target_ids))
    return encoded


def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[Sequence[str]],
    batch_size: int = 64,
    progress: bool = False,
) -> list[list[float]]:
    """Mean NLL of each target of each prompt, ``result[i][j]`` for ``targets[i][j]``.

    ``batch_size`` counts prompts (each with all its targets); see :func:`length_batches` for
    how prompts are grouped. Results come back in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of prompts")
    encoded = encode_continuations(tokenizer, prompts, targets)
    batches = length_batches([len(item.prompt_ids) for item in encoded], batch_size)
    scores: list[list[float]] = [[] for _ in encoded]
    pad_id = _pad_id(tokenizer)
    with torch.inference_mode():
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            batch_items = [encoded[i] for i in batch if encoded[i].target_ids]
            batch_scores = iter(_score_batch(model, pad_id, batch_items))
            for i in batch:
                if encoded[i].target_ids:
                    scores[i] = next(batch_scores)
    return scores


# A batch is closed early (before ``batch_size`` prompts) when the next prompt is more than
# LENGTH_RATIO times longer than the batch's shortest and the batch already holds
# FULL_SPEED_TOKENS tokens: from that size on a bigger batch does not run the matrix products
# faster on CPU, while the padding of long paraphrase prompts would cost a quarter of the work.
LENGTH_RATIO = 1.2
FULL_SPEED_TOKENS = 256


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in each batch, shortest prompts first, at most ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else []
        shortest = lengths[batch[0]] if batch else 0
        if (
            not batch
            or len(batch) >= batch_size
            or (lengths[i] > LENGTH_RATIO * shortest and len(batch) * shortest >= FULL_SPEED_TOKENS)
        ):
            batches.append([i])
        else:
            batch.append(i)
    return batches


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_id = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad_id is None else pad_id


def _score_batch(
    model: PreTrainedModel, pad_id: int, items: list[EncodedPrompt]
) -> list[list[float]]:
    """Scores of one batch of prompts (see the module docstring for the three steps)."""
    if not items:
        return []
    device = model.device
    base = model.base_model
    prompts = pad_sequences([item.prompt_ids for item in items], pad_id).to(device)
    cache = DynamicCache(config=model.config)
    prompt_out = base(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=prompts.position_ids,
        cache=cache,
        use_cache=True,
    )
    prompt_lengths = prompts.attention_mask.sum(dim=1)
    last_hidden = prompt_out.last_hidden_state[
        torch.arange(len(items), device=device), prompt_lengths - 1
    ]

    # Token 0 of every target is predicted by its prompt's last hidden state: unembedded once
    # per prompt, however many targets share it. One row per (prompt, target) from here on.
    first_log_probs = _log_softmax_logits(model, last_hidden)  # (B, vocab)
    row_prompt = torch.tensor(
        [i for i, item in enumerate(items) for _ in item.target_ids], device=device
    )
    row_targets = [ids for item in items for ids in item.target_ids]
    first_ids = torch.tensor([ids[0] for ids in row_targets], device=device)
    nll_sums = -first_log_probs[row_prompt, first_ids]  # (R,)

    # Rows with more than one target token feed all but their last token on the cache; the
    # others (most CounterFact targets are one token) are done and skip this pass.
    multi_token = [row for row, ids in enumerate(row_targets) if len(ids) > 1]
    if multi_token:
        fed_rows = torch.tensor(multi_token, device=device)
        fed_prompt = row_prompt[fed_rows]
        cache.batch_select_indices(fed_prompt)
        fed = pad_sequences([row_targets[row][:-1] for row in multi_token], pad_id).to(device)
        fed_out = base(
            input_ids=fed.input_ids,
            attention_mask=torch.cat([prompts.attention_mask[fed_prompt], fed.attention_mask], 1),
            position_ids=fed.position_ids + prompt_lengths[fed_prompt].unsqueeze(1),
            cache=cache,
            use_cache=True,
        )
        predicted = pad_sequences([row_targets[row][1:] for row in multi_token], pad_id)
        is_fed = fed.attention_mask.bool()  # where a token was fed, its successor is scored
        log_probs = _log_softmax_logits(model, fed_out.last_hidden_state[is_fed])
        labels = predicted.input_ids.to(device)[is_fed]
        nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        row_of_token = fed_rows.repeat_interleave(is_fed.sum(dim=1))
        nll_sums = nll_sums.index_add(0, row_of_token, nll)
    target_lengths = torch.tensor([len(ids) for ids in row_targets], device=device)
    means = (nll_sums / target_lengths).tolist()
    out, start = [], 0
    for item in items:
        out.append(means[start : start + len(item.target_ids)])
        start += len(item.target_ids)
    return out


def _log_softmax_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from final hidden states (already normalised by the base model)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style: the causal-LM forward applies it after lm_head
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def score_continuation_unbatched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
) -> float:
    """The plain reference: one forward of prompt + target ids, logits at every position."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    target_ids = encode_target(tokenizer, prompt, target)
    ids = torch.tensor([prompt_ids + target_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    predicting = log_probs[len(prompt_ids) - 1 : len(prompt_ids) + len(target_ids) - 1]
    nll = -predicting.gather(1, torch.tensor(target_ids, device=model.device).unsqueeze(1))
    return float(nll.mean())
