"""Sweep-scale costs: every ratio of the sweep-speed issue against its target.

    python benchmarks/sweep.py                       # SmolLM2, 64 facts, layers 1 and 20
    python benchmarks/sweep.py --facts 8 --layer-facts 4 --layers 1 2   # a quick check

Each grid point runs as ``editexp`` in its own process and reports its phases in summary.json.
Grid points that must compute their own values get a cache directory of their own (models,
statistics, prefixes and pre-edit scores linked from ``$EDITEXP_CACHE_DIR``, values and keys
empty), so no measurement reads what another one computed, unless sharing is the point:

1. singular vs batch: MEMIT on the same ``--facts`` facts, GE on all of them, each with an
   empty value cache. Cost = keys_values + solve + evaluation (statistics and the pre-edit
   scores are warmed up before, for both).
2. lambda search: one multirun of MEMIT batch at 3 lambdas sharing one cache: the 2nd and 3rd
   grid points read every value (their keys_values under 5% of the first's).
3. layer search: ROME and MEMIT singular at two layers (``--layers``) on ``--layer-facts``
   facts, one multirun sharing one cache, run one point after another (basic launcher): values
   per fact at the deeper layer vs layer 1 (ROME, which computes them; MEMIT reads them).
4. the same layer search as a local multirun (``hydra/launcher=local``, its own empty cache):
   its wall time vs the basic launcher's.
5. in this process: scoring per fact (no GE) and GE per fact for ``--facts`` facts batched,
   and GE per fact in singular mode (every row with its own fact's rank-one update).

It prints each ratio with its target and a cost table of the paper's presets at the scale of
the SmolLM2 study, extrapolated from the measured unit costs (``--study-table``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = ("models", "stats", "prefixes", "pre_edit", "data")  # cache parts every point may share

# The reference code's per-fact costs on this 2-core CPU (SmolLM2, layer 1), from the notes.
PAPER_VALUES_PER_FACT = 12.4
PAPER_SCORING_PER_FACT = 1.64
PAPER_GE_PER_FACT = 5.6
PAPER_ROME_EDIT = 31.2  # a ROME singular edit (values and its own key computation)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=64, help="facts of parts 1, 2 and 5")
    parser.add_argument("--layer-facts", type=int, default=16, help="facts per layer search point")
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 20])
    parser.add_argument("--lambdas", default="1000,10000,100000")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench-sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--stats-tokens", type=int, default=None, help="stats.n_tokens override")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: 1 2 3 4 5")
    return parser.parse_args()


@dataclass
class Ratio:
    name: str
    value: float
    target: float
    higher_is_better: bool = False

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "NOT met"
        return f"{self.name:<58} {self.value:9.3f}   target {sign} {self.target:<6g} {verdict}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base_cache = Path(os.environ.get("EDITEXP_CACHE_DIR", Path.home() / ".cache/editexp"))
        self.workdir = args.workdir
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.common = [f"model={args.model}", "logger=none", "save_deltas=false"]
        if args.stats_tokens:
            self.common.append(f"stats.n_tokens={args.stats_tokens}")

    def fresh_cache(self, name: str) -> Path:
        """A cache root sharing models, statistics, prefixes and pre-edit scores with the base
        cache, with no values or keys."""
        root = self.workdir / f"cache-{name}"
        root.mkdir()
        for part in SHARED:
            (self.base_cache / part).mkdir(parents=True, exist_ok=True)
            (root / part).symlink_to(self.base_cache / part)
        return root

    def editexp(self, overrides: list[str], cache: Path, multirun: bool = False) -> float:
        """Run ``editexp`` (wall seconds); fails loudly."""
        env = {**os.environ, "EDITEXP_CACHE_DIR": str(cache)}
        if self.args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.args.threads)
        command = [sys.executable, "-m", "editexp.runner", *(["-m"] if multirun else [])]
        command += [*self.common, *overrides]
        start = time.perf_counter()
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
        return seconds


def summaries(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.rglob("summary.json"))]


def work(summary: dict) -> float:
    """Seconds of a grid point's own work: values and keys, solves, post-edit evaluation."""
    timing = summary["timing"]
    return timing["keys_values"] + timing["solve"] + timing["evaluation"]


