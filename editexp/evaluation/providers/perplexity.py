"""Held-out perplexity (``PPL``): how well the model still predicts ordinary text, a measure of
its general ability that editing many facts can wear down (a forgetting curve when scored
along a sequential run).

The text is the statistics corpus (``stats.corpus``, e.g. WikiText-2 test for SmolLM2) *after*
what the run's layer statistics read: C0's ``stats.n_tokens`` tokens, then the held-out keys'
``eval.held_out_keys`` x ``editexp.layer_stats.HELD_OUT_STRIDE`` tokens (see
:func:`first_window`). No token of it entered C0. ``eval.perplexity.n_tokens`` tokens (the
budget, BOS included) are cut into ``stats.seq_len`` windows as the statistics cut theirs;
PPL = exp of the mean negative log-likelihood of every token after a window's first, over all
windows.

Turn it on with ``eval.metrics=[perplexity]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from editexp.evaluation.providers import MetricConfigError, ModelMetricProvider, provider
from editexp.metric_specs import MetricSpec, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from editexp.data.corpus import CorpusSource
    from editexp.models import LoadedModel

PPL = register(
    MetricSpec("PPL", "held-out perplexity", "", higher_is_better=False, log_axis=True)
)  # a log axis: one damaging edit can multiply it a hundredfold beside others that add 10%
PERPLEXITY_VERSION = 1  # bump when the computation changes: part of the pre-edit cache key


@dataclass(frozen=True)
class PerplexitySettings:
    """Which tokens, and how they are batched."""

    n_tokens: int  # the budget: ids over all windows, BOS included
    seq_len: int  # ids per window (the statistics' stats.seq_len)
    first_window: int  # windows of the corpus skipped: C0's sample and the held-out keys
    batch_size: int = 8  # windows per forward pass

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PerplexitySettings:
        ppl_cfg = cfg.eval.get("perplexity") or {}
        settings = cls(
            n_tokens=int(ppl_cfg.get("n_tokens", 4096)),
            seq_len=int(cfg.stats.seq_len),
            first_window=first_window(
                int(cfg.stats.n_tokens), int(cfg.stats.seq_len), int(cfg.eval.held_out_keys)
            ),
            batch_size=int(ppl_cfg.get("batch_size", 8)),
        )
        if settings.n_tokens < 2 or settings.batch_size < 1:
            raise MetricConfigError(
                f"eval.perplexity: n_tokens={settings.n_tokens} (at least 2) and "
                f"batch_size={settings.batch_size} (at least 1)"
            )
        return settings


def first_window(stats_tokens: int, seq_len: int, held_out_keys: int) -> int:
    """The first window (of ``seq_len`` ids) after C0's sample and the held-out keys' text.

    C0 reads windows ``0 .. ceil(stats_tokens / seq_len) - 1``; the held-out keys read
    ``held_out_keys * HELD_OUT_STRIDE`` ids from there, at most one window more than that
    many ids fill when every window starts with a BOS."""
    from editexp.layer_stats import HELD_OUT_STRIDE

    c0_windows = math.ceil(stats_tokens / seq_len)
    key_windows = math.ceil(held_out_keys * HELD_OUT_STRIDE / max(seq_len - 1, 1)) + 1
    return c0_windows + key_windows


def perplexity(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """exp(mean -log p) of every non-padding token after the first of its window."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for input_ids, attention_mask in batches:  # (B, T) each
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
            )  # (B, T-1): -log p of each next token
            predicted = attention_mask[:, 1:].bool()  # (B, T-1)
            total += float(nll[predicted].double().sum())
            count += int(predicted.sum())
    if count == 0:
        raise MetricConfigError("held-out perplexity: no tokens to predict")
    return math.exp(total / count)


class HeldOutPerplexity(ModelMetricProvider):
    """PPL of the model on held-out corpus text (see the module docstring)."""

    specs = (PPL,)

    def __init__(self, source: CorpusSource, settings: PerplexitySettings) -> None:
        self.source = source
        self.settings = settings
        self._windows: list[list[int]] | None = None  # the text's ids, read once

    def cache_key(self) -> Any:
        return ["perplexity", PERPLEXITY_VERSION, self.source.identity(), asdict(self.settings)]

    def windows(self, model: LoadedModel) -> list[list[int]]:
        """The budget's windows of ids (each as the statistics encode theirs)."""
        from editexp.data.corpus import token_windows

        if self._windows is None:
            settings = self.settings
            self._windows = list(
                token_windows(
                    model.tokenizer,
                    self.source,
                    settings.seq_len,
                    settings.n_tokens,
                    settings.first_window,
                )
            )
            produced = sum(len(window) for window in self._windows)
            if produced < settings.n_tokens:
                raise MetricConfigError(
                    f"held-out perplexity: the corpus ({self.source.describe()}) has only "
                    f"{produced} tokens after window {settings.first_window} (C0's sample and "
                    f"the held-out keys), fewer than eval.perplexity.n_tokens={settings.n_tokens}"
                )
        return self._windows

    def score(self, model: LoadedModel) -> dict[str, float]:
        from editexp.data.corpus import padded_batches

        # padding (id 0) follows the text and is masked out: it changes no prediction
        batches = padded_batches(self.windows(model), self.settings.batch_size, 0)
        return {PPL.name: perplexity(model.model, batches)}


@provider("perplexity")
def held_out_perplexity(cfg: DictConfig) -> HeldOutPerplexity:
    from editexp.data.corpus import CorpusSource

    return HeldOutPerplexity(
        CorpusSource.from_config(cfg.stats, cfg.data), PerplexitySettings.from_config(cfg)
    )
