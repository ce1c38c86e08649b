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

Two shortcuts serve post-edit scoring (each optional, each tested against the plain path):

- ``edits`` (:class:`~editexp.row_edits.PromptEdits`): every prompt's
  rows carry their own fact's rank-one update at the edited layer, so the prompts of many
  singular edits are scored in one batched pass without writing weights;
- ``start_states`` (:class:`LayerStates`): the passes start at layer L's input from hidden
  states recorded on the unedited model (``record_states`` during a full pass, or
  :func:`record_layer_states`, which runs only the layers below L), skipping layers 0..L-1.
  Valid while no layer below L has been edited.

:func:`score_continuation_unbatched` is the plain computation (one full forward per pair,
logits everywhere) that tests and benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from editexp.layer_skip import StopForward, capture_layer_input, forward_from_layer
from editexp.precision import exact
from editexp.progress import on_terminal
from editexp.row_edits import PromptEdits, RowEdits
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


@dataclass
class LayerStates:
    """Hidden states entering ``layers[layer]`` for scored text, keyed by token ids.

    ``prompts[prompt ids]`` is (prompt length, d); ``continuations[(prompt ids, fed ids)]`` is
    (len(fed ids), d) for the target tokens fed after a prompt (all but a target's last).
    Recorded on the unedited model; valid for any model that differs from it only at layers
    >= ``layer``.
    """

    layers: nn.ModuleList
    layer: int
    device: torch.device | str = "cpu"  # where the states are kept
    max_bytes: int | None = None  # recording stops adding states beyond this size
    stored_bytes: int = 0
    prompts: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    continuations: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = field(
        default_factory=dict
    )

    @classmethod
    def for_model(
        cls,
        loaded,
        layer: int,
        device: torch.device | str | None = None,
        max_bytes: int | None = None,
    ):
        """Empty states for ``loaded`` (a LoadedModel), kept on ``device`` (default: the
        model's device), at most ``max_bytes`` of them (None: no limit)."""
        layers = loaded.model.get_submodule(loaded.spec.layers_module)
        return cls(layers, layer, loaded.device if device is None else device, max_bytes)

    def store(self, table: dict, key, states: torch.Tensor) -> None:
        """Keep ``states`` under ``key`` in ``table`` (``prompts`` or ``continuations``),
        unless it is there already or the size limit is reached."""
        size = states.numel() * states.element_size()
        if key in table or (
            self.max_bytes is not None and self.stored_bytes + size > self.max_bytes
        ):
            return
        table[key] = states.to(self.device).clone()
        self.stored_bytes += size

    def covers(self, encoded: Sequence[EncodedPrompt]) -> bool:
        """Whether every sequence of ``encoded`` has stored states."""
        for item in encoded:
            key = tuple(item.prompt_ids)
            if item.target_ids and key not in self.prompts:
                return False
            for ids in item.target_ids:
                if len(ids) > 1 and (key, tuple(ids[:-1])) not in self.continuations:
                    return False
        return True


@dataclass
class _Shortcuts:
    """What the passes of one scoring call do besides the plain forward."""

    edits: RowEdits | None = None  # per-row rank-one updates (rows selected per pass)
    start: LayerStates | None = None  # start at start.layer from stored states
    record: LayerStates | None = None  # record the states entering record.layer
    stop: bool = False  # with record: stop at the layer (no scores)


@dataclass(frozen=True)
class ScoringShortcuts:
    """The shortcuts of the module docstring for one scoring call: every prompt's row edit,
    and layer states to start from or to record during the pass (not both)."""

    edits: PromptEdits | None = None
    start_states: LayerStates | None = None
    record_states: LayerStates | None = None

    def __post_init__(self) -> None:
        start, edits = self.start_states, self.edits
        if start is not None and self.record_states is not None:
            raise ValueError("start_states and record_states exclude each other")
        if start is not None and edits is not None and edits.edits.layer < start.layer:
            raise ValueError(
                f"states entering layer {start.layer} skip the edit at layer {edits.edits.layer}"
            )


def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[Sequence[str]],
    batch_size: int = 64,
    progress: bool = False,
    shortcuts: ScoringShortcuts | None = None,
) -> list[list[float]]:
    """Mean NLL of each target of each prompt, ``result[i][j]`` for ``targets[i][j]``.

    ``batch_size`` counts prompts (each with all its targets); see :func:`length_batches` for
    how prompts are grouped. Results come back in the input order. ``shortcuts``: row edits
    (prompt i with edit ``rows[i]``, -1 for none) and stored layer states, as in the module
    docstring.
    """
    shortcuts = shortcuts or ScoringShortcuts()
    edits = shortcuts.edits
    if edits is not None and len(edits.rows) != len(prompts):
        raise ValueError(f"{len(edits.rows)} prompt edits for {len(prompts)} prompts")
    passes = _Shortcuts(
        edits=None if edits is None else edits.edits,
        start=shortcuts.start_states,
        record=shortcuts.record_states,
    )
    rows = None if edits is None else edits.rows
    return _score_all(model, tokenizer, prompts, targets, batch_size, progress, passes, rows)