def warm_up(bench: Bench, args: argparse.Namespace) -> None:
    """Statistics of both layers, prefixes and the pre-edit scores of all run shapes."""
    n, low, high = args.facts, *args.layers
    print("warm-up: statistics, prefixes, pre-edit scores ...", flush=True)
    for overrides in (
        [f"n_edits={n}", f"eval.generation_facts={n}", f"layer={low}"],
        [
            f"n_edits={args.layer_facts}",
            f"layer={high}",
            "+experiment=layer_search",
            "eval.generation_facts=0",
        ],
        [f"n_edits={n}", "eval.generation_facts=4", f"layer={low}"],
    ):
        bench.editexp(
            [*overrides, f"hydra.run.dir={bench.workdir}/warmup-{len(os.listdir(bench.workdir))}"],
            bench.base_cache,
        )


def singular_vs_batch(
    bench: Bench, args: argparse.Namespace, units: dict[str, float]
) -> list[Ratio]:
    """1. The cost of singular mode against batch mode, and values per fact at batch n."""
    n, low = args.facts, args.layers[0]
    print("1. singular vs batch ...", flush=True)
    costs = {}
    for mode in ("batch", "singular"):
        run_dir = bench.workdir / f"pair-{mode}"
        bench.editexp(
            [
                f"mode={mode}",
                "algorithm=memit",
                f"n_edits={n}",
                f"layer={low}",
                f"eval.generation_facts={n}",
                f"hydra.run.dir={run_dir}",
            ],
            bench.fresh_cache(f"pair-{mode}"),
        )
        (summary,) = summaries(run_dir)
        costs[mode] = work(summary)
        if mode == "batch":
            units["values_per_fact"] = summary["timing"]["keys_values"] / n
    work_ratio = costs["singular"] / costs["batch"]
    return [
        Ratio(f"singular / batch cost, {n} facts, GE on all", work_ratio, 1.3),
        Ratio(
            f"values per fact at batch {n}: speedup over the paper's code",
            PAPER_VALUES_PER_FACT / units["values_per_fact"],
            6.0,
            True,
        ),
    ]


def lambda_search(bench: Bench, args: argparse.Namespace) -> list[Ratio]:
    """2. A lambda search: later grid points read the first one's values."""
    print("2. lambda search ...", flush=True)
    sweep = bench.workdir / "lambda"
    bench.editexp(
        [
            "algorithm=memit",
            "mode=batch",
            f"n_edits={args.facts}",
            f"layer={args.layers[0]}",
            "eval.generation_facts=4",
            f"lambda={args.lambdas}",
            f"hydra.sweep.dir={sweep}",
        ],
        bench.fresh_cache("lambda"),
        multirun=True,
    )
    points = sorted(summaries(sweep), key=lambda s: s["run_dir"])
    first = points[0]["timing"]["keys_values"]
    worst = max(point["timing"]["keys_values"] for point in points[1:])
    return [Ratio("lambda search: keys_values of a later point / the first", worst / first, 0.05)]


def layer_search(bench: Bench, args: argparse.Namespace, units: dict[str, float]) -> list[Ratio]:
    """3/4. The layer search preset with the basic (and, unless skipped, the local) launcher."""
    low, high = args.layers
    preset = [
        "+experiment=layer_search",
        f"n_edits={args.layer_facts}",
        "eval.generation_facts=0",
        f"layer={low},{high}",
    ]
    ratios: list[Ratio] = []
    walls = {}
    for launcher in ("basic", "local"):
        if launcher == "local" and "4" in args.skip:
            continue
        print(f"3/4. layer search, {launcher} launcher ...", flush=True)
        sweep = bench.workdir / f"layers-{launcher}"
        walls[launcher] = bench.editexp(
            [*preset, f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}"],
            bench.fresh_cache(f"layers-{launcher}"),
            multirun=True,
        )
        if launcher == "basic":
            ratios += layer_ratios(summaries(sweep), args, units)
    if "local" in walls:
        wall = walls["local"] / walls["basic"]
        ratios.append(Ratio("4-point local multirun / basic launcher, wall time", wall, 1.0))
    return ratios


