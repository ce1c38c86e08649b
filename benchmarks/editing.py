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
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR, RunSettings, run_settings
from editexp.data.counterfact import load_counterfact, select_facts
from editexp.editing.keys import EditRequest, compute_keys
from editexp.editing.linalg import CovarianceFactor, SolveParams
from editexp.editing.plain_values import plain_values
from editexp.editing.prefixes import context_prefixes
from editexp.editing.solvers import closed_form_delta
from editexp.editing.values import Values, compute_values
from editexp.layer_stats import load_or_compute_stats
from editexp.models import LoadedModel, load_model

PROJECT = Path(__file__).resolve().parents[1]


def steps_line(values, early_stop_loss: float) -> str:
    steps = values.steps.float()
    stopped = int((values.losses < early_stop_loss).sum())
    return (
        f"mean Adam steps {steps.mean():.1f}, max {int(steps.max())}; "
        f"{stopped}/{len(steps)} facts stopped early (loss < {early_stop_loss:g})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--plain-facts", type=int, default=3, help="facts for the plain baseline")
    parser.add_argument("--stats-tokens", type=int, default=50000)
    return parser.parse_args()


@dataclass
class Setup:
    """What every benchmark here edits with: the model, the requests, prefixes and C0."""

    settings: RunSettings
    loaded: LoadedModel
    requests: list[EditRequest]
    prefixes: list[str]
    second_moment: torch.Tensor  # C0 (d_k, d_k) at the edited layer


def set_up(args: argparse.Namespace) -> Setup:
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
    loaded = load_model(cfg.model, cfg.device)
    facts = select_facts(load_counterfact(cfg.data)[0], max(args.sizes + [args.plain_facts]))
    requests = [EditRequest(f.case_id, f.prompt, f.subject, f.target_new) for f in facts]
    prefixes = context_prefixes(
        loaded, cfg.editing.prefixes.count, cfg.editing.prefixes.length, cfg.editing.prefixes.seed
    )
    stats = load_or_compute_stats(loaded, [args.layer], cfg.stats, cfg.data, held_out_keys=0)
    second_moment = stats[args.layer].second_moment
    return Setup(run_settings(cfg), loaded, requests, prefixes, second_moment)


def plain_baseline(args: argparse.Namespace, setup: Setup) -> tuple[Values, float]:
    """UME's compute_z loop, one fact at a time: its values and seconds per fact."""
    hparams = setup.settings.hparams
    start = time.perf_counter()
    requests = setup.requests[: args.plain_facts]
    plain = plain_values(setup.loaded, requests, setup.prefixes, args.layer, hparams)
    per_fact = (time.perf_counter() - start) / args.plain_facts
    print(
        f"UME's compute_z loop, one fact at a time: {per_fact:6.2f} s/fact "
        f"({steps_line(plain, hparams.early_stop_loss)})"
    )
    return plain, per_fact


def batched_values(
    args: argparse.Namespace, setup: Setup, plain: Values, plain_per_fact: float
) -> None:
    """Values computed in batches of each size, against the plain loop."""
    hparams = setup.settings.hparams
    for size in args.sizes:
        start = time.perf_counter()
        values = compute_values(
            setup.loaded,
            setup.requests[:size],
            setup.prefixes,
            args.layer,
            hparams,
            batch_size=size,
            progress=False,
        )
        per_fact = (time.perf_counter() - start) / size
        same = values.deltas[: args.plain_facts]
        agreement = (same - plain.deltas[: len(same)]).norm() / plain.deltas[: len(same)].norm()
        steps = steps_line(values, hparams.early_stop_loss)
        print(
            f"batched, {size:3d} facts per batch: {per_fact:6.2f} s/fact "
            f"({plain_per_fact / per_fact:4.1f}x faster than UME's loop; {steps}; "
            f"rel. difference of shared deltas {agreement:.1e})"
        )


def solves(args: argparse.Namespace, setup: Setup) -> None:
    """MEMIT's and EMMET's closed-form solves for the largest size, and factoring C0."""
    size, loaded = max(args.sizes), setup.loaded
    covariance = CovarianceFactor(setup.second_moment)
    keys = compute_keys(loaded, setup.requests[:size], setup.prefixes, [args.layer])[args.layer]
    residuals = torch.randn(loaded.weight(args.layer).shape[0], size)
    memit_lambda = setup.settings.lam if setup.settings.lam is not None else 1000.0
    for algorithm, lam in (("memit", memit_lambda), ("emmet", 1e-4)):
        start = time.perf_counter()
        closed_form_delta(algorithm, keys, residuals, covariance, SolveParams(lam))
        print(
            f"{algorithm} solve for {size} facts: {time.perf_counter() - start:.3f} s "
            "(C0 already factored)"
        )
    start = time.perf_counter()
    CovarianceFactor(setup.second_moment)
    print(f"factoring C0 once per layer: {time.perf_counter() - start:.3f} s")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    setup = set_up(args)
    print(
        f"model {args.model}, layer {args.layer}, {len(setup.prefixes)} contexts per fact, "
        f"{setup.settings.hparams.v_steps} max Adam steps, torch threads "
        f"{torch.get_num_threads()}, device {setup.loaded.device}"
    )
    plain, plain_per_fact = plain_baseline(args, setup)
    batched_values(args, setup, plain, plain_per_fact)
    solves(args, setup)


if __name__ == "__main__":
    main()
