"""Which input of a batch edit bf16-mixed moves: the keys K, the values V or C0.

    python benchmarks/precision_inputs.py --point emmet-1x1024            # edits only
    python benchmarks/precision_inputs.py --point emmet-1x1024 --score    # and their ES/PS/NS

For one grid point of ``benchmarks/precision_study.py`` (a single batch), each of the three
inputs of the closed form is read in 32-true and in bf16-mixed (values and keys through the
sweep's caches, so after ``precision_study.py`` ran the point they are read, not computed);
then the update is solved for all 8 combinations, always in float64 as the runner does, and
compared with the all-32-true update: ||Delta - Delta_32|| / ||Delta_32||. With ``--score``,
the updates that take one input from bf16-mixed (and the all-32-true one) are added to the
32-true model and scored in 32-true; the per-fact ES/PS/NS are compared with the all-32-true
update's as ``precision_study.py`` compares runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from precision_study import METRICS, POINTS, PRECISIONS, compare, row

from editexp.config import CONFIG_DIR, run_settings
from editexp.editing.deltas import add_to_weight
from editexp.editing.editor import Editor, as_request
from editexp.editing.solvers import closed_form_delta
from editexp.editing.value_cache import keys_for, values_for
from editexp.evaluation.evaluator import Evaluator
from editexp.models import load_model
from editexp.run_inputs import read_inputs
from editexp.runner import evaluator_for

PROJECT = Path(__file__).resolve().parents[1]
INPUTS = ("keys", "values", "C0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", default="emmet-1x1024", choices=list(POINTS))
    parser.add_argument("--score", action="store_true", help="also score the updates")
    return parser.parse_args()


def point_config(point: str, precision: str):
    overrides = ["model=smollm2-135m", "logger=none", f"precision={precision}", *POINTS[point]]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def read_inputs_in(point: str, precision: str):
    """The point's keys (d_k, E), value residuals (d_v, E) and C0 factor in ``precision``,
    with its facts, Editor and config."""
    cfg = point_config(point, precision)
    settings = run_settings(cfg)
    if settings.mode != "batch" or len(settings.layers) != 1:
        raise SystemExit(f"--point {point}: expected one batch at one layer")
    facts, _ = read_inputs(cfg, settings)
    editor = Editor(load_model(cfg.model, cfg.device, precision), cfg)
    loaded, layer = editor.model, settings.layers[0]
    requests = [as_request(fact, index) for index, fact in enumerate(facts)]
    cache = editor.sweep_cache(len(facts))
    batch = int(cfg.editing.batch_size)
    with loaded.compute():
        values = values_for(
            loaded, requests, editor.prefixes, layer, editor.hparams, batch, False, cache
        )
        keys = keys_for(loaded, requests, editor.prefixes, layer, batch, cache)
    inputs = {"keys": keys, "values": values.deltas.T, "C0": editor.covariances[layer]}
    return inputs, facts, editor, cfg


def score(
    editor: Editor, evaluator: Evaluator, facts, delta: torch.Tensor
) -> dict[int, dict[str, float]]:
    """Per fact ES/PS/NS in percent after adding ``delta`` to the (32-true) model."""
    loaded, layer = editor.model, editor.settings.layers[0]
    weight = loaded.weight(layer)
    original = weight.detach().clone()
    add_to_weight(loaded, layer, delta.to(torch.float32))
    try:
        results = evaluator.score(facts)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return {r.case_id: {m: 100 * r.metrics()[m] for m in METRICS} for r in results}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    read = {precision: read_inputs_in(args.point, precision) for precision in PRECISIONS}
    inputs = {precision: read[precision][0] for precision in PRECISIONS}
    facts, editor, cfg = read["32-true"][1:]
    params = editor.plan.solve_params()
    for name in INPUTS:  # the C0 input is a statistics object: compare its matrix
        a, b = (getattr(inputs[p][name], "matrix", inputs[p][name]) for p in PRECISIONS)
        print(f"{name}: ||bf16-mixed - 32-true|| / ||32-true|| = "
              f"{float((b - a).norm() / a.norm()):.2e}")  # fmt: skip
    deltas = {}
    for choice in itertools.product(PRECISIONS, repeat=len(INPUTS)):
        taken = dict(zip(INPUTS, choice))
        pieces = [inputs[taken[name]][name] for name in INPUTS]
        deltas[choice] = closed_form_delta(editor.plan.algorithm, *pieces, params)
    base = deltas[("32-true",) * 3]
    print("\n| keys | values | C0 | ||Delta - Delta_32|| / ||Delta_32|| | ||Delta|| |")
    print("|---|---|---|---:|---:|")
    for choice, delta in deltas.items():
        relative = float((delta - base).norm() / base.norm())
        print(f"| {' | '.join(choice)} | {relative:.3e} | {float(delta.norm()):.1f} |")
    if not args.score:
        return
    evaluator = evaluator_for(editor.model, cfg, editor.settings)  # one for every scoring
    reference = score(editor, evaluator, facts, base)
    print("\n| bf16-mixed input | facts | S fp32 | S with it | ES diff | PS diff | NS diff | "
          "S diff | per-fact agreement |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index, name in enumerate(INPUTS):
        choice = tuple("bf16-mixed" if i == index else "32-true" for i in range(len(INPUTS)))
        scores = score(editor, evaluator, facts, deltas[choice])
        print(row(name, compare(reference, scores)), flush=True)


if __name__ == "__main__":
    main()
