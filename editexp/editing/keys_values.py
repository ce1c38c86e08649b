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


@dataclass(frozen=True)
class ValueHparams:
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 1e-3
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05


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


def _optimise_chunk(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    model, device = loaded.model, loaded.device
    base = model.base_model
    unembedding = model.get_output_embeddings()
    rows = _value_rows(loaded, requests, prefixes)
    n_facts = len(requests)
    row_fact = torch.tensor([row.fact for row in rows], device=device)
    is_kl = torch.tensor([row.is_kl for row in rows], device=device)

    # Line up every row's subject token at column `head_width`; cache the columns before it.
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
    tail_ids = batch.input_ids[:, head_width:]
    tail_positions = batch.position_ids[:, head_width:]

    # Where each loss is read, as (row, tail column, target token).
    read_rows, read_cols, read_tokens, read_row_index = [], [], [], []
    for r, row in enumerate(rows):
        first = row.read_from - row.split
        tokens = row.targets if not row.is_kl else [-1]
        for offset, token in enumerate(tokens):
            read_rows.append(r)
            read_cols.append(first + offset)
            read_tokens.append(token)
            read_row_index.append(r)
    read_rows_t = torch.tensor(read_rows, device=device)
    read_cols_t = torch.tensor(read_cols, device=device)
    read_tokens_t = torch.tensor(read_tokens, device=device)
    read_is_kl = is_kl[read_rows_t]

    d_v = loaded.weight(layer).shape[0]
    deltas = [torch.zeros(d_v, device=device, requires_grad=True) for _ in range(n_facts)]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    active = torch.ones(n_facts, dtype=torch.bool, device=device)
    steps = torch.zeros(n_facts, dtype=torch.long)
    losses = torch.zeros(n_facts)
    outputs: torch.Tensor | None = None  # h per row at the subject token
    kl_reference: torch.Tensor | None = None
    edit_module = loaded.edit_module(layer)
    current: dict[str, torch.Tensor] = {}

    def add_delta(module, args, output):
        if current.get("capture") is not None:
            current["capture"].append(output[:, 0].detach())
        shifted = output[:, :1] + current["row_deltas"][:, None].to(output.dtype)
        return torch.cat([shifted, output[:, 1:]], dim=1)

    handle = edit_module.register_forward_hook(add_delta)
    try:
        for step in range(hparams.v_steps):
            row_active = active[row_fact]
            active_rows = row_active.nonzero().squeeze(1)
            stacked = torch.stack(deltas)
            current["row_deltas"] = stacked[row_fact[active_rows]]
            current["capture"] = [] if outputs is None else None
            cache = DynamicCache(config=model.config)
            for index, (keys, values) in enumerate(head_cache):
                cache.update(keys[active_rows], values[active_rows], index)
            hidden = base(
                input_ids=tail_ids[active_rows],
                attention_mask=batch.attention_mask[active_rows],
                position_ids=tail_positions[active_rows],
                past_key_values=cache if head_cache else None,
                use_cache=bool(head_cache),
            ).last_hidden_state
            if outputs is None:
                outputs = current["capture"][0].float()
            # map full row indices -> positions among the active rows
            position_in_active = torch.full((len(rows),), -1, dtype=torch.long, device=device)
            position_in_active[active_rows] = torch.arange(len(active_rows), device=device)
            read_mask = row_active[read_rows_t]
            local_rows = position_in_active[read_rows_t[read_mask]]
            log_probs = F.log_softmax(
                unembedding(hidden[local_rows, read_cols_t[read_mask]]).float(), dim=-1
            )
            kl_mask = read_is_kl[read_mask]
            token_mask = ~kl_mask
            nll_token = (
                -log_probs[token_mask]
                .gather(1, read_tokens_t[read_mask][token_mask][:, None])
                .squeeze(1)
            )
            token_rows = read_rows_t[read_mask][token_mask]
            # mean over a row's target tokens, then over the fact's context rows
            n_rows = len(rows)
            row_sum = torch.zeros(n_rows, device=device).index_add(0, token_rows, nll_token)
            row_count = torch.zeros(n_rows, device=device).index_add(
                0, token_rows, torch.ones_like(nll_token)
            )
            row_nll = row_sum / row_count.clamp(min=1)
            prompt_rows = (~is_kl) & row_active
            fact_nll = torch.zeros(n_facts, device=device).index_add(
                0, row_fact[prompt_rows], row_nll[prompt_rows]
            ) / len(prefixes)
            kl_log_probs = log_probs[kl_mask]
            kl_facts = row_fact[read_rows_t[read_mask][kl_mask]]
            if kl_reference is None:
                kl_reference = kl_log_probs.detach()
            reference = kl_reference[active[row_fact[is_kl]].nonzero().squeeze(1)]
            kl_per = (reference.exp() * (reference - kl_log_probs)).sum(dim=1)
            fact_kl = torch.zeros(n_facts, device=device).index_add(0, kl_facts, kl_per)
            h_norm_sq = _fact_mean(outputs, row_fact, is_kl, n_facts, prefixes).norm(dim=1) ** 2
            decay = stacked.norm(dim=1) ** 2 / h_norm_sq
            fact_loss = fact_nll + hparams.kl_factor * fact_kl + hparams.v_weight_decay * decay
            with torch.no_grad():
                losses[active.cpu()] = fact_loss[active].detach().cpu()
                finished = active & (fact_loss < hparams.early_stop_loss)
                if step == hparams.v_steps - 1:
                    finished = active.clone()
            still = active & ~finished
            if not still.any():
                break
            optimizer.zero_grad(set_to_none=True)
            fact_loss[still].sum().backward()
            for index in (~still).nonzero().squeeze(1).tolist():
                deltas[index].grad = None  # Adam skips parameters without a gradient
            optimizer.step()
            steps[still.cpu()] += 1
            with torch.no_grad():
                max_norms = hparams.clamp_norm_factor * h_norm_sq.sqrt()
                for index in still.nonzero().squeeze(1).tolist():
                    norm = deltas[index].norm()
                    if norm > max_norms[index]:
                        deltas[index].mul_(max_norms[index] / norm)
            active = still
    finally:
        handle.remove()
    h = _fact_mean(outputs, row_fact, is_kl, n_facts, prefixes)
    return Values(
        deltas=torch.stack([d.detach() for d in deltas]).float().cpu(),
        outputs=h.detach().float().cpu(),
        losses=losses,
        steps=steps,
    )


def _fact_mean(outputs, row_fact, is_kl, n_facts, prefixes) -> torch.Tensor:
    """Mean over each fact's context rows of a per-row vector (KL rows excluded)."""
    prompt_rows = ~is_kl
    total = torch.zeros(n_facts, outputs.shape[1], device=outputs.device)
    total.index_add_(0, row_fact[prompt_rows], outputs[prompt_rows])
    return total / len(prefixes)
