"""The plain computation of v*, one fact at a time, as reference implementations do it.

Every Adam step runs every context sequence in full (no KV cache), computes logits at every
position and reads the loss from them. Same loss, optimiser, clamp and early stop as
:func:`editexp.editing.keys_values.compute_values`, which must agree with it; kept as the
baseline the fast engine is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from editexp.editing.keys_values import KL_PROMPT, EditRequest, ValueHparams, Values
from editexp.models import LoadedModel
from editexp.tokens import encode_prompt, encode_target, pad_sequences, subject_last_index


def plain_values(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
) -> Values:
    parts = [_plain_one(loaded, request, prefixes, layer, hparams) for request in requests]
    return Values.concat(parts)


def _plain_one(loaded, request, prefixes, layer, hparams) -> Values:
    tokenizer, device = loaded.tokenizer, loaded.device
    texts = [prefix + request.prompt.format(request.subject) for prefix in prefixes]
    sequences, subject_index, target_slices, target_ids = [], [], [], []
    for text in texts:
        prompt_ids = encode_prompt(tokenizer, text)
        target = encode_target(tokenizer, text, request.target_new)
        sequences.append(prompt_ids + target[:-1])
        subject_index.append(subject_last_index(tokenizer, text, request.subject))
        target_slices.append((len(prompt_ids) - 1, len(target)))
        target_ids.append(target)
    kl_text = KL_PROMPT.format(request.subject)
    kl_ids = encode_prompt(tokenizer, kl_text)
    sequences.append(kl_ids)
    subject_index.append(subject_last_index(tokenizer, kl_text, request.subject))
    batch = pad_sequences(sequences, tokenizer.pad_token_id).to(device)
    rows = torch.arange(len(sequences), device=device)
    index = torch.tensor(subject_index, device=device)

    delta = torch.zeros(loaded.weight(layer).shape[0], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    captured: list[torch.Tensor] = []

    def add_delta(module, args, output):
        if not captured:
            captured.append(output[rows, index].detach())
        output = output.clone()
        output[rows, index] = output[rows, index] + delta
        return output

    handle = loaded.edit_module(layer).register_forward_hook(add_delta)
    kl_reference = None
    steps, loss_value = 0, 0.0
    try:
        for step in range(hparams.v_steps):
            logits = loaded.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)
            nll = []
            for row, ((first, count), target) in enumerate(zip(target_slices, target_ids)):
                picked = log_probs[row, first : first + count].gather(
                    1, torch.tensor(target, device=device)[:, None]
                )
                nll.append(-picked.mean())
            nll_loss = torch.stack(nll).mean()
            kl_log_probs = log_probs[len(texts), len(kl_ids) - 1]
            if kl_reference is None:
                kl_reference = kl_log_probs.detach()
            kl = (kl_reference.exp() * (kl_reference - kl_log_probs)).sum()
            h = captured[0][: len(texts)].float().mean(dim=0)
            loss = (
                nll_loss
                + hparams.kl_factor * kl
                + hparams.v_weight_decay * delta.norm() ** 2 / h.norm() ** 2
            )
            loss_value = float(loss)
            if loss_value < hparams.early_stop_loss or step == hparams.v_steps - 1:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * h.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    h = captured[0][: len(texts)].float().mean(dim=0)
    return Values(
        deltas=delta.detach().float().cpu()[None],
        outputs=h.cpu()[None],
        losses=torch.tensor([loss_value]),
        steps=torch.tensor([steps]),
    )
