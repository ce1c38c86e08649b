"""fp32 against bf16 on SmolLM2, per phase, in one run: speed and per-fact agreement.

    python benchmarks/precision.py --out benchmarks/results/precision-smollm2-2cpu.txt
    python benchmarks/precision.py --facts 4 --ge-facts 2 --stats-tokens 2000   # a quick check

Run it alone on the machine. For each precision (``32-true``, ``bf16-mixed``, ``bf16-true``;
editexp/precision.py), from an empty cache, on the first ``--facts`` CounterFact facts:

- statistics: C0 at layer 5 over ``--stats-tokens`` tokens of the model's corpus;
- values: delta* at layer 1 and at layer 5, all facts in one batch;
- scoring: the facts' rewrite, paraphrase and neighbourhood prompts (pre-edit);
- GE: the sampled continuations of ``--ge-facts`` facts (scoring them subtracted);
- a MEMIT edit of the facts at layer 5 (the model's lambda), scored again.

Then each bf16 setting against ``32-true``: seconds per fact and the ratio per phase, the
per-fact agreement of the ES, PS and NS values (3 per fact) before and after the edit, the
post-edit S, and for ``bf16-true`` the rounding of the edit into bfloat16 weights,
||round(W + Delta) - (W + Delta)|| / ||Delta||.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editexp.cache import cache_root
from editexp.config import compose
from editexp.data.counterfact import Fact, load_counterfact, select_facts
from editexp.editing.editor import Editor, as_request
from editexp.editing.values import compute_values
from editexp.evaluation.counterfact_eval import FactScores
from editexp.evaluation.evaluator import Evaluator
from editexp.evaluation.metrics import aggregate
from editexp.models import load_model

PROJECT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
PHASES = ("statistics", "values L1", "values L5", "scoring", "GE")
OUTCOMES = ("ES", "PS", "NS")


@dataclass
class Measured:
    """One precision's seconds per fact (statistics: per 1000 tokens) and scores."""

    precision: str
    seconds: dict[str, float] = field(default_factory=dict)
    pre: list[FactScores] = field(default_factory=list)
    post: list[FactScores] = field(default_factory=list)
    post_fp32_prefixes: list[FactScores] | None = None  # edited with 32-true's prefixes
    prefixes: list[str] = field(default_factory=list)
    rounding: float | None = None  # bf16 weights: the edit's rounding, relative to ||Delta||


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--ge-facts", type=int, default=16)
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--out", type=Path, help="also write the table here")
    return parser.parse_args()


