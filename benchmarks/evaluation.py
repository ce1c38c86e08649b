"""CounterFact evaluation speed: batched scoring versus one (prompt, target) pair at a time.

    python benchmarks/evaluation.py [--model smollm2-135m] [--facts 32] [--generation-facts 2]

Scores the rewrite, paraphrase and neighbourhood prompts of ``--facts`` CounterFact facts
against (target_new, target_true) twice in the same run:

- batched: :func:`evaluate_facts` (shared-prompt KV cache, logits only at target positions,
  many facts per padded batch), no generation, on all facts in one call (or
  ``--chunk-facts`` per call);
- reference: one full forward per (prompt, target) with logits at every position, the way the
  reference runner scores.

With ``--chunk-facts`` the two alternate chunk by chunk, so that other jobs on a shared
machine slow both alike.
It prints facts/second (wall clock) and CPU seconds per fact for both, the speedup and the
largest score difference, then the seconds per fact of generation (GE: 10 prompts sampled to
100 tokens, plus that fact's scoring) on a few facts.
The data come from ``$EDITEXP_DATA_DIR`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR
from editexp.data.counterfact import load_counterfact, select_facts
from editexp.evaluation.counterfact_eval import evaluate_facts, fact_prompts
from editexp.evaluation.scoring import score_continuation_unbatched
from editexp.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument(
        "--chunk-facts",
        type=int,
        default=None,
        help="alternate the two methods every this many facts (default: all facts at once)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per scoring batch")
    parser.add_argument("--generation-facts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    return parser.parse_args()


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process (all its threads)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def timed(run: Callable[[], T]) -> tuple[T, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def rate_line(label: str, timing: Timing, n_facts: int, note: str) -> str:
    return (
        f"{label}: {n_facts / timing.wall:6.2f} facts/s wall ({timing.wall / n_facts:.3f} s/fact), "
        f"{timing.cpu / n_facts:.3f} CPU s/fact; {note}"
    )


def reference_scores(model, tokenizer, facts) -> list[list[tuple[float, float]]]:
    """Per fact, (score_new, score_true) of every prompt, one forward per pair."""
    out = []
    for fact in facts:
        pairs = []
        for prompts in fact_prompts(fact).values():
            for prompt in prompts:
                new = score_continuation_unbatched(model, tokenizer, prompt, fact.target_new)
                true = score_continuation_unbatched(model, tokenizer, prompt, fact.target_true)
                pairs.append((new, true))
        out.append(pairs)
    return out


def batched_against_reference(args: argparse.Namespace, lm: LoadedModel, facts: list) -> None:
    """ES/PS/NS scores batched against one forward per pair: speed and agreement. With
    ``--chunk-facts`` the two methods alternate chunk by chunk, so that load from other jobs on
    a shared machine falls on both alike."""
    batched, reference = [], []
    batched_time, reference_time = Timing(0.0, 0.0), Timing(0.0, 0.0)
    chunk_facts = args.chunk_facts or len(facts)
    for start in range(0, len(facts), chunk_facts):
        chunk = facts[start : start + chunk_facts]
        results, timing = timed(
            lambda chunk=chunk: evaluate_facts(
                lm.model, lm.tokenizer, chunk, batch_size=args.batch_size, progress=False
            )
        )
        batched.extend(results)
        batched_time = batched_time + timing
        results, timing = timed(lambda chunk=chunk: reference_scores(lm.model, lm.tokenizer, chunk))
        reference.extend(results)
        reference_time = reference_time + timing

    batched_pairs = [
        pair for result in batched for family in result.scores for pair in result.scores[family]
    ]
    reference_pairs = [pair for pairs in reference for pair in pairs]
    difference = max(
        abs(a - b) for x, y in zip(batched_pairs, reference_pairs) for a, b in zip(x, y)
    )
    n = len(facts)
    print(rate_line("ES/PS/NS batched  ", batched_time, n, f"batch_size={args.batch_size}"))
    print(rate_line("ES/PS/NS reference", reference_time, n, "one forward per pair, full logits"))
    print(
        f"speedup            : {reference_time.wall / batched_time.wall:.1f}x wall, "
        f"{reference_time.cpu / batched_time.cpu:.1f}x CPU time"
    )
    print(f"max |score difference| batched vs reference: {difference:.2e}")
    print(f"load average (1 min) after scoring: {os.getloadavg()[0]:.2f} (other jobs skew timings)")


def generation(args: argparse.Namespace, lm: LoadedModel, facts: list) -> None:
    """Seconds per fact of scoring with generation (GE) for ``--generation-facts`` facts."""
    generated = facts[: args.generation_facts]
    results, generation_time = timed(
        lambda: evaluate_facts(
            lm.model,
            lm.tokenizer,
            generated,
            batch_size=args.batch_size,
            generation_facts=len(generated),
            seed=args.seed,
            progress=False,
        )
    )
    seconds = generation_time.wall
    n_texts = sum(len(result.generation_texts or []) for result in results)
    ge = [round(100 * result.GE, 1) for result in results if result.GE is not None]
    print(
        f"generation (GE)    : {seconds / len(generated):.2f} s/fact including scoring "
        f"({n_texts} texts of 100 tokens; GE x100 per fact: {ge})"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = os.environ.get("EDITEXP_DATA_DIR") or str(REPO.parent / "shared" / "data")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"model={args.model}", f"data.dir={data_dir}", "~logger"]
        )
    lm = load_model(cfg.model, "cpu")
    all_facts, _ = load_counterfact(cfg.data)
    facts = select_facts(all_facts, args.facts, order="seeded", seed=args.seed)
    n_prompts = sum(len(prompts) for fact in facts for prompts in fact_prompts(fact).values())
    print(
        f"model={args.model} facts={len(facts)} prompts={n_prompts} "
        f"pairs={2 * n_prompts} torch_threads={torch.get_num_threads()} "
        f"load_average={os.getloadavg()[0]:.2f}"
    )
    evaluate_facts(lm.model, lm.tokenizer, facts[:2], progress=False)  # warm-up
    batched_against_reference(args, lm, facts)
    if args.generation_facts > 0:
        generation(args, lm, facts)


if __name__ == "__main__":
    main()
