"""GE sampling cost against the generation batch size (``eval.generation_batch_size``).

    python benchmarks/generation.py                          # SmolLM2, 256 prompts, 64 and 256
    python benchmarks/generation.py --prompts 64 --sizes 16 64 --length 40    # a quick check

Samples the CounterFact generation prompts of the first facts (10 per fact) to
``--length`` tokens, prompt included, at every batch size in one run, and prints the seconds per
fact (10 prompts), the speedup over the first size, and whether every size sampled the same
ids (each prompt has its own seed, so the batch size must not change the text). Sampling is
one token of every prompt per step: the matrix products of a step have as many rows as the
batch has prompts, and on a CPU they run faster with more rows.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR
from editexp.data.counterfact import load_counterfact
from editexp.models import load_model
from editexp.sampling import generation_seed, sample_continuation_ids

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--length", type=int, default=100, help="tokens, prompt included")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(REPO.parent / "shared" / "data"))

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "logger=none"])
    loaded = load_model(cfg.model, cfg.device)
    facts, _ = load_counterfact(cfg.data)
    prompts, seeds = [], []
    for fact in facts:
        for index, prompt in enumerate(fact.generation_prompts):
            prompts.append(prompt)
            seeds.append(generation_seed(0, fact.case_id, index))
    prompts, seeds = prompts[: args.prompts], seeds[: args.prompts]
    print(
        f"model {args.model}, {len(prompts)} prompts to {args.length} tokens, "
        f"torch threads {torch.get_num_threads()}, device {loaded.device}"
    )

    first_cost, first_ids = None, None
    for size in args.sizes:
        start = time.perf_counter()
        ids = sample_continuation_ids(
            loaded.model, loaded.tokenizer, prompts, args.length, 5, seeds, size
        )
        per_fact = (time.perf_counter() - start) / len(prompts) * 10
        first_cost, first_ids = first_cost or per_fact, first_ids or ids
        print(
            f"batch of {size:4d} prompts: {per_fact:6.2f} s per fact (10 prompts), "
            f"{first_cost / per_fact:4.2f}x the first size; same ids as the first size: "
            f"{ids == first_ids}"
        )


if __name__ == "__main__":
    main()
