"""Which facts of a run get their generations scored (GE, the expensive part of evaluation).

GE on the first few facts of a run would put them all in its first update: in a sequential
run GE would only ever see the model after one update, never the later degradation. The
facts are spread over the run instead: every update's batch gets its share (as even as the
count allows), and inside a batch they are spread over its facts. Each is scored when the
schedule scores its fact (``each_batch``: right after its own update; ``final``: after the
last one), so later batches' GE facts see the model after later updates.

``eval.generation_facts`` is a number of facts, ``all``, or 0 (no GE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_generation_facts(value: Any) -> int | None:
    """``eval.generation_facts`` as a count, or None for ``all``; bad values are refused."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"eval.generation_facts={value!r}; expected a number of facts >= 0 or 'all'"
        )
    return value


def spread_generation_facts(case_ids: Sequence[int], batch_size: int, count: Any) -> list[int]:
    """The case ids (in run order) whose generations are scored.

    ``case_ids`` are the run's facts in edit order, ``batch_size`` facts per update (1 for
    singular edits, the whole run for one batch). Update b gets
    ``floor((b + 1) * count / U) - floor(b * count / U)`` of the ``count`` facts (U updates),
    at evenly spaced positions of its batch; so every batch contributes once ``count >= U``.
    """
    n = parse_generation_facts(count)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of facts")
    if n is None or n >= len(case_ids):
        return list(case_ids)
    batches = [
        case_ids[start : start + batch_size] for start in range(0, len(case_ids), batch_size)
    ]
    chosen: list[int] = []
    for index, batch in enumerate(batches):
        share = (index + 1) * n // len(batches) - index * n // len(batches)
        share = min(share, len(batch))
        chosen.extend(batch[(2 * j + 1) * len(batch) // (2 * share)] for j in range(share))
    return chosen