def layer_ratios(
    points: list[dict], args: argparse.Namespace, units: dict[str, float]
) -> list[Ratio]:
    """Values per fact by layer, and MEMIT's keys_values against ROME's at the same layer."""
    low, high = args.layers
    by_point = {(s["algorithm"], s["layer"][0]): s for s in points}
    rome = {layer: by_point[("rome", layer)]["timing"]["keys_values"] for layer in (low, high)}
    memit = {layer: by_point[("memit", layer)]["timing"]["keys_values"] for layer in (low, high)}
    units[f"values_per_fact_layer{low}"] = rome[low] / args.layer_facts
    units[f"values_per_fact_layer{high}"] = rome[high] / args.layer_facts
    return [
        Ratio(f"values per fact, layer {high} / layer {low}", rome[high] / rome[low], 0.5),
        Ratio(
            "layer search: MEMIT keys_values / ROME's (same layer)",
            max(memit[layer] / rome[layer] for layer in (low, high)),
            0.05,
        ),
    ]


def scoring_and_generation(
    bench: Bench, args: argparse.Namespace, units: dict[str, float]
) -> list[Ratio]:
    """5. Scoring and GE per fact, in process."""
    n = args.facts
    print("5. scoring and GE per fact ...", flush=True)
    units.update(in_process_units(args, bench))
    return [
        Ratio(
            "scoring per fact: speedup over the paper's code",
            PAPER_SCORING_PER_FACT / units["scoring_per_fact"],
            10.0,
            True,
        ),
        Ratio(f"GE seconds per fact, {n} facts batched", units["ge_per_fact"], 2.0),
        Ratio(
            f"GE seconds per fact, {n} facts singular (per-row edits)",
            units["ge_per_fact_singular"],
            2.0,
        ),
    ]


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    low, high = args.layers
    ratios: list[Ratio] = []
    units: dict[str, float] = {}
    warm_up(bench, args)
    if "1" not in args.skip:
        ratios += singular_vs_batch(bench, args, units)
    if "2" not in args.skip:
        ratios += lambda_search(bench, args)
    if "3" not in args.skip or "4" not in args.skip:
        ratios += layer_search(bench, args, units)
    if "5" not in args.skip:
        ratios += scoring_and_generation(bench, args, units)
    print("\nunit costs (s):", json.dumps({k: round(v, 4) for k, v in units.items()}))
    print("\n".join(["", "ratio" + " " * 54 + "measured", *[r.line() for r in ratios]]))
    needed = {f"values_per_fact_layer{low}", f"values_per_fact_layer{high}", "scoring_per_fact"}
    if needed <= set(units):
        print("\n" + study_cost_table(units, low, high))


# --------------------------------------------------------------------------- the cost table


@dataclass
class Preset:
    """The work of one experiment at the scale of the SmolLM2 study (issue 14): values
    computed once per (fact, layer) thanks to the cache, every post-edit fact scoring, every
    post-edit GE fact; and what the paper's code does for the same grid (no sharing)."""

    name: str
    values_at: dict[int, int]  # layer -> facts whose values are computed (once)
    scorings: int  # post-edit fact scorings, all grid points
    generations: int  # post-edit facts with GE, all grid points
    paper_values: int  # value computations of the paper's code (every grid point its own)
    paper_rome_edits: int = 0  # of those, ROME singular edits (31.2 s each there)


N_LAYERS, BEST_LAYER = 30, 1


def study_presets() -> list[Preset]:
    layer_points = 2 * N_LAYERS  # ROME and MEMIT at every layer
    batch_sizes = [16, 64, 256, 1024, 2048]
    # sequential: (total, batch) runs per algorithm; values of the first batch are the
    # batch-scaling ones (cached), later batches run on an edited model and are computed
    sequential = [
        ("rome", 256, 1),
        *[(a, 256, b) for a in ("memit", "emmet") for b in (16, 64, 256)],
        ("memit", 1024, 256),
        ("memit", 1024, 1024),
    ]
    return [
        Preset(
            "layer search (30 layers x ROME/MEMIT, 100 facts singular, GE on 20)",
            {layer: 100 for layer in range(N_LAYERS)},
            layer_points * 100,
            layer_points * 20,
            paper_values=layer_points * 100,
            paper_rome_edits=N_LAYERS * 100,
        ),
        Preset(
            "lambda search (9 MEMIT + 7 EMMET lambdas, batch of 256, GE on 4)",
            {BEST_LAYER: 256},
            16 * 256,
            16 * 4,
            paper_values=16 * 256,
        ),
        Preset(
            "batch scaling (16 .. 2048, MEMIT and EMMET, GE on 4)",
            {BEST_LAYER: max(batch_sizes)},
            2 * sum(batch_sizes),
            2 * len(batch_sizes) * 4,
            paper_values=2 * sum(batch_sizes),
        ),
        Preset(
            "sequential (256 as 256x1 .. 1x256, 1024 as 4x256 and 1x1024; each_batch)",
            {BEST_LAYER: sum(total - size for _, total, size in sequential)},
            sum(total for _, total, _ in sequential),
            len(sequential) * 4,
            paper_values=sum(total for _, total, _ in sequential),
            paper_rome_edits=256,
        ),
    ]