def timed(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(
    args: argparse.Namespace, precision: str, facts: list[Fact], fp32_prefixes: list[str] | None
) -> Measured:
    """Every phase of one precision, from a cache of its own; with ``fp32_prefixes`` (when
    they differ from this precision's own) the edit is made and scored once more with them."""
    out = Measured(precision)
    cfg = compose(
        args.model,
        "memit",
        precision=precision,
        layer=5,
        mode="batch",
        n_edits=len(facts),
        **{"stats.n_tokens": args.stats_tokens, "eval.held_out_keys": 0},
    )
    loaded = load_model(cfg.model, "cpu", precision)
    editor = Editor(loaded, cfg)  # computes C0 at layer 5
    out.prefixes = editor.prefixes
    out.seconds["statistics"] = editor.statistics_seconds / args.stats_tokens * 1000
    requests = [as_request(fact) for fact in facts]
    _, seconds = timed(
        compute_values, loaded, requests, editor.prefixes, 1, editor.hparams,
        batch_size=len(facts), progress=False,
    )  # fmt: skip
    out.seconds["values L1"] = seconds / len(facts)
    evaluator = Evaluator.from_config(loaded, cfg)
    out.pre, seconds = timed(evaluator.score, facts)
    out.seconds["scoring"] = seconds / len(facts)
    ge_facts = facts[: args.ge_facts]
    _, seconds = timed(evaluator.score, ge_facts, {fact.case_id for fact in ge_facts})
    out.seconds["GE"] = (seconds - out.seconds["scoring"] * len(ge_facts)) / len(ge_facts)
    edit_and_score(editor, evaluator, facts, out)
    if fp32_prefixes is not None and fp32_prefixes != editor.prefixes:
        editor.prefixes = fp32_prefixes
        out.post_fp32_prefixes = edit_and_score(editor, evaluator, facts)
    return out


def edit_and_score(
    editor: Editor, evaluator: Evaluator, facts: list[Fact], out: Measured | None = None
) -> list[FactScores]:
    """One MEMIT update of ``facts`` at layer 5, scored, then reverted; into ``out``: the
    values' seconds per fact, the post-edit scores and (bf16 weights) the edit's rounding."""
    loaded = editor.model
    weight = loaded.weight(5).detach().clone()
    update = editor.edit(facts)
    post = evaluator.score(facts)
    if out is not None:
        out.seconds["values L5"] = update.timing["keys_values"] / len(facts)
        out.post = post
        if loaded.precision.weights == torch.bfloat16:
            exact = weight.double() + update.deltas[5].double()
            error = (loaded.weight(5).double() - exact).norm()
            out.rounding = float(error / update.deltas[5].norm())
    update.revert()
    return post


def agreement(first: list[FactScores], second: list[FactScores]) -> tuple[int, int]:
    """How many of the facts' ES, PS and NS values are equal, of how many."""
    pairs = [
        (a.metrics()[name], b.metrics()[name])
        for a, b in zip(first, second, strict=True)
        for name in OUTCOMES
    ]
    return sum(x == y for x, y in pairs), len(pairs)


def s_of(results: list[FactScores]) -> float:
    return aggregate([result.metrics() for result in results])["S"]["mean"]


def table(args: argparse.Namespace, runs: dict[str, Measured]) -> str:
    base = runs["32-true"]
    columns = ["phase", *runs, *(f"{name} speed-up" for name in runs if name != "32-true")]
    lines = [
        f"{args.model}, {args.facts} facts (GE on {args.ge_facts}), MEMIT at layer 5 for the "
        f"post-edit scores, C0 over {args.stats_tokens} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; seconds per fact (statistics: per 1000 tokens)",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    for phase in PHASES:
        seconds = [f"{run.seconds[phase]:.3f}" for run in runs.values()]
        ratios = [
            f"{base.seconds[phase] / run.seconds[phase]:.2f}x"
            for name, run in runs.items()
            if name != "32-true"
        ]
        lines.append(f"| {phase} | " + " | ".join(seconds + ratios) + " |")
    lines.append("")
    for name, run in runs.items():
        pre_same, n = agreement(base.pre, run.pre)
        post_same, _ = agreement(base.post, run.post)
        rounding = "" if run.rounding is None else f"; edit rounding {run.rounding:.3f}"
        lines.append(
            f"{name}: pre-edit agreement {pre_same}/{n} ({100 * pre_same / n:.1f}%), post-edit "
            f"{post_same}/{n} ({100 * post_same / n:.1f}%); S pre {s_of(run.pre):.2f}, post "
            f"{s_of(run.post):.2f}{rounding}; same prefixes as 32-true: "
            f"{run.prefixes == base.prefixes}"
        )
        if run.post_fp32_prefixes is not None:
            same, _ = agreement(base.post, run.post_fp32_prefixes)
            lines.append(
                f"{name}, edited with 32-true's prefixes: post-edit agreement {same}/{n} "
                f"({100 * same / n:.1f}%), S {s_of(run.post_fp32_prefixes):.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    facts = select_facts(load_counterfact(compose(args.model).data)[0], args.facts)
    models = cache_root() / "models"  # the dequantized model is shared; nothing else
    runs = {}
    for precision in PRECISIONS:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["EDITEXP_CACHE_DIR"] = cache  # nothing read from an earlier run
            (Path(cache) / "models").symlink_to(models, target_is_directory=True)
            fp32_prefixes = runs["32-true"].prefixes if runs else None
            runs[precision] = measure(args, precision, facts, fp32_prefixes)
        print(f"{precision}: {runs[precision].seconds}", flush=True)
    text = table(args, runs)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
