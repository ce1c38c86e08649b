"""The one place where prompts, subjects and targets become token ids.

Every path that reads a probability (value optimisation, scoring, key lookup) encodes text
here, so BOS handling and target spacing cannot drift apart between them:

- BOS is whatever the tokenizer itself adds to a text (Llama-3 adds ``<|begin_of_text|>``,
  GPT-2 and SmolLM2 add nothing). A prompt is encoded with special tokens, a target never, so
  a sequence has at most one BOS, at its start.
- A target is scored as the continuation ``prompt + " " + target`` (CounterFact targets carry
  no leading space). Its ids are the tail of the encoded full text when the prompt's ids are a
  prefix of it, which is what the model sees in running text; otherwise (a tokenizer that
  merges across the boundary) the target is encoded on its own with its leading space.
- Sequences are padded on the right for teacher forcing; callers that need a common position
  (the subject's last token) pad on the left; both pass explicit ``position_ids`` so models
  with absolute positions (GPT-2) see the same positions as without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a prompt, with the tokenizer's own BOS (if it adds one)."""
    return list(tokenizer(text).input_ids)


def encode_target(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """Ids of ``target`` as it continues ``prompt`` (with a leading space)."""
    target_text = target if target.startswith(" ") else " " + target
    prompt_ids = encode_prompt(tokenizer, prompt)
    full_ids = encode_prompt(tokenizer, prompt + target_text)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :]
    return list(tokenizer(target_text, add_special_tokens=False).input_ids)


def subject_last_index(tokenizer: PreTrainedTokenizerBase, text: str, subject: str) -> int:
    """Index of the subject's last token in ``encode_prompt(text)``.

    ``text`` contains the subject verbatim (the last occurrence is used, as the prompt's
    ``{}`` slot comes after any context prefix).
    """
    end = text.rfind(subject)
    if end < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    return len(encode_prompt(tokenizer, text[: end + len(subject)])) - 1


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    position_ids: torch.Tensor  # (B, T), 0 at each sequence's first real token
    offsets: torch.Tensor  # (B,) number of pad tokens on the left of each sequence

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.offsets.to(device),
        )


def pad_sequences(
    sequences: list[list[int]],
    pad_id: int,
    left_lengths: list[int] | None = None,
) -> PaddedBatch:
    """Pad id lists into one batch.

    With ``left_lengths=None`` every sequence starts at position 0 (right padding). Otherwise
    sequence i is shifted right so that its first ``left_lengths[i]`` tokens end at the same
    column for all sequences (e.g. to line up the subject's last token).
    """
    if left_lengths is None:
        left_lengths = [0] * len(sequences)
    align = max(left_lengths) if left_lengths else 0
    offsets = [align - left for left in left_lengths]
    width = max(offset + len(seq) for offset, seq in zip(offsets, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (offset, seq) in enumerate(zip(offsets, sequences)):
        input_ids[row, offset : offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, offset : offset + len(seq)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(input_ids, attention_mask, position_ids, torch.tensor(offsets))
