"""The context prefixes of keys and values: the bare prompt and short texts the model writes.

As UME (``emmet_main.get_context_templates``): the first context is the bare prompt (prefix
``""``); then, for the starters "The", "Therefore", "Because", "I", "You", the model samples
with top-k 5 until the sequence (BOS included) is ``length`` tokens long; the text (starter
and continuation, decoded together, special tokens dropped) is NFKD-normalised, blank lines
become spaces, it is stripped, its braces become spaces and ". " is appended.

The starter and its continuation are decoded as one sequence: a SentencePiece tokenizer
(Llama-2) drops the leading space of the first token it decodes, so decoding the continuation
alone would glue it to the starter ("Thethe ...").

Prefixes are seeded and cached per model weights, so every run of a model uses the same ones.
They are text, not a computation to speed up: a mixed precision samples them from its float32
weights outside autocast (before its first pass rounds the frozen matrices), so ``bf16-mixed``
edits with ``32-true``'s prefixes. A bfloat16 pass samples a different token for some of them,
and PS, the metric the prefixes exist for, then moves by points (docs/precision.md).
"""

from __future__ import annotations

import json
import logging
import unicodedata
from typing import Any

from transformers import PreTrainedTokenizerBase

from editexp.cache import atomic_write_json, cache_root, load_or_compute, stable_hash
from editexp.models import LoadedModel
from editexp.paths import safe_name
from editexp.precision import exact
from editexp.sampling import SAMPLER_VERSION, sample_continuation_ids
from editexp.tokens import encode_prompt

log = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")
_FORMAT = 2  # part of the cache key: bump when the text of a prefix changes


def prefix_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """A context prefix from a sampled sequence's ids (starter included), as UME builds it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").strip()
    return text.replace("{", " ").replace("}", " ") + ". "


def context_prefixes(
    loaded: LoadedModel, count: int, length: int, seed: int, batch_size: int = 16
) -> list[str]:
    """``[""]`` (the bare prompt) plus ``count`` prefixes sampled from the model."""
    if count == 0:
        return [""]
    exact_weights = not loaded.frozen_rounded  # a mixed precision's float32 model is intact
    identity = loaded.weights_identity if exact_weights else loaded.identity
    key = stable_hash([_FORMAT, SAMPLER_VERSION, identity, count, length, seed])
    path = cache_root() / "prefixes" / f"{safe_name(loaded.spec.name)}-{key}.json"

    def sample() -> list[str]:
        tokenizer = loaded.tokenizer
        starters = [STARTERS[i % len(STARTERS)] for i in range(count)]
        if not exact_weights:
            log.warning(
                "sampling the context prefixes in %s: the model has run in it already, so "
                "they differ from 32-true's (build the Editor before the first pass to get "
                "those)",
                loaded.precision.name,
            )
        with exact(loaded.device) if exact_weights else loaded.compute():
            continuations = sample_continuation_ids(
                loaded.model, tokenizer, starters, length=length, seed=seed, batch_size=batch_size
            )
        prefixes = [""]
        for starter, continuation in zip(starters, continuations):
            ids = encode_prompt(tokenizer, starter) + continuation
            prefixes.append(prefix_text(tokenizer, ids))
        return prefixes

    return load_or_compute(  # checked on read: a damaged entry is sampled again
        path,
        load=lambda p: json.loads(p.read_text()),
        save=atomic_write_json,
        compute=sample,
        problem=lambda prefixes: prefixes_problem(prefixes, count),
        what="prefixes cache",
    )


def prefixes_problem(prefixes: Any, count: int) -> str | None:
    """What is wrong with a cached list of context prefixes (None when it is usable)."""
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        return "not a list of strings"
    if len(prefixes) != count + 1 or prefixes[0] != "":
        return f"{len(prefixes)} prefixes, expected the bare prompt '' and {count} more"
    return None
