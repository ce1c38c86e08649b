"""Benchmark of the editing step on SmolLM2 at layer 1 (CPU or GPU).

Prints seconds per fact for computing values v* (UME's objective, docs/fidelity.md) with the
batched engine at several batch sizes, next to UME's ``compute_z`` loop written plainly
(``plain_values``: one fact at a time, full sequences and logits every step) measured in the
same run, the Adam steps taken (the objective's early stop decides most of the cost), and the
seconds of each update solve.

    python benchmarks/editing.py                      # batch sizes 1, 16, 64
    python benchmarks/editing.py --sizes 1 4 --plain-facts 1 --stats-tokens 5000   # quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR, run_settings
from editexp.data.counterfact import load_counterfact, select_facts
from editexp.editing.editor import closed_form_delta
from editexp.editing.keys_values import EditRequest, compute_keys, compute_values
from editexp.editing.linalg import CovarianceFactor
from editexp.editing.plain_values import plain_values
from editexp.editing.prefixes import context_prefixes
from editexp.layer_stats import load_or_compute_stats
from editexp.models import load_model

PROJECT = Path(__file__).resolve().parents[1]


def steps_line(values, early_stop_loss: float) -> str:
    steps = values.steps.float()
    stopped = int((values.losses < early_stop_loss).sum())
    return (
        f"mean Adam steps {steps.mean():.1f}, max {int(steps.max())}; "
        f"{stopped}/{len(steps)} facts stopped early (loss < {early_stop_loss:g})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--plain-facts", type=int, default=3, help="facts for the plain baseline")
    parser.add_argument("--stats-tokens", type=int, default=50000)
    args = parser.parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"model={args.model}",
                f"layer={args.layer}",
                f"stats.n_tokens={args.stats_tokens}",
                "logger=none",
            ],
        )
    settings = run_settings(cfg)
    loaded = load_model(cfg.model, cfg.device)
    facts = select_facts(load_counterfact(cfg.data)[0], max(args.sizes + [args.plain_facts]))
    requests = [EditRequest(f.case_id, f.prompt, f.subject, f.target_new) for f in facts]
    prefixes = context_prefixes(
        loaded, cfg.editing.prefixes.count, cfg.editing.prefixes.length, cfg.editing.prefixes.seed
    )
    stats = load_or_compute_stats(loaded, [args.layer], cfg.stats, cfg.data, held_out_keys=0)
    covariance = CovarianceFactor(stats[args.layer].second_moment)
    print(
        f"model {args.model}, layer {args.layer}, {len(prefixes)} contexts per fact, "
        f"{settings.hparams.v_steps} max Adam steps, torch threads {torch.get_num_threads()}, "
        f"device {loaded.device}"
    )

    start = time.perf_counter()
    plain = plain_values(
        loaded, requests[: args.plain_facts], prefixes, args.layer, settings.hparams
    )
    plain_per_fact = (time.perf_counter() - start) / args.plain_facts
    print(
        f"UME's compute_z loop, one fact at a time: {plain_per_fact:6.2f} s/fact "
        f"({steps_line(plain, settings.hparams.early_stop_loss)})"
    )

    for size in args.sizes:
        start = time.perf_counter()
        values = compute_values(
            loaded,
            requests[:size],
            prefixes,
            args.layer,
            settings.hparams,
            batch_size=size,
            progress=False,
        )
        per_fact = (time.perf_counter() - start) / size
        same = values.deltas[: args.plain_facts]
        agreement = (same - plain.deltas[: len(same)]).norm() / plain.deltas[: len(same)].norm()
        steps = steps_line(values, settings.hparams.early_stop_loss)
        print(
            f"batched, {size:3d} facts per batch: {per_fact:6.2f} s/fact "
            f"({plain_per_fact / per_fact:4.1f}x faster than UME's loop; {steps}; "
            f"rel. difference of shared deltas {agreement:.1e})"
        )

    size = max(args.sizes)
    keys = compute_keys(loaded, requests[:size], prefixes, [args.layer])[args.layer]
    residuals = torch.randn(loaded.weight(args.layer).shape[0], size)
    memit_lambda = settings.lam if settings.lam is not None else 1000.0
    for algorithm, lam in (("memit", memit_lambda), ("emmet", 1e-4)):
        start = time.perf_counter()
        closed_form_delta(algorithm, keys, residuals, covariance, lam)
        print(
            f"{algorithm} solve for {size} facts: {time.perf_counter() - start:.3f} s "
            "(C0 already factored)"
        )
    start = time.perf_counter()
    CovarianceFactor(stats[args.layer].second_moment)
    print(f"factoring C0 once per layer: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