def record_layer_states(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[Sequence[str]],
    states: LayerStates,
    batch_size: int = 64,
) -> None:
    """Fill ``states`` for these prompts and targets with passes that run only the layers
    below ``states.layer`` (no scores)."""
    shortcuts = _Shortcuts(record=states, stop=True)
    _score_all(model, tokenizer, prompts, targets, batch_size, False, shortcuts, None)


def _score_all(model, tokenizer, prompts, targets, batch_size, progress, shortcuts, prompt_edits):
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of prompts")
    encoded = encode_continuations(tokenizer, prompts, targets)
    batches = length_batches([len(item.prompt_ids) for item in encoded], batch_size)
    scores: list[list[float]] = [[] for _ in encoded]
    pad_id = _pad_id(tokenizer)
    hook = shortcuts.edits.installed() if shortcuts.edits is not None else nullcontext()
    with torch.inference_mode(), hook:
        bar = tqdm(batches, desc="scoring", unit="batch", disable=not progress or not on_terminal())
        for batch in bar:
            kept = [i for i in batch if encoded[i].target_ids]
            edit_rows = [prompt_edits[i] for i in kept] if prompt_edits is not None else None
            batch_scores = _score_batch(
                model, pad_id, [encoded[i] for i in kept], edit_rows, shortcuts
            )
            if batch_scores is not None:
                for i, item_scores in zip(kept, batch_scores):
                    scores[i] = item_scores
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


