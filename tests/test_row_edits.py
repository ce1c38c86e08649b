"""``RowEdits``, each batch row carrying its own fact's rank-one update, scores and samples exactly
what the model with that update written into W gives, and checks its rows.
"""

from __future__ import annotations

import pytest
import torch

from editexp.editing.deltas import restore_weights, snapshot_weights
from editexp.evaluation.scoring import ScoringShortcuts, score_continuations
from editexp.row_edits import PromptEdits, RankOneEdits, RowEdits
from editexp.sampling import generation_seed, sample_continuation_ids

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Autonomous University of Madrid, which is located in",
    "Danielle Darrieux's mother tongue is",
    "and Sallie Beavers Riley. Autonomous University of Madrid is located in",
]
TARGETS = [
    ["Paris", "Berlin"],
    ["there", "Xylophone orchestra of the north"],
    ["Sweden", "Spain"],
    ["English", "French", "Old Church Slavonic"],
    ["the Kingdom of Sweden", "Spain"],
]
PROMPT_EDITS = [0, 1, 2, -1, 1]  # prompt 3 unedited, prompts 1 and 4 share edit 1


def random_edits(loaded, layer: int, n: int, scale: float = 0.3) -> RankOneEdits:
    generator = torch.Generator().manual_seed(1)
    d_v, d_k = loaded.weight(layer).shape
    left = torch.randn(n, d_v, generator=generator)
    return RankOneEdits(layer, left, scale * torch.randn(n, d_k, generator=generator))


def with_written_edit(loaded, edits: RankOneEdits, index: int, run):
    """``run()`` on the model with edit ``index`` written into W (-1: unedited), restored."""
    snapshot = snapshot_weights(loaded, [edits.layer])
    try:
        if index >= 0:
            weight = loaded.weight(edits.layer)
            with torch.no_grad():
                weight += edits.delta(index).to(weight.dtype)
        return run()
    finally:
        restore_weights(loaded, snapshot)


def test_row_edits_score_as_written_weights(tiny):
    edits = random_edits(tiny, 1, 3)
    rows = RowEdits.for_model(tiny, edits)
    batched = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        batch_size=2,
        shortcuts=ScoringShortcuts(edits=PromptEdits(rows, PROMPT_EDITS)),
    )
    for prompt, targets, index, scores in zip(PROMPTS, TARGETS, PROMPT_EDITS, batched):
        alone = with_written_edit(
            tiny,
            edits,
            index,
            lambda p=prompt, t=targets: score_continuations(tiny.model, tiny.tokenizer, [p], [t]),
        )[0]
        assert max(abs(a - b) for a, b in zip(scores, alone)) < 1e-5
    # negative control: the edits change the scores, and a wrong row mapping is caught
    plain = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS)
    assert max(abs(a - b) for x, y in zip(plain, batched) for a, b in zip(x, y)) > 1e-2
    shifted_rows = ScoringShortcuts(edits=PromptEdits(rows, [1, 2, 0, -1, 0]))
    shifted = score_continuations(
        tiny.model, tiny.tokenizer, PROMPTS, TARGETS, shortcuts=shifted_rows
    )
    assert max(abs(a - b) for x, y in zip(shifted, batched) for a, b in zip(x, y)) > 1e-3


def test_row_edits_sample_as_written_weights(tiny):
    edits = random_edits(tiny, 1, 3)
    seeds = [generation_seed(0, 11, i) for i in range(len(PROMPTS))]
    for top_k in (1, 5):  # greedy is exact whatever the rounding; top-5 uses the same draws
        batched = sample_continuation_ids(
            tiny.model,
            tiny.tokenizer,
            PROMPTS,
            24,
            top_k,
            seeds,
            batch_size=3,
            edits=PromptEdits(RowEdits.for_model(tiny, edits), PROMPT_EDITS),
        )
        for prompt, seed, index, ids in zip(PROMPTS, seeds, PROMPT_EDITS, batched):
            alone = with_written_edit(
                tiny,
                edits,
                index,
                lambda p=prompt, s=seed, k=top_k: sample_continuation_ids(
                    tiny.model, tiny.tokenizer, [p], 24, k, [s]
                ),
            )[0]
            assert ids == alone


def test_row_edits_check_their_rows(tiny):
    rows = RowEdits.for_model(tiny, random_edits(tiny, 1, 2))
    with pytest.raises(IndexError):
        rows.select([0, 2])
    with pytest.raises(ValueError, match="1 prompt edits for 5 prompts"):
        shortcuts = ScoringShortcuts(edits=PromptEdits(rows, [0]))
        score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, shortcuts=shortcuts)
    with rows.installed(), pytest.raises(RuntimeError, match="one edit index per batch row"):
        rows.select([0])
        tiny.model(input_ids=torch.tensor([[1, 2], [3, 4]]))
