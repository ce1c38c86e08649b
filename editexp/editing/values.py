"""Values v* = h + delta*, as the paper's code (UME) optimises them (``compute_z``).

For a fact (subject s, prompt template p, new target o*) and the contexts x_0 = "" (the bare
prompt) and x_1..x_N (sampled prefixes, :mod:`editexp.editing.prefixes`):

h (UME's ``target_init``) is the layer's output (the residual stream) at the subject's last
token of the bare prompt, before any edit, and delta* minimises

      L(delta) = 1/(N+1) sum_j NLL(o* | x_j + p(s))
                 + kl_factor * KL(P_delta || P_0)   at the subject's last token of "s is a"
                 + weight_decay * ||delta|| / ||h||^2

where delta is added to the layer's output at the subject's last token of every one of those
N + 2 sequences, NLL is the mean over o*'s tokens of -log p, and KL(P_delta || P_0) =
sum_t P_delta(t) (log P_delta(t) - log P_0(t)) (torch ``kl_div(log P_0, log P_delta,
log_target=True)``). Adam with lr ``v_lr``; before each step, stop when L < ``early_stop_loss``
or after ``v_steps - 1`` steps; after each step, clamp ``||delta|| <= clamp_norm_factor * ||h||``.

The edited module's output goes straight into the residual stream (Llama, GPT-2, GPT-J), so
adding delta to the layer's output there is adding it to W k + b: the residual the solvers
need is r = v* - (W k + b) = delta*. Gemma-3 has a norm after its MLP; there delta and h live at
the edited module's own output (:func:`value_site`).

Many facts are optimised together: each has its own delta, its own loss term (the total is a
sum, so each delta's gradient is that of its own loss), its own Adam state, its own clamp and
its own early stop, so every fact ends where it would alone. Three shortcuts change no result:
positions before the subject's last token do not depend on delta, so they run once and are
kept as a KV cache (each Adam step only runs the positions from the subject's last token on);
layers below the edited one do not depend on delta either, so the tail positions run through
them once and every step starts at the edited layer from those hidden states
(:mod:`editexp.layer_skip`); and the unembedding is applied only where a loss is read.
:mod:`editexp.editing.plain_values` is UME's loop written plainly; tests hold the two together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from editexp.algorithms import ValueHparams
from editexp.editing.keys import EditRequest, check_prefixes, context_texts
from editexp.layer_skip import StopForward, capture_layer_input, forward_from_layer
from editexp.models import LoadedModel, attention_for_gradients
from editexp.progress import on_terminal
from editexp.tokens import (
    PaddedBatch,
    encode_prompt,
    encode_target,
    pad_sequences,
    subject_last_index,
)

KL_PROMPT = "{} is a"


@dataclass
class Values:
    """Optimised values for a list of requests, at one layer (rows follow the requests)."""

    deltas: torch.Tensor  # (E, d_v) delta*, float32: the residual v* - (W k* + b)
    outputs: torch.Tensor  # (E, d_v) h: the value site's output at the subject, bare prompt
    losses: torch.Tensor  # (E,) the loss at the last forward pass
    steps: torch.Tensor  # (E,) Adam steps taken

    @property
    def targets(self) -> torch.Tensor:
        return self.outputs + self.deltas

    @classmethod
    def concat(cls, parts: Sequence[Values]) -> Values:
        names = [field.name for field in fields(cls)]
        return cls(*(torch.cat([getattr(part, name) for part in parts]) for name in names))


def value_site(loaded: LoadedModel, layer: int) -> nn.Module:
    """The module whose output holds v: the layer itself (its output is the residual stream,
    UME's ``layer_module_tmp``), or the edited module when a norm follows it inside the layer
    (Gemma-3's ``post_feedforward_layernorm``), where the residual stream is not W k + b."""
    layer_module = loaded.layer_module(layer)
    if hasattr(layer_module, "post_feedforward_layernorm"):
        return loaded.edit_module(layer)
    return layer_module


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32 (for losses); float32 and float64 as they are."""
    return tensor.float() if tensor.element_size() < 4 else tensor


@dataclass
class _Row:
    """One sequence of the objective: a context with o*'s tokens, or a fact's KL prompt."""

    fact: int  # index of the request in the chunk
    ids: list[int]  # input ids: context + target[:-1], or the KL prompt up to the subject
    split: int  # subject's last token, where delta is added: ids[:split] go to the KV cache
    read_from: int  # first position (in ids) whose next-token distribution is read
    targets: list[int]  # token ids predicted at read_from, read_from + 1, ... (none for KL)
    is_kl: bool
    is_bare: bool  # the bare prompt's row: h is read here


def _value_rows(
    loaded: LoadedModel, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> list[_Row]:
    tokenizer = loaded.tokenizer
    rows: list[_Row] = []
    for fact, request in enumerate(requests):
        for context, text in enumerate(context_texts(request, prefixes)):
            prompt_ids = encode_prompt(tokenizer, text)
            target_ids = encode_target(tokenizer, text, request.target_new)
            rows.append(
                _Row(
                    fact=fact,
                    ids=prompt_ids + target_ids[:-1],
                    split=subject_last_index(tokenizer, text, request.subject),
                    read_from=len(prompt_ids) - 1,
                    targets=target_ids,
                    is_kl=False,
                    is_bare=context == 0,
                )
            )
        kl_text = KL_PROMPT.format(request.subject)
        split = subject_last_index(tokenizer, kl_text, request.subject)
        # UME reads the KL distribution at the subject's last token: later tokens never matter.
        kl_ids = encode_prompt(tokenizer, kl_text)[: split + 1]
        rows.append(_Row(fact, kl_ids, split, split, [], is_kl=True, is_bare=False))
    return rows


def compute_values(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
    batch_size: int = 64,
    progress: bool = True,
) -> Values:
    """delta* and h for every request at ``layer``, ``batch_size`` facts at a time (each
    fact's result does not depend on the others in its batch)."""
    check_prefixes(prefixes)
    parts = []
    bar = tqdm(
        total=len(requests),
        desc=f"values (layer {layer})",
        unit="fact",
        disable=not progress or not on_terminal(),
    )
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        with loaded.compute(), attention_for_gradients(loaded):  # autocast: matmuls only
            parts.append(_optimise_chunk(loaded, chunk, prefixes, layer, hparams))
        bar.update(len(chunk))
    bar.close()
    return Values.concat(parts)


@dataclass
class _TailGroup:
    """Rows whose tails (subject's last token onwards) have the same length: one forward and
    backward without padding per Adam step."""

    rows: torch.Tensor  # (G,) indices into the chunk's rows
    columns: slice  # columns of the aligned batch: head cache + this group's tail
    read_rows: torch.Tensor  # (R,) position within the group of every read
    read_cols: torch.Tensor  # (R,) tail column of every read
    read_tokens: torch.Tensor  # (R,) target token id of every read (-1 for KL reads)


def _tail_groups(rows: list[_Row], head_width: int, device: torch.device) -> list[_TailGroup]:
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_length.setdefault(len(row.ids) - row.split, []).append(index)
    groups = []
    for length, members in sorted(by_length.items()):
        read_rows, read_cols, read_tokens = [], [], []
        for position, index in enumerate(members):
            row = rows[index]
            tokens = row.targets if not row.is_kl else [-1]
            for offset, token in enumerate(tokens):
                read_rows.append(position)
                read_cols.append(row.read_from - row.split + offset)
                read_tokens.append(token)
        groups.append(
            _TailGroup(
                rows=torch.tensor(members, device=device),
                columns=slice(head_width, head_width + length),
                read_rows=torch.tensor(read_rows, device=device),
                read_cols=torch.tensor(read_cols, device=device),
                read_tokens=torch.tensor(read_tokens, device=device),
            )
        )
    return groups


@dataclass
class _Chunk:
    """What stays fixed while one chunk of facts is optimised."""

    model: nn.Module  # the causal LM (its base model runs the tails)
    n_facts: int
    n_contexts: int  # contexts per fact (the NLL is their mean)
    row_fact: torch.Tensor  # (n_rows,) fact of every row
    is_kl: torch.Tensor  # (n_rows,) bool
    is_bare: torch.Tensor  # (n_rows,) bool: one per fact, in fact order
    batch: PaddedBatch  # (n_rows, T) ids, every row's subject at column head_width
    head_cache: list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer: keys, values of
    # columns < head_width, each (n_rows, kv_heads, head_width, d_head), for the layers from
    # start_layer on (None below); empty if head_width is 0
    groups: list[_TailGroup]
    layers: nn.ModuleList  # the model's decoder layers
    start_layer: int  # the optimised passes start here: the edited layer
    tail_states: torch.Tensor  # (n_rows, T - head_width, d) hidden states entering
    # layers[start_layer] at the tail columns (right-padded), computed once


@dataclass
class _Progress:
    """What changes while one chunk of facts is optimised."""

    deltas: list[torch.Tensor]  # n_facts x (d_v,), the optimised parameters
    active: torch.Tensor  # (n_facts,) bool: facts still optimised
    row_outputs: torch.Tensor  # (n_rows, d_v) value site's output before any delta (step 0)
    kl_reference: torch.Tensor | None = None  # (n_facts, vocab) log P_0 of the KL rows
    step: int = 0  # Adam steps so far: step 0 records h and P_0

    @property
    def first_step(self) -> bool:
        return self.step == 0


class _AddDelta:
    """Forward hook on the value site, for a tail forward (column 0 is the subject's last
    token): adds each row's delta there, and on request records the output there first."""

    def __init__(self, stream_dtype: torch.dtype) -> None:
        self.stream_dtype = stream_dtype  # the residual stream's: the weights' dtype
        self.row_deltas: torch.Tensor | None = None  # (G, d_v) the delta of each row's fact
        self.recorded: torch.Tensor | None = None  # (G, d_v) the output before the delta

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # (G, L, d_v)
        if self.recorded is None:
            self.recorded = at_least_float32(hidden[:, 0].detach())
        # h + delta in delta's precision (under autocast h is a bfloat16 matmul output), then
        # into the residual stream's dtype.
        shifted = (hidden[:, :1].to(self.row_deltas.dtype) + self.row_deltas[:, None]).to(
            self.stream_dtype
        )
        hidden = torch.cat([shifted, hidden[:, 1:].to(self.stream_dtype)], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _prepare_chunk(
    loaded: LoadedModel, requests: Sequence[EditRequest], prefixes: Sequence[str], layer: int
) -> _Chunk:
    """Everything of a chunk that delta does not change, computed once: the head columns
    (before the subject's last token) through every layer, as a KV cache, and the tail columns
    through the layers below the edited one (delta enters at the edited layer, so they are
    constant too), as the hidden states entering it."""
    model, device = loaded.model, loaded.device
    layers = model.get_submodule(loaded.spec.layers_module)
    rows = _value_rows(loaded, requests, prefixes)
    # Line up every row's subject token at column `head_width`.
    batch = pad_sequences(
        [row.ids for row in rows], loaded.tokenizer.pad_token_id, [row.split for row in rows]
    ).to(device)
    head_width = max(row.split for row in rows)
    head_cache: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    with torch.no_grad():
        cache = None
        if head_width > 0:
            cache = DynamicCache(config=model.config)
            model.base_model(
                input_ids=batch.input_ids[:, :head_width],
                attention_mask=batch.attention_mask[:, :head_width],
                position_ids=batch.position_ids[:, :head_width],
                cache=cache,
                use_cache=True,
            )
            head_cache = [(lay.keys, lay.values) for lay in cache.layers]
        tail = slice(head_width, batch.input_ids.shape[1])
        with capture_layer_input(layers, layer, stop=True) as captured:
            try:
                model.base_model(
                    input_ids=batch.input_ids[:, tail],
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids[:, tail],
                    cache=cache,
                    use_cache=cache is not None,
                )
            except StopForward:
                pass
    # The optimised passes start at `layer`: the layers below need no cache.
    head_cache = [kv if index >= layer else None for index, kv in enumerate(head_cache)]
    return _Chunk(
        model=model,
        n_facts=len(requests),
        n_contexts=len(prefixes),
        row_fact=torch.tensor([row.fact for row in rows], device=device),
        is_kl=torch.tensor([row.is_kl for row in rows], device=device),
        is_bare=torch.tensor([row.is_bare for row in rows], device=device),
        batch=batch,
        head_cache=head_cache,
        groups=_tail_groups(rows, head_width, device),
        layers=layers,
        start_layer=layer,
        tail_states=captured[0],
    )


def _optimise_chunk(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    """Optimise one delta per request, all at once.

    The loss is a sum of per-row terms (a context row's NLL / number of contexts, or
    kl_factor * KL of the fact's KL row) plus a per-fact weight decay, so rows can run in any
    grouping: rows are grouped by tail length (no padding in the optimised positions) and each
    group's backward accumulates into the deltas' gradients.
    """
    device = loaded.device
    chunk = _prepare_chunk(loaded, requests, prefixes, layer)
    n_facts = chunk.n_facts
    d_v = loaded.weight(layer).shape[0]
    dtype = torch.promote_types(loaded.model.dtype, torch.float32)  # of losses and h
    progress = _Progress(
        deltas=[torch.zeros(d_v, device=device, requires_grad=True) for _ in range(n_facts)],
        active=torch.ones(n_facts, dtype=torch.bool, device=device),
        row_outputs=torch.zeros(len(chunk.row_fact), d_v, device=device, dtype=dtype),
    )
    deltas = progress.deltas
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    steps = torch.zeros(n_facts, dtype=torch.long)
    losses = torch.zeros(n_facts, dtype=dtype)
    hook = _AddDelta(stream_dtype=loaded.model.get_input_embeddings().weight.dtype)
    handle = value_site(loaded, layer).register_forward_hook(hook)
    try:
        for step in range(hparams.v_steps):
            optimizer.zero_grad(set_to_none=True)
            progress.step = step
            fact_loss = torch.zeros(n_facts, device=device, dtype=dtype)
            for group in chunk.groups:
                fact_loss += _group_loss(chunk, group, progress, hook, hparams.kl_factor)
            if step == 0:
                h = progress.row_outputs[chunk.is_bare]  # (n_facts, d_v) UME's target_init
                h_norm = h.norm(dim=1)  # (n_facts,)
            if not _adam_step(progress, optimizer, fact_loss, h_norm, hparams, steps, losses):
                break
    finally:
        handle.remove()
    return Values(
        deltas=torch.stack([d.detach() for d in deltas]).float().cpu(),
        outputs=h.detach().float().cpu(),
        losses=losses.float(),
        steps=steps,
    )


def _adam_step(
    progress: _Progress,
    optimizer: torch.optim.Optimizer,
    fact_loss: torch.Tensor,
    h_norm: torch.Tensor,
    hparams: ValueHparams,
    steps: torch.Tensor,
    losses: torch.Tensor,
) -> bool:
    """Add the weight decay to every fact's loss (n_facts,), stop the facts that are done,
    then one Adam step and the clamp for the others; False when no fact is left."""
    active, deltas = progress.active, progress.deltas
    stacked = torch.stack(deltas)  # (n_facts, d_v)
    decay = hparams.v_weight_decay * stacked.norm(dim=1) / h_norm**2  # (n_facts,)
    fact_loss = fact_loss + decay.detach()
    with torch.no_grad():
        losses[active.cpu()] = fact_loss[active].cpu()
        finished = active & (fact_loss < hparams.early_stop_loss)
        if progress.step == hparams.v_steps - 1:
            finished = active.clone()
    still = active & ~finished
    if not still.any():
        return False
    decay[still].sum().backward()
    for index in (~still).nonzero().squeeze(1).tolist():
        deltas[index].grad = None  # Adam skips parameters without a gradient
    optimizer.step()
    steps[still.cpu()] += 1
    with torch.no_grad():
        max_norms = hparams.clamp_norm_factor * h_norm
        for index in still.nonzero().squeeze(1).tolist():
            norm = deltas[index].norm()
            if norm > max_norms[index]:
                deltas[index].mul_(max_norms[index] / norm)
    progress.active = still
    return True


def _tail_forward(chunk: _Chunk, group: _TailGroup, rows: torch.Tensor) -> torch.Tensor:
    """The last hidden states (G', L, d) of a tail group's ``rows``, from the edited layer on,
    on the KV cache of their heads."""
    cache = None
    if chunk.head_cache:
        cache = DynamicCache(config=chunk.model.config)
        for index, kv in enumerate(chunk.head_cache):
            if kv is not None:  # layers from start_layer on; the skipped ones hold none
                cache.update(kv[0][rows], kv[1][rows], index)
    batch = chunk.batch
    length = group.columns.stop - group.columns.start
    return forward_from_layer(
        chunk.model.base_model,
        chunk.layers,
        chunk.start_layer,
        chunk.tail_states[rows, :length],  # (G', L, d) entering the edited layer
        input_ids=batch.input_ids[rows, group.columns],
        attention_mask=batch.attention_mask[rows, : group.columns.stop],
        position_ids=batch.position_ids[rows, group.columns],
        cache=cache,
    ).last_hidden_state


def _group_loss(
    chunk: _Chunk, group: _TailGroup, progress: _Progress, hook: _AddDelta, kl_factor: float
) -> torch.Tensor:
    """Forward and backward of one tail group's rows of active facts; returns their loss per
    fact, detached, (n_facts,). On the first step it also records the rows' value-site outputs
    and the KL rows' log-probabilities (the reference of the KL term) into ``progress``."""
    first_step = progress.first_step
    device = progress.active.device
    keep = progress.active[chunk.row_fact[group.rows]]  # (G,) rows of facts still optimised
    if not keep.any():
        return torch.zeros(chunk.n_facts, device=device)
    rows = group.rows[keep]  # (G',) chunk rows
    local = torch.full((len(group.rows),), -1, dtype=torch.long, device=device)
    local[keep] = torch.arange(len(rows), device=device)  # group position -> row in rows
    hook.row_deltas = torch.stack(progress.deltas)[chunk.row_fact[rows]]  # (G', d_v)
    hook.recorded = None
    hidden = _tail_forward(chunk, group, rows)  # (G', L, d)
    if first_step:
        progress.row_outputs[rows] = hook.recorded
    read_keep = keep[group.read_rows]  # (R,) reads of kept rows
    read_local = local[group.read_rows[read_keep]]  # (R',) row in rows of every read
    unembedding = chunk.model.get_output_embeddings()
    logits = unembedding(hidden[read_local, group.read_cols[read_keep]])  # (R', vocab)
    log_probs = F.log_softmax(at_least_float32(logits), dim=-1)
    read_rows = rows[read_local]  # (R',) chunk row of every read
    tokens = group.read_tokens[read_keep]  # (R',)
    read_is_kl = chunk.is_kl[read_rows]  # (R',)
    row_loss = torch.zeros(len(chunk.row_fact), device=device, dtype=log_probs.dtype)
    # NLL: mean over a row's target tokens, divided by the number of contexts of its fact.
    token_reads = ~read_is_kl
    if token_reads.any():
        nll = -log_probs[token_reads].gather(1, tokens[token_reads][:, None]).squeeze(1)
        target_rows = read_rows[token_reads]
        counts = torch.zeros_like(row_loss).index_add(0, target_rows, torch.ones_like(nll))
        row_loss = row_loss.index_add(0, target_rows, nll / counts[target_rows] / chunk.n_contexts)
    if read_is_kl.any():
        kl_rows = read_rows[read_is_kl]  # (F',) one KL row per active fact in this group
        kl_facts = chunk.row_fact[kl_rows]  # (F',)
        current = log_probs[read_is_kl]  # (F', vocab) log P_delta
        if first_step:  # delta is 0: this is P_0
            if progress.kl_reference is None:
                progress.kl_reference = current.new_zeros(chunk.n_facts, current.shape[1])
            progress.kl_reference[kl_facts] = current.detach()
        reference = progress.kl_reference[kl_facts]  # (F', vocab) log P_0
        kl = F.kl_div(reference, current, log_target=True, reduction="none").sum(dim=1)
        row_loss = row_loss.index_add(0, kl_rows, kl_factor * kl)
    row_loss.sum().backward()
    return row_loss.new_zeros(chunk.n_facts).index_add(0, chunk.row_fact, row_loss.detach())
