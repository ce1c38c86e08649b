"""Keys k*: the edited module's input at the subject's last token, as the paper's code (UME)
reads them (``compute_ks``).

For a fact (subject s, prompt template p) and the contexts x_0 = "" (the bare prompt) and
x_1..x_N (sampled prefixes, :mod:`editexp.editing.prefixes`), the key is averaged in two
levels: k* = 1/2 k(x_0 + p(s)) + 1/2 * 1/N sum_j k(x_j + p(s)) (the bare prompt is one group,
the prefixes another; with no prefixes, k* = k(p(s))). :func:`read_at_subject` reads any site
(module input or output, the residual stream) the same way; the editor reads the residual
stream with it when it spreads an update over several layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from editexp.capture import ActivationCapture
from editexp.models import LoadedModel
from editexp.tokens import encode_prompt, pad_sequences, subject_last_index

BARE_PROMPT = [""]  # the contexts of a lookup on the bare prompt alone


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    case_id: int
    prompt: str
    subject: str
    target_new: str


def context_texts(request: EditRequest, prefixes: Sequence[str]) -> list[str]:
    return [prefix + request.prompt.format(request.subject) for prefix in prefixes]


def check_prefixes(prefixes: Sequence[str]) -> None:
    """Context 0 must be the bare prompt: h is read there and k* weighs it 1/2."""
    if not prefixes or prefixes[0] != "":
        raise ValueError(f"prefixes must start with the bare prompt '', got {list(prefixes)[:2]}")


def context_mean(readings: torch.Tensor) -> torch.Tensor:
    """UME's two-level mean over contexts: (E, N + 1, d) -> (E, d), the bare prompt (context 0)
    one group, the N prefixes another, each group weighing 1/2."""
    if readings.shape[1] == 1:
        return readings[:, 0]
    return (readings[:, 0] + readings[:, 1:].mean(dim=1)) / 2


@torch.no_grad()
def read_at_subject(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layers: Sequence[int],
    where: Literal["input", "output", "residual"] = "input",
    batch_size: int = 64,
) -> dict[int, torch.Tensor]:
    """At the subject's last token of every context, the edited module's input (``"input"``:
    keys), its output (``"output"``) or the layer's output (``"residual"``), combined over the
    contexts by :func:`context_mean`: {layer: (E, d)} float32.

    All (fact, context) texts run in padded batches; the pass stops after the deepest layer.
    """
    if where == "input":
        modules, hook_at = {layer: loaded.edit_module(layer) for layer in layers}, "input"
    elif where == "output":
        modules, hook_at = {layer: loaded.edit_module(layer) for layer in layers}, "output"
    elif where == "residual":
        modules, hook_at = {layer: loaded.layer_module(layer) for layer in layers}, "output"
    else:
        raise ValueError(f"where={where!r}; expected 'input', 'output' or 'residual'")
    tokenizer = loaded.tokenizer
    rows: list[tuple[list[int], int]] = []  # (ids, subject's last index), fact-major
    for request in requests:
        for text in context_texts(request, prefixes):
            ids = encode_prompt(tokenizer, text)
            rows.append((ids, subject_last_index(tokenizer, text, request.subject)))
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def consume(layer: int, values: torch.Tensor) -> None:
        captured[layer].append(values.float().cpu())  # (B, d): one row per sequence

    with loaded.compute(), ActivationCapture(modules, hook_at, consume) as capture:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = pad_sequences([ids for ids, _ in chunk], tokenizer.pad_token_id)
            selected = torch.zeros_like(batch.input_ids, dtype=torch.bool)  # (B, T)
            selected[torch.arange(len(chunk)), [index for _, index in chunk]] = True
            batch = batch.to(loaded.device)
            capture.run(
                loaded.model,
                selected.to(loaded.device),
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            )
    n_contexts = len(prefixes)
    return {
        layer: context_mean(torch.cat(parts).view(len(requests), n_contexts, -1))
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
    check_prefixes(prefixes)
    keys = read_at_subject(loaded, requests, prefixes, layers, "input", batch_size)
    return {layer: value.T.contiguous() for layer, value in keys.items()}
