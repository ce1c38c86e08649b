"""UME's ``compute_z`` loop written plainly: one fact at a time, full sequences, all logits.

The reference that :func:`editexp.editing.values.compute_values` is tested and benchmarked
against. It follows UME (``memit/compute_z.py`` at commit 23d72b5) step by step, with its own
tokenisation, independent of :mod:`editexp.tokens`:

- target ids: ``tok(" " + target_new)`` without a leading BOS;
- rewriting prompts: ``(prefix + prompt + decode(target_ids[:-1])).format(subject)`` for every
  context, the KL prompt ``"{} is a".format(subject)``, all in one right-padded batch;
- the lookup index of a prompt: ``len(tok.encode(text before the subject + subject)) - 1``;
- delta is added to the value site's output (the layer's output, UME's ``layer_module_tmp``)
  at the lookup index of every prompt; ``target_init`` is that output at the first prompt (the
  bare one) in the first forward pass;
- loss = mean over prompts of the mean target-token NLL (read at the last ``len(target_ids)``
  positions of each prompt) + kl_factor * ``kl_div(log P_0, log P, log_target=True,
  reduction="batchmean")`` at the KL prompt's lookup index + v_weight_decay * ||delta|| /
  ||target_init||^2;
- stop when loss < early_stop_loss or at step v_steps - 1, else backward, Adam step, and
  project delta into the ball of radius clamp_norm_factor * ||target_init||.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from editexp.config import ValueHparams
from editexp.editing.keys import EditRequest
from editexp.editing.values import KL_PROMPT, Values, at_least_float32, value_site
from editexp.models import LoadedModel


def plain_values(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    """UME's v* computation for each request in turn; ``prefixes[0]`` must be ``""``."""
    parts = [ume_compute_z(loaded, request, prefixes, layer, hparams) for request in requests]
    return Values.concat(parts)


def _lookup_index(tokenizer, template: str, subject: str) -> int:
    """UME's ``subject_last`` index of ``template`` (one ``{}`` slot) filled with ``subject``."""
    before = template.split("{}")[0]
    return len(tokenizer.encode(before + subject)) - 1


def _rewriting_batch(
    loaded: LoadedModel, request: EditRequest, prefixes: Sequence[str]
) -> tuple[Any, torch.Tensor, list[int], int]:
    """UME's batch: the rewriting prompts (each prefix + prompt + target but its last token)
    and the KL prompt, right-padded; the targets (rewriting rows, T) with -100 outside the
    target tokens; the subject's last index per row; the number of target tokens."""
    tok, device = loaded.tokenizer, loaded.device
    target_ids = tok(" " + request.target_new.lstrip(" ")).input_ids
    if target_ids[0] in (tok.bos_token_id, tok.unk_token_id):
        target_ids = target_ids[1:]
    target_text = tok.decode(target_ids[:-1])
    rewriting = [prefix + request.prompt + target_text for prefix in prefixes]
    templates = rewriting + [KL_PROMPT]
    inputs = tok(
        [template.format(request.subject) for template in templates],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    ).to(device)
    targets = torch.full((len(rewriting), inputs.input_ids.shape[1]), -100, device=device)
    for i in range(len(rewriting)):
        length = int(inputs.attention_mask[i].sum())
        targets[i, length - len(target_ids) : length] = torch.tensor(target_ids, device=device)
    lookup = [_lookup_index(tok, template, request.subject) for template in templates]
    return inputs, targets, lookup, len(target_ids)


def _nll(logits: torch.Tensor, targets: torch.Tensor, n_target: int) -> torch.Tensor:
    """The mean over rewriting prompts of their mean target-token NLL; logits (N + 2, T, vocab),
    targets (N + 1, T) with -100 outside the target tokens."""
    log_probs = F.log_softmax(at_least_float32(logits[: targets.shape[0]]), dim=2)
    picked = torch.gather(log_probs, 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    mask = (targets != -100).float()
    nll_each = -(picked * mask).sum(1) / n_target
    return nll_each.mean()


def ume_compute_z(
    loaded: LoadedModel,
    request: EditRequest,
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    model, device = loaded.model, loaded.device
    inputs, targets, lookup, n_target = _rewriting_batch(loaded, request, prefixes)

    delta = torch.zeros(loaded.weight(layer).shape[0], device=device, requires_grad=True)
    target_init = None

    def add_delta(module, args, output):
        nonlocal target_init
        hidden = output[0] if isinstance(output, tuple) else output
        if target_init is None:
            target_init = hidden[0, lookup[0]].detach().clone()
        hidden = hidden.clone()
        for i, index in enumerate(lookup):
            hidden[i, index] = hidden[i, index] + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    steps, loss_value = 0, 0.0
    handle = value_site(loaded, layer).register_forward_hook(add_delta)
    try:
        for step in range(hparams.v_steps):
            optimizer.zero_grad()
            logits = model(**inputs).logits
            kl_log_probs = F.log_softmax(at_least_float32(logits[-1:, lookup[-1]]), dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            nll = _nll(logits, targets, n_target)
            kl = hparams.kl_factor * F.kl_div(
                kl_init, kl_log_probs, log_target=True, reduction="batchmean"
            )
            decay = hparams.v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
            loss = nll + kl + decay
            loss_value = float(loss.detach())
            if loss < hparams.early_stop_loss or step == hparams.v_steps - 1:
                break
            loss.backward()
            optimizer.step()
            steps += 1
            max_norm = hparams.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    return Values(
        deltas=delta.detach().float().cpu()[None],
        outputs=target_init.float().cpu()[None],
        losses=torch.tensor([loss_value]),
        steps=torch.tensor([steps]),
    )