@dataclass
class _Pass:
    """One forward pass over right-padded sequences (B, T), and how its states are keyed."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, cached length + T)
    position_ids: torch.Tensor  # (B, T)
    rows: list[int] | None  # each sequence's row edit (shortcuts.edits), None: no edits
    keys: list  # each sequence's key in the stored / recorded states
    lengths: list[int]  # each sequence's unpadded length
    stored: dict | None = None  # states to start from (a table of shortcuts.start)
    recorded: dict | None = None  # where to record states (a table of shortcuts.record)


@dataclass
class _PromptBatch:
    """A batch's prompts after their pass: what the target tokens' scoring needs."""

    attention_mask: torch.Tensor  # (B, T) of the padded prompts
    keys: list[tuple[int, ...]]  # prompt ids, per prompt
    lengths: torch.Tensor  # (B,) unpadded prompt lengths
    edit_rows: list[int] | None  # each prompt's row edit
    row_prompt: torch.Tensor  # (R,) the prompt of each (prompt, target) row
    row_targets: list[list[int]]  # (R) target ids of each row
    cache: DynamicCache  # the prompts' keys and values


def _tables(shortcuts: _Shortcuts, table: str) -> dict[str, dict | None]:
    """The ``stored`` / ``recorded`` states tables (``prompts`` or ``continuations``)."""
    return {
        "stored": None if shortcuts.start is None else getattr(shortcuts.start, table),
        "recorded": None if shortcuts.record is None else getattr(shortcuts.record, table),
    }


def _score_batch(
    model: PreTrainedModel,
    pad_id: int,
    items: list[EncodedPrompt],
    edit_rows: list[int] | None,
    shortcuts: _Shortcuts,
) -> list[list[float]] | None:
    """Scores of one batch of prompts (see the module docstring for the three steps); None
    when the passes only record states."""
    if not items:
        return []
    device = model.device
    prompts = pad_sequences([item.prompt_ids for item in items], pad_id).to(device)
    lengths = prompts.attention_mask.sum(dim=1)
    batch = _PromptBatch(
        attention_mask=prompts.attention_mask,
        keys=[tuple(item.prompt_ids) for item in items],
        lengths=lengths,
        edit_rows=edit_rows,
        row_prompt=torch.tensor(
            [i for i, item in enumerate(items) for _ in item.target_ids], device=device
        ),
        row_targets=[ids for item in items for ids in item.target_ids],
        cache=DynamicCache(config=model.config),
    )
    prompt_pass = _Pass(
        prompts.input_ids,
        prompts.attention_mask,
        prompts.position_ids,
        edit_rows,
        batch.keys,
        lengths.tolist(),
        **_tables(shortcuts, "prompts"),
    )
    prompt_hidden = _forward(model, shortcuts, prompt_pass, batch.cache)
    if prompt_hidden is not None:
        last_hidden = prompt_hidden[torch.arange(len(items), device=device), lengths - 1]
        # Token 0 of every target is predicted by its prompt's last hidden state: unembedded
        # once per prompt, however many targets share it. One row per (prompt, target) now.
        first_log_probs = _log_softmax_logits(model, last_hidden)  # (B, vocab)
        first_ids = torch.tensor([ids[0] for ids in batch.row_targets], device=device)
        nll_sums = -first_log_probs[batch.row_prompt, first_ids]  # (R,)
    later = _later_tokens_nll(model, shortcuts, pad_id, batch)
    if prompt_hidden is None:
        return None
    if later is not None:
        row_of_token, nll = later
        nll_sums = nll_sums.index_add(0, row_of_token, nll)
    target_lengths = torch.tensor([len(ids) for ids in batch.row_targets], device=device)
    means = (nll_sums / target_lengths).tolist()
    out, start = [], 0
    for item in items:
        out.append(means[start : start + len(item.target_ids)])
        start += len(item.target_ids)
    return out


def _later_tokens_nll(
    model: PreTrainedModel, shortcuts: _Shortcuts, pad_id: int, batch: _PromptBatch
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """-log p of every target token after the first, with the row it belongs to: rows with
    more than one target token feed all but their last token on the prompts' cache; the others
    (most CounterFact targets are one token) are done and skip this pass. None when no row has
    more tokens, or the pass only recorded states."""
    device = model.device
    multi_token = [row for row, ids in enumerate(batch.row_targets) if len(ids) > 1]
    if not multi_token:
        return None
    fed_rows = torch.tensor(multi_token, device=device)
    fed_prompt = batch.row_prompt[fed_rows]
    batch.cache.batch_select_indices(fed_prompt)
    fed_ids = [batch.row_targets[row][:-1] for row in multi_token]
    fed = pad_sequences(fed_ids, pad_id).to(device)
    fed_prompt_list = fed_prompt.tolist()
    fed_pass = _Pass(
        fed.input_ids,
        torch.cat([batch.attention_mask[fed_prompt], fed.attention_mask], 1),
        fed.position_ids + batch.lengths[fed_prompt].unsqueeze(1),
        None if batch.edit_rows is None else [batch.edit_rows[i] for i in fed_prompt_list],
        [(batch.keys[i], tuple(ids)) for i, ids in zip(fed_prompt_list, fed_ids)],
        [len(ids) for ids in fed_ids],
        **_tables(shortcuts, "continuations"),
    )
    fed_hidden = _forward(model, shortcuts, fed_pass, batch.cache)
    if fed_hidden is None:
        return None
    predicted = pad_sequences([batch.row_targets[row][1:] for row in multi_token], pad_id)
    is_fed = fed.attention_mask.bool()  # where a token was fed, its successor is scored
    log_probs = _log_softmax_logits(model, fed_hidden[is_fed])
    labels = predicted.input_ids.to(device)[is_fed]
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    return fed_rows.repeat_interleave(is_fed.sum(dim=1)), nll


def _forward(
    model: PreTrainedModel, shortcuts: _Shortcuts, step: _Pass, cache: DynamicCache
) -> torch.Tensor | None:
    """One pass of the base model over right-padded sequences (B, T): the final hidden
    states, or None when it stopped after recording the states entering a layer."""
    base = model.base_model
    if shortcuts.edits is not None:
        shortcuts.edits.select(step.rows)
    if shortcuts.start is not None:
        width = step.input_ids.shape[1]
        hidden = _padded_states(step.stored, step.keys, step.lengths, width, model.device)
        out = forward_from_layer(
            base,
            shortcuts.start.layers,
            shortcuts.start.layer,
            hidden,
            step.input_ids,
            step.attention_mask,
            step.position_ids,
            cache,
        )
        return out.last_hidden_state
    inputs = dict(
        input_ids=step.input_ids,
        attention_mask=step.attention_mask,
        position_ids=step.position_ids,
        cache=cache,
        use_cache=True,
    )
    if shortcuts.record is None:
        return base(**inputs).last_hidden_state
    record = shortcuts.record
    with capture_layer_input(record.layers, record.layer, stop=shortcuts.stop) as captured:
        try:
            last_hidden = base(**inputs).last_hidden_state
        except StopForward:
            last_hidden = None
    for row, (key, length) in enumerate(zip(step.keys, step.lengths)):
        record.store(step.recorded, key, captured[0][row, :length])
    return last_hidden


def _padded_states(
    stored: dict, keys: list, lengths: list[int], width: int, device: torch.device
) -> torch.Tensor:
    """Stored states of each row, right-padded with zeros to (B, width, d)."""
    try:
        rows = [stored[key] for key in keys]
    except KeyError:
        raise KeyError(
            "no stored layer states for a scored sequence: record them first "
            "(record_layer_states, or record_states= on a full pass over the same prompts)"
        ) from None
    hidden = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
    for row, (states, length) in enumerate(zip(rows, lengths)):
        hidden[row, :length] = states
    return hidden


def _log_softmax_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from final hidden states (already normalised by the base model), with
    the head in the weights' dtype even inside autocast: a bfloat16 logit's rounding (0.016 to
    0.125 nats) would decide near-ties."""
    head = model.get_output_embeddings()
    with exact(hidden.device):
        logits = head(hidden.to(head.weight.dtype))
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