def study_cost_table(units: dict[str, float], low: int, high: int) -> str:
    """Hours of each preset on this machine, from the measured unit costs: values per fact
    interpolated linearly in the number of layers above the edited one between the two
    measured layers; statistics and pre-edit scores (computed once per model) left out."""
    v_low, v_high = units[f"values_per_fact_layer{low}"], units[f"values_per_fact_layer{high}"]
    slope = (v_low - v_high) / (high - low)  # seconds per fact per layer skipped

    def values_per_fact(layer: int) -> float:
        return max(v_high + slope * (high - layer), 0.0)

    scoring, ge = units["scoring_per_fact"], units.get("ge_per_fact", PAPER_GE_PER_FACT)
    lines = [
        "| experiment (SmolLM2 study scale) | values | scorings | GE facts | editexp (h) "
        "| paper's code (h) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = [0.0, 0.0]
    for preset in study_presets():
        ours = sum(n * values_per_fact(layer) for layer, n in preset.values_at.items())
        ours += preset.scorings * scoring + preset.generations * ge
        paper = (preset.paper_values - preset.paper_rome_edits) * PAPER_VALUES_PER_FACT
        paper += preset.paper_rome_edits * PAPER_ROME_EDIT
        paper += preset.scorings * PAPER_SCORING_PER_FACT + preset.generations * PAPER_GE_PER_FACT
        totals[0] += ours
        totals[1] += paper
        lines.append(
            f"| {preset.name} | {sum(preset.values_at.values())} | {preset.scorings} "
            f"| {preset.generations} | {ours / 3600:.1f} | {paper / 3600:.1f} |"
        )
    lines.append(
        f"| **all four** | | | | **{totals[0] / 3600:.1f}** | **{totals[1] / 3600:.1f}** |"
    )
    return "\n".join(lines)


def in_process_units(args: argparse.Namespace, bench: Bench) -> dict[str, float]:
    """Scoring and GE seconds per fact, measured here on the model of the run."""
    import torch
    from hydra import compose, initialize_config_dir

    from editexp.config import CONFIG_DIR
    from editexp.data.counterfact import load_counterfact, select_facts
    from editexp.evaluation.counterfact_eval import evaluate_facts
    from editexp.models import load_model
    from editexp.row_edits import RankOneEdits, RowEdits

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["EDITEXP_CACHE_DIR"] = str(bench.base_cache)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "~logger"])
    loaded = load_model(cfg.model, "auto")
    facts, _ = load_counterfact(cfg.data)
    facts = select_facts(facts, args.facts, seed=0)
    n = len(facts)

    def timed(**kwargs) -> float:
        start = time.perf_counter()
        evaluate_facts(loaded.model, loaded.tokenizer, facts, progress=False, **kwargs)
        return time.perf_counter() - start

    scoring = timed()
    with_ge = timed(generation_facts=n)
    d_v, d_k = loaded.weight(args.layers[0]).shape
    generator = torch.Generator().manual_seed(0)
    edits = RankOneEdits(
        args.layers[0],
        1e-3 * torch.randn(n, d_v, generator=generator),
        1e-3 * torch.randn(n, d_k, generator=generator),
    )
    singular = timed(generation_facts=n, edits=RowEdits.for_model(loaded, edits))
    return {
        "scoring_per_fact": scoring / n,
        "ge_per_fact": (with_ge - scoring) / n,
        "ge_per_fact_singular": (singular - scoring) / n,
    }


if __name__ == "__main__":
    main()
