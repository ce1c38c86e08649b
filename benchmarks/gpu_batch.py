"""One MEMIT batch on a random model with Llama-3-8B's shapes, timed per phase.

    python benchmarks/gpu_batch.py                     # a GPU: 1024 facts at layer 1, bf16-mixed
    python benchmarks/gpu_batch.py --shape small --facts 8 --device cpu --precision 32-true
                                                       # a quick check of the script itself

A random-initialised model costs the same as the real one and needs no download: the Llama-3
tokenizer, Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads), in
``--precision`` (``bf16-mixed``: float32 weights, bfloat16 matmuls). Statistics C0 come from a
short corpus of random tokens (``--stats-tokens``, its cost does not depend on the text); then
one ``editexp`` run edits the first ``--facts`` CounterFact facts in one MEMIT batch and scores
them, and its ``summary.json`` gives the time of each phase. The paper's 4096-fact batch is
extrapolated from it: values and scoring grow linearly with the facts, the solve (one d_k x d_k
system, d_k = 14336) is taken as measured.
Prints a table and writes it to ``--out`` (a text file) as well.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from editexp.config import CONFIG_DIR, compose
from editexp.models import build_tokenizer
from editexp.precision import PRECISIONS
from editexp.record import RunRecord
from editexp.runner import run

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "small": dict(  # the same code path in seconds on a CPU
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
TARGET_FACTS = 4096
TARGET_MINUTES = 30  # issue 10: the paper's 4096-edit batch on one H100


def model_config(shape: str) -> dict:
    """The llama3-8b model config (its value hyperparameters and lambdas), with random weights
    of ``shape`` on the Llama-3 tokenizer instead of the downloaded model."""
    model = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / "llama3-8b.yaml"))
    architecture = {
        "model_type": "llama",
        **SHAPES[shape],
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }
    model.update(
        name=f"random-{shape}",
        source="random",
        path=None,
        tokenizer="llama3",
        init_seed=0,
        architecture=architecture,
        n_layers=architecture["num_hidden_layers"],
        stats={**model["stats"], "dataset": None},  # the random-token file instead
    )
    return model


def random_corpus(path: Path, n_tokens: int) -> Path:
    """Text of random Llama-3 tokens (ordinary ones, no special tokens), in lines of 200."""
    tokenizer = build_tokenizer("llama3")
    rng = random.Random(0)
    lines = []
    for _ in range(n_tokens // 200 + 2):
        ids = [rng.randrange(0, 128000) for _ in range(200)]
        lines.append(tokenizer.decode(ids).replace("\n", " "))
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--precision", default="bf16-mixed", choices=list(PRECISIONS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--facts", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=64, help="values computed together")
    parser.add_argument("--out", type=Path, help="also write the table here")
    return parser.parse_args()


def one_batch_run(args: argparse.Namespace) -> tuple[RunRecord, float]:
    """A MEMIT batch run at the benchmark's shape, from a fresh cache; its record, wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("EDITEXP_CACHE_DIR", str(Path(tmp) / "cache"))  # nothing reused
        corpus = random_corpus(Path(tmp) / "random-tokens.txt", args.stats_tokens)
        cfg = compose(
            model_config(args.shape),
            "memit",
            mode="batch",
            n_edits=args.facts,
            layer=args.layer,
            device=args.device,
            precision=args.precision,
            save_deltas=False,
            **{
                "stats.corpus.files": [str(corpus)],
                "stats.n_tokens": args.stats_tokens,
                "editing.batch_size": args.batch_size,
                "eval.generation_facts": 0,
                "eval.held_out_keys": 0,
            },
        )
        started = time.perf_counter()
        record = run(cfg, Path(tmp) / "run")
        return record, time.perf_counter() - started


def timing_table(args: argparse.Namespace, record: RunRecord, wall: float) -> str:
    """Each phase's seconds, measured and extrapolated to TARGET_FACTS, against the target."""
    timing = record.timing
    scale = TARGET_FACTS / args.facts
    extrapolated = {
        "statistics": timing["statistics"],
        "keys_values": timing["keys_values"] * scale,
        "solve": timing["solve"],
        "evaluation": timing["evaluation"] * scale,
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"MEMIT, one batch, {args.shape} shapes (random weights), {args.precision}, layer "
        f"{args.layer}, on {device}; C0 over {args.stats_tokens:,} random tokens",
        f"{'phase':<14}{f'{args.facts} facts (s)':>18}"
        f"{f'{TARGET_FACTS} facts (s, extrapolated)':>34}",
    ]
    for phase, seconds in extrapolated.items():
        lines.append(f"{phase:<14}{timing[phase]:>18.1f}{seconds:>34.1f}")
    total = sum(extrapolated.values())
    post = {key: round(record.post[key]["mean"], 1) for key in ("ES", "PS", "NS")}
    lines.append(f"{'total':<14}{timing['total']:>18.1f}{total:>34.1f}")
    lines.append(
        f"whole script {wall:.0f} s (model init and load included); {TARGET_FACTS} facts: "
        f"{total / 60:.1f} min against the target of {TARGET_MINUTES} min "
        f"({'met' if total / 60 <= TARGET_MINUTES else 'NOT met'}); "
        f"post ES/PS/NS {json.dumps(post)}"
    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    record, wall = one_batch_run(args)
    text = timing_table(args, record, wall)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
