"""The key/value engine shared by ROME, MEMIT and EMMET (the preservation-memorization view).

For a fact (subject s, prompt template p, new target o*) and a set of context prefixes x_j:

- the key k* is the edited module's input at the subject's last token, averaged over the
  contexts ``x_j + p.format(s)``: k* = 1/N sum_j k(x_j + p(s));
- the value v* = h + delta* where h is the module's output there (averaged the same way, so
  h = W k* + b exactly) and delta* minimises

      L(delta) = 1/N sum_j NLL(o* | x_j + p(s); h_j + delta)
                 + kl_factor * KL(P(. | "s is a") || P(. | "s is a"; h + delta))
                 + weight_decay * ||delta||^2 / ||h||^2

  with Adam, ``||delta|| <= clamp_norm_factor * ||h||`` after every step, and an early stop
  when L < early_stop_loss. The residual r = v* - W k* - b is exactly delta*.

Many facts are optimised together: each has its own delta, its own loss term (the total is a
sum, so each delta's gradient is that of its own loss), its own Adam state, its own clamp and
its own early stop, so every fact ends where it would alone. Two shortcuts change no result:
positions before the subject's last token do not depend on delta, so they run once and are
kept as a KV cache (each Adam step only runs the positions from the subject's last token on),
and the unembedding is applied only where a loss is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from editexp.cache import atomic_write_json, cache_root, stable_hash
from editexp.config import ValueHparams
from editexp.models import LoadedModel
from editexp.tokens import encode_prompt, encode_target, pad_sequences, subject_last_index

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"
PREFIX_STARTERS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    case_id: int
    prompt: str
    subject: str
    target_new: str


@dataclass
class Values:
    """Optimised values for a list of requests, at one module (rows follow the requests)."""

    deltas: torch.Tensor  # (E, d_v) delta*, float32: the residual v* - W k* - b
    outputs: torch.Tensor  # (E, d_v) h, the module's output at the subject, averaged
    losses: torch.Tensor  # (E,) the loss at the last forward pass
    steps: torch.Tensor  # (E,) Adam steps taken

    @property
    def targets(self) -> torch.Tensor:
        return self.outputs + self.deltas

    @classmethod
    def concat(cls, parts: Sequence[Values]) -> Values:
        names = [field.name for field in fields(cls)]
        return cls(*(torch.cat([getattr(part, name) for part in parts]) for name in names))


# --------------------------------------------------------------------------- context prefixes


def context_prefixes(
    loaded: LoadedModel, count: int, length: int, seed: int, batch_size: int = 16
) -> list[str]:
    """``[""]`` plus ``count`` short texts sampled from the model, each ending in ". ".

    Seeded and cached per model identity, so every run of a model uses the same prefixes.
    """
    if count == 0:
        return [""]
    key = stable_hash([loaded.identity, count, length, seed])
    path = cache_root() / "prefixes" / f"{loaded.spec.name}-{key}.json"
    if path.is_file():
        import json

        return json.loads(path.read_text())
    from editexp.evaluation.generation import generate_texts

    starters = [PREFIX_STARTERS[i % len(PREFIX_STARTERS)] for i in range(count)]
    continuations = generate_texts(
        loaded.model, loaded.tokenizer, starters, length=length, seed=seed, batch_size=batch_size
    )
    prefixes = [""]
    for starter, continuation in zip(starters, continuations):
        text = (starter + continuation).replace("{", " ").replace("}", " ")
        prefixes.append(" ".join(text.split()) + ". ")
    atomic_write_json(path, prefixes)
    return prefixes


# --------------------------------------------------------------------------- keys


def _context_texts(request: EditRequest, prefixes: Sequence[str]) -> list[str]:
    return [prefix + request.prompt.format(request.subject) for prefix in prefixes]


class _StopForward(Exception):
    pass


@torch.no_grad()
def read_at_subject(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layers: Sequence[int],
    where: str = "input",
    batch_size: int = 64,
) -> dict[int, torch.Tensor]:
    """The edited module's input (``where="input"``: the keys k*), its output (``"output"``)
    or the residual stream after the layer (``"residual"``) at the subject's last token,
    averaged over the context prefixes: {layer: (E, d)} float32.

    All (fact, prefix) texts run in padded batches; the forward pass stops after the deepest
    requested layer.
    """
    tokenizer = loaded.tokenizer
    rows: list[tuple[list[int], int]] = []
    for request in requests:
        for text in _context_texts(request, prefixes):
            rows.append(
                (
                    encode_prompt(tokenizer, text),
                    subject_last_index(tokenizer, text, request.subject),
                )
            )
    deepest = max(layers)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    current_index: list[torch.Tensor] = []

    def make_hook(layer: int):
        def hook(module, args, output=None):
            tensor = args[0] if where == "input" else output
            if isinstance(tensor, tuple):  # decoder layers may return (hidden, ...)
                tensor = tensor[0]
            batch_rows = torch.arange(tensor.shape[0], device=tensor.device)
            captured[layer].append(tensor[batch_rows, current_index[0]].float().cpu())
            if layer == deepest:
                raise _StopForward

        return hook

    handles = []
    for layer in layers:
        if where == "input":
            module = loaded.edit_module(layer)
            handles.append(module.register_forward_pre_hook(make_hook(layer)))
        elif where == "output":
            handles.append(loaded.edit_module(layer).register_forward_hook(make_hook(layer)))
        elif where == "residual":
            handles.append(loaded.layer_module(layer).register_forward_hook(make_hook(layer)))
        else:
            raise ValueError(f"where={where!r}; expected 'input', 'output' or 'residual'")
    pad_id = tokenizer.pad_token_id
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = pad_sequences([ids for ids, _ in chunk], pad_id).to(loaded.device)
            current_index[:] = [torch.tensor([index for _, index in chunk], device=loaded.device)]
            try:
                loaded.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    n_prefixes = len(prefixes)
    return {
        layer: torch.cat(parts).view(len(requests), n_prefixes, -1).mean(dim=1)
        for layer, parts in captured.items()
    }


def compute_keys(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 64,
) -> dict[int, torch.Tensor]:
    """k* for every request at every layer: {layer: (d_k, E)} (columns are keys)."""
    keys = read_at_subject(loaded, requests, prefixes, layers, "input", batch_size)
    return {layer: value.T.contiguous() for layer, value in keys.items()}


# --------------------------------------------------------------------------- values


@dataclass
class _Row:
    fact: int  # index of the request in the chunk
    ids: list[int]  # full input ids (context + target[:-1])
    split: int  # subject's last token: ids[:split] go to the KV cache
    read_from: int  # first position (in ids) whose logits are read
    targets: list[int]  # token ids predicted at read_from, read_from + 1, ...
    is_kl: bool


def _value_rows(loaded: LoadedModel, requests: Sequence[EditRequest], prefixes: Sequence[str]):
    tokenizer = loaded.tokenizer
    rows: list[_Row] = []
    for fact, request in enumerate(requests):
        for text in _context_texts(request, prefixes):
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
                )
            )
        kl_text = KL_PROMPT.format(request.subject)
        kl_ids = encode_prompt(tokenizer, kl_text)
        rows.append(
            _Row(
                fact=fact,
                ids=kl_ids,
                split=subject_last_index(tokenizer, kl_text, request.subject),
                read_from=len(kl_ids) - 1,
                targets=[],
                is_kl=True,
            )
        )
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
    """delta* and h for every request at ``layer``'s edited module, ``batch_size`` facts at a
    time (each fact's result does not depend on the others in its batch)."""
    parts = []
    bar = tqdm(
        total=len(requests), desc=f"values (layer {layer})", unit="fact", disable=not progress
    )
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        parts.append(_optimise_chunk(loaded, chunk, prefixes, layer, hparams))
        bar.update(len(chunk))
    bar.close()
    return Values.concat(parts)


@dataclass
class _TailGroup:
    """Rows whose tails (subject's last token onwards) have the same length: one padded-free
    forward and backward per Adam step."""

    rows: torch.Tensor  # (G,) indices into the chunk's rows
    columns: slice  # columns of the aligned batch: head cache + this group's tail
    read_rows: torch.Tensor  # (R,) positions within the group where a loss is read
    read_cols: torch.Tensor  # (R,) tail columns of those reads
    read_tokens: torch.Tensor  # (R,) target token ids (-1 for KL reads)


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


def _optimise_chunk(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    """Optimise one delta per request, all at once.

    The loss is a sum of per-row terms (NLL of a context row / number of contexts, or
    kl_factor * KL of the fact's KL row) plus a per-fact weight decay, so rows can run in any
    grouping: rows are grouped by tail length (no padding in the optimised positions) and each
    group's backward accumulates into the deltas' gradients.
    """
    model, device = loaded.model, loaded.device
    base = model.base_model
    unembedding = model.get_output_embeddings()
    rows = _value_rows(loaded, requests, prefixes)
    n_facts, n_rows = len(requests), len(rows)
    row_fact = torch.tensor([row.fact for row in rows], device=device)
    is_kl = torch.tensor([row.is_kl for row in rows], device=device)

    # Line up every row's subject token at column `head_width`; cache the columns before it
    # (they do not depend on delta) once.
    batch = pad_sequences(
        [row.ids for row in rows], loaded.tokenizer.pad_token_id, [row.split for row in rows]
    ).to(device)
    head_width = max(row.split for row in rows)
    head_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    if head_width > 0:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            base(
                input_ids=batch.input_ids[:, :head_width],
                attention_mask=batch.attention_mask[:, :head_width],
                position_ids=batch.position_ids[:, :head_width],
                past_key_values=cache,
                use_cache=True,
            )
            head_cache = [(lay.keys, lay.values) for lay in cache.layers]
    groups = _tail_groups(rows, head_width, device)

    d_v = loaded.weight(layer).shape[0]
    deltas = [torch.zeros(d_v, device=device, requires_grad=True) for _ in range(n_facts)]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    active = torch.ones(n_facts, dtype=torch.bool, device=device)
    steps = torch.zeros(n_facts, dtype=torch.long)
    losses = torch.zeros(n_facts)
    row_outputs = torch.zeros(n_rows, d_v, device=device)  # h per row, captured at step 0
    kl_reference: dict[int, torch.Tensor] = {}  # KL row -> log-probs of the unedited model
    hook_state: dict[str, torch.Tensor] = {}

    def add_delta(module, args, output):
        if "capture_rows" in hook_state:
            row_outputs[hook_state["capture_rows"]] = output[:, 0].detach().float()
        shifted = output[:, :1] + hook_state["row_deltas"][:, None].to(output.dtype)
        return torch.cat([shifted, output[:, 1:]], dim=1)

    handle = loaded.edit_module(layer).register_forward_hook(add_delta)
    try:
        for step in range(hparams.v_steps):
            optimizer.zero_grad(set_to_none=True)
            fact_loss = torch.zeros(n_facts, device=device)
            for group in groups:
                fact_loss += _group_loss(
                    group,
                    active,
                    row_fact,
                    is_kl,
                    deltas,
                    hook_state,
                    head_cache,
                    batch,
                    base,
                    unembedding,
                    kl_reference,
                    hparams,
                    len(prefixes),
                    step == 0,
                    model,
                )
            if step == 0:
                h_norm = _fact_mean(row_outputs, row_fact, is_kl, n_facts, prefixes).norm(dim=1)
            stacked = torch.stack(deltas)
            decay = hparams.v_weight_decay * stacked.norm(dim=1) ** 2 / h_norm**2
            fact_loss = fact_loss + decay.detach()
            with torch.no_grad():
                losses[active.cpu()] = fact_loss[active].cpu()
                finished = active & (fact_loss < hparams.early_stop_loss)
                if step == hparams.v_steps - 1:
                    finished = active.clone()
            still = active & ~finished
            if not still.any():
                break
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
            active = still
    finally:
        handle.remove()
    h = _fact_mean(row_outputs, row_fact, is_kl, n_facts, prefixes)
    return Values(
        deltas=torch.stack([d.detach() for d in deltas]).float().cpu(),
        outputs=h.detach().float().cpu(),
        losses=losses,
        steps=steps,
    )


def _group_loss(
    group,
    active,
    row_fact,
    is_kl,
    deltas,
    hook_state,
    head_cache,
    batch,
    base,
    unembedding,
    kl_reference,
    hparams,
    n_prefixes,
    first_step,
    model,
) -> torch.Tensor:
    """Forward and backward of one tail group's active rows; returns their loss per fact
    (detached). Facts that stopped early are left out."""
    n_facts = active.shape[0]
    keep = active[row_fact[group.rows]]
    if not keep.any():
        return torch.zeros(n_facts, device=active.device)
    rows = group.rows[keep]
    local = torch.full((len(group.rows),), -1, dtype=torch.long, device=active.device)
    local[keep] = torch.arange(len(rows), device=active.device)
    hook_state["row_deltas"] = torch.stack(deltas)[row_fact[rows]]
    if first_step:
        hook_state["capture_rows"] = rows
    else:
        hook_state.pop("capture_rows", None)
    cache = None
    if head_cache:
        cache = DynamicCache(config=model.config)
        for index, (keys, values) in enumerate(head_cache):
            cache.update(keys[rows], values[rows], index)
    hidden = base(
        input_ids=batch.input_ids[rows, group.columns],
        attention_mask=batch.attention_mask[rows, : group.columns.stop],
        position_ids=batch.position_ids[rows, group.columns],
        past_key_values=cache,
        use_cache=cache is not None,
    ).last_hidden_state
    read_keep = keep[group.read_rows]
    read_local = local[group.read_rows[read_keep]]
    log_probs = F.log_softmax(
        unembedding(hidden[read_local, group.read_cols[read_keep]]).float(), dim=-1
    )
    read_rows = rows[read_local]  # chunk row of every read
    tokens = group.read_tokens[read_keep]
    read_is_kl = is_kl[read_rows]
    row_loss = torch.zeros(len(row_fact), device=active.device)
    # NLL: mean over a row's target tokens, divided by the number of contexts of its fact.
    token_reads = ~read_is_kl
    if token_reads.any():
        nll = -log_probs[token_reads].gather(1, tokens[token_reads][:, None]).squeeze(1)
        target_rows = read_rows[token_reads]
        counts = torch.zeros_like(row_loss).index_add(0, target_rows, torch.ones_like(nll))
        row_loss = row_loss.index_add(0, target_rows, nll / counts[target_rows] / n_prefixes)
    if read_is_kl.any():
        kl_rows = read_rows[read_is_kl]
        kl_log_probs = log_probs[read_is_kl]
        for position, row in enumerate(kl_rows.tolist()):
            kl_reference.setdefault(row, kl_log_probs[position].detach())
        reference = torch.stack([kl_reference[row] for row in kl_rows.tolist()])
        kl = (reference.exp() * (reference - kl_log_probs)).sum(dim=1)
        row_loss = row_loss.index_add(0, kl_rows, hparams.kl_factor * kl)
    row_loss.sum().backward()
    return torch.zeros(n_facts, device=active.device).index_add(0, row_fact, row_loss.detach())


def _fact_mean(outputs, row_fact, is_kl, n_facts, prefixes) -> torch.Tensor:
    """Mean over each fact's context rows of a per-row vector (KL rows excluded)."""
    prompt_rows = ~is_kl
    total = torch.zeros(n_facts, outputs.shape[1], device=outputs.device)
    total.index_add_(0, row_fact[prompt_rows], outputs[prompt_rows])
    return total / len(prefixes)
