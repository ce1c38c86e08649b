"""The study's finding-carrying grid points in fp32 and in bf16-mixed, compared fact by fact.

    python benchmarks/precision_study.py --out benchmarks/results/precision-study.md
    python benchmarks/precision_study.py --points layer1-memit layer5-memit   # a subset

Each point (``POINTS``: the settings of the first study's grid points,
docs/study-smollm2/first-study/README.md) runs once per precision into
``--runs/<point>/<precision>`` through the runner; a finished run is skipped, so the script
resumes where it stopped. Then, per point, over the edited facts: the paired difference
bf16-mixed - fp32 of each fact's post-edit ES, PS and NS (mean and standard error),
of S (the harmonic mean of the three means; standard error by a paired bootstrap over
facts), and the share of the per-fact ES/PS/NS values that are equal. For ``reference-64``
(docs/fidelity.md's run), also each precision against the paper code's numbers in
``../shared/reference``: its pre-edit ES/PS/NS per fact, and the post-edit means.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR
from editexp.runner import run

PROJECT = Path(__file__).resolve().parents[1]
REFERENCE = PROJECT.parent / "shared" / "reference"  # the paper code's numbers (docs/fidelity.md)
LAYER_SEARCH = ["+experiment=layer_search", "n_edits=40", "eval.generation_facts=10"]
BATCH = ["+experiment=batch_scaling", "layer=5", "eval.generation_facts=10", "lambda=1000"]
SEQUENTIAL = ["+experiment=sequential_batch_scaling", "layer=5", "eval.generation_facts=10"]
POINTS = {
    **{
        f"layer{layer}-{algorithm}": [*LAYER_SEARCH, f"algorithm={algorithm}", f"layer={layer}"]
        for layer in (1, 5, 15, 27)
        for algorithm in ("rome", "memit")
    },
    "memit-256-lambda1000": [*BATCH, "algorithm=memit", "n_edits=256"],
    "emmet-256-lambda0": [*BATCH, "algorithm=emmet", "n_edits=256", "lambda=0"],
    "memit-1x1024": [*BATCH, "algorithm=memit", "n_edits=1024"],
    "emmet-1x1024": [*BATCH, "algorithm=emmet", "n_edits=1024", "lambda=0"],
    "memit-4x256": [
        *SEQUENTIAL, "algorithm=memit", "n_edits=1024", "batch_size=256", "lambda=1000",
    ],
    # docs/fidelity.md's run: the 64 facts the paper's code edited, MEMIT lambda 1, layer 1
    "reference-64": [
        "algorithm=memit", "mode=batch", "layer=1", "lambda=1", "n_edits=64",
        "data.order=case_ids", f"data.case_ids={REFERENCE / 'ume-smollm2-case-ids-64.txt'}",
        "data.unique_subjects=false", "eval.generation_facts=0",
    ],
}  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")
METRICS = ("ES", "PS", "NS")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--runs", type=Path, default=Path("multirun/precision_study"))
    parser.add_argument("--out", type=Path, help="also write the table here")
    return parser.parse_args()


def run_point(name: str, precision: str, runs: Path) -> Path:
    run_dir = runs / name / precision
    if not (run_dir / "summary.json").is_file():
        overrides = ["model=smollm2-135m", "logger=none", f"precision={precision}", *POINTS[name]]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        run(cfg, run_dir)
    return run_dir


def post_values(run_dir: Path, stage: str = "post") -> dict[int, dict[str, float]]:
    """Each fact's ES, PS and NS in percent (``stage``: pre or post), by case id."""
    rows = [json.loads(line) for line in (run_dir / "facts.jsonl").read_text().splitlines()]
    return {row["case_id"]: {name: 100 * row[stage][name] for name in METRICS} for row in rows}


def reference_lines(dirs: dict[str, Path]) -> list[str]:
    """The reference point against the paper code's numbers: per-fact pre-edit agreement (its
    ES, PS, NS of the 64 facts) and the post-edit means, for each precision."""
    pre = json.loads((REFERENCE / "ume-smollm2-pre-edit-64.json").read_text())["facts"]
    post = json.loads((REFERENCE / "ume-smollm2-memit-l1-post-64.json").read_text())["facts"]
    pre, post = ({f["case_id"]: f for f in facts} for facts in (pre, post))
    lines = [
        "| reference-64 | pre-edit values as the paper code's | post ES | post PS | post NS |",
        "|---|---:|---:|---:|---:|",
        "| paper's code | 192/192 | "
        + " | ".join(f"{np.mean([f[m] for f in post.values()]):.2f}" for m in METRICS)
        + " |",
    ]
    for precision, run_dir in dirs.items():
        ours_pre, ours_post = post_values(run_dir, "pre"), post_values(run_dir)
        equal = sum(abs(ours_pre[case][m] - pre[case][m]) < 1e-6 for case in pre for m in METRICS)
        means = [np.mean([ours_post[case][m] for case in post]) for m in METRICS]
        lines.append(
            f"| {precision} | {equal}/{3 * len(pre)} | "
            + " | ".join(f"{mean:.2f}" for mean in means)
            + " |"
        )
    return lines


def harmonic_s(values: np.ndarray) -> np.ndarray:
    """S of the rows' ES/PS/NS means: values (..., n_facts, 3) -> (...)."""
    means = values.mean(axis=-2)
    return 3 / (1 / np.maximum(means, 1e-9)).sum(axis=-1)


def compare(fp32: dict, bf16: dict, seed: int = 0) -> dict[str, float]:
    """Paired differences bf16 - fp32 over the facts both runs edited."""
    cases = sorted(fp32)
    a = np.array([[fp32[case][name] for name in METRICS] for case in cases])  # (n, 3)
    b = np.array([[bf16[case][name] for name in METRICS] for case in cases])
    out = {"n": len(cases), "agreement": float((a == b).mean() * 100)}
    for index, name in enumerate(METRICS):
        difference = b[:, index] - a[:, index]
        out[name] = float(difference.mean())
        out[f"{name}_se"] = float(difference.std(ddof=1) / np.sqrt(len(cases)))
    resample = np.random.default_rng(seed).integers(0, len(cases), (1000, len(cases)))
    out["S_fp32"], out["S_bf16"] = float(harmonic_s(a)), float(harmonic_s(b))
    out["S"] = out["S_bf16"] - out["S_fp32"]
    out["S_se"] = float((harmonic_s(b[resample]) - harmonic_s(a[resample])).std(ddof=1))
    return out


def row(name: str, result: dict[str, float]) -> str:
    cells = [f"{result[m]:+.2f} ± {result[f'{m}_se']:.2f}" for m in (*METRICS, "S")]
    return (
        f"| {name} | {result['n']} | {result['S_fp32']:.2f} | {result['S_bf16']:.2f} | "
        + " | ".join(cells)
        + f" | {result['agreement']:.1f}% |"
    )


def main() -> None:
    args = parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    lines = [
        "| point | facts | S fp32 | S bf16-mixed | ES diff | PS diff | NS diff | S diff | "
        "per-fact agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    extra: list[str] = []
    for name in args.points:
        dirs = {precision: run_point(name, precision, args.runs) for precision in PRECISIONS}
        result = compare(post_values(dirs["32-true"]), post_values(dirs["bf16-mixed"]))
        lines.append(row(name, result))
        print(lines[-1], flush=True)
        if name == "reference-64":
            extra = ["", *reference_lines(dirs)]
    text = "\n".join(lines + extra)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
