"""Tables, figures and findings of docs/study-smollm2.md from the study's sweep directories.

    python docs/study_smollm2.py /work/study/multirun [--wandb]

expects one directory per experiment below the given root (``layer_search``, ``lambda_search``,
``batch_scaling``, ``sequential``; each a Hydra sweep directory or the parent of several),
runs ``editexp-report`` on each into ``<experiment>/report``, copies its tables and PNG
figures into ``docs/study-smollm2/<experiment>/`` and writes ``docs/study-smollm2/findings.md``:
the paper's claims checked with numbers and standard errors, and what each experiment cost.

Standard errors: every one (ES, PS, NS, S and each difference) is the standard deviation over
2,000 bootstrap resamples of the facts (:func:`bootstrap_se`; for the means ES, PS and NS this
is close to std / sqrt(n)), paired over the common facts where one run's facts are among the
other's: two layers, two lambdas, two sequential schedules, or a batch and the larger batch
that contains it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from editexp.evaluation.metrics import harmonic_mean
from editexp.report import FinishedRun, collect
from editexp.report import main as report_main

DOCS = Path(__file__).resolve().parent
OUT = DOCS / "study-smollm2"
EXPERIMENTS = ("layer_search", "lambda_search", "batch_scaling", "sequential")
METRICS = ("ES", "PS", "NS")
BOOTSTRAP = 2000

# The paper's code on this CPU (measured; issue 14): seconds per fact
PAPER_VALUES, PAPER_ROME_EDIT, PAPER_SCORING, PAPER_GE = 12.4, 31.2, 1.64, 5.6


# --------------------------------------------------------------------------- per-fact data


@dataclass
class Run:
    """A finished run with its per-fact post-edit ES, PS, NS (percent), in edit order."""

    finished: FinishedRun
    case_ids: np.ndarray  # (n,)
    values: dict[str, np.ndarray]  # stage "post" / "each_batch" -> (n, 3) ES, PS, NS

    def field(self, name: str):
        return self.finished.field(name)

    @classmethod
    def read(cls, finished: FinishedRun) -> Run:
        rows = [json.loads(line) for line in (finished.directory / "facts.jsonl").open()]
        values = {"post": np.array([[row["post"][m] * 100 for m in METRICS] for row in rows])}
        if rows and all(row.get("each_batch") for row in rows):
            values["each_batch"] = np.array(
                [[row["each_batch"][m] * 100 for m in METRICS] for row in rows]
            )
        else:  # the run's own schedule was each_batch (or it is not sequential)
            values["each_batch"] = values["post"]
        return cls(finished, np.array([row["case_id"] for row in rows]), values)


def s_of(values: np.ndarray) -> float:
    """S: the harmonic mean of the ES, PS and NS means ((n, 3) percent values)."""
    return harmonic_mean([float(mean) for mean in values.mean(axis=0)])


def with_s(values: np.ndarray) -> np.ndarray:
    """(ES, PS, NS, S) of an (n, 3) array."""
    return np.append(values.mean(axis=0), s_of(values))


def bootstrap_se(a: np.ndarray, b: np.ndarray | None = None, paired: bool = False) -> np.ndarray:
    """SE of (ES, PS, NS, S) of ``a``, or of ``a`` minus ``b`` (paired: the same facts, in the
    same order; else resampled independently)."""
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(a), len(a))
        value = with_s(a[pick])
        if b is not None:
            other = pick if paired else rng.integers(0, len(b), len(b))
            value = value - with_s(b[other])
        draws.append(value)
    return np.std(draws, axis=0)


def on_facts(run: Run, case_ids: np.ndarray, stage: str) -> np.ndarray:
    """The run's (n, 3) values of ``case_ids`` (all of which it edited), in that order."""
    row = {case: index for index, case in enumerate(run.case_ids)}
    return run.values[stage][[row[case] for case in case_ids]]


def difference(a: Run, b: Run, stage: str = "post") -> tuple[np.ndarray, np.ndarray]:
    """(ES, PS, NS, S) of ``a`` minus ``b`` and its SE. Over the facts both runs edited, paired,
    when one run's facts are among the other's (two layers, two lambdas, nested batch sizes:
    the same facts edited in a smaller and a larger batch); else over each run's own facts."""
    common = np.intersect1d(a.case_ids, b.case_ids)
    if len(common) in (len(a.case_ids), len(b.case_ids)):
        va, vb = on_facts(a, common, stage), on_facts(b, common, stage)
        return with_s(va) - with_s(vb), bootstrap_se(va, vb, paired=True)
    va, vb = a.values[stage], b.values[stage]
    return with_s(va) - with_s(vb), bootstrap_se(va, vb)


def cell(value: float, se: float) -> str:
    return f"{value:+.1f} ± {se:.1f}"


def level(value: float, se: float) -> str:
    return f"{value:.1f} ± {se:.1f}"


# --------------------------------------------------------------------------- the report files


def report(directory: Path, name: str, wandb: bool) -> None:
    """editexp-report into <directory>/report (and to W&B, ``wandb``); its tables and PNGs into
    docs/study-smollm2."""
    args = [str(directory)] + (["--wandb"] if wandb else [])
    assert report_main(args) == 0, f"editexp-report {directory} failed"
    target = OUT / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted((directory / "report").iterdir()):
        if path.suffix in (".md", ".csv", ".png"):
            shutil.copy(path, target / path.name)


def runs_of(directory: Path) -> list[Run]:
    return [Run.read(finished) for finished in collect(directory).runs]


# torch threads per job in each experiment, as the study's stage scripts ran them (two 1-thread
# jobs side by side, or one 2-thread job at a time)
THREADS = {"layer_search": 1, "lambda_search": 2, "batch_scaling": 2, "sequential": 1}


def machine_hours(runs: list[Run], threads: int) -> float:
    """Hours of this 2-core machine: each job's wall time x its share of the cores."""
    seconds = sum(run.finished.record.timing.get("total", 0.0) for run in runs)
    return seconds * threads / 2 / 3600


def paper_hours(runs: list[Run]) -> float:
    """What the paper's code needs for the same grid points on this CPU: every point computes
    its own values (a ROME singular edit 31.2 s), scores every edited fact once (its schedule,
    each_batch) and samples GE for the same facts as ours."""
    seconds = 0.0
    for run in runs:
        record = run.finished.record
        n = record.n_edits
        per_edit = PAPER_ROME_EDIT if record.algorithm == "rome" else PAPER_VALUES
        ge = record.post.get("GE", {}).get("n", 0)
        seconds += n * (per_edit + PAPER_SCORING) + ge * PAPER_GE
    return seconds / 3600


# --------------------------------------------------------------------------- the findings


def layer_findings(runs: list[Run]) -> list[str]:
    by = {(r.field("algorithm"), r.field("layer")[0]): r for r in runs}
    layers = sorted({layer for _, layer in by})
    best = {}
    for algorithm in ("rome", "memit"):
        done = [
            (s_of(by[(algorithm, n)].values["post"]), n) for n in layers if (algorithm, n) in by
        ]
        if done:
            best[algorithm] = max(done)[1]
    lines = ["### Layer search (paper Fig. 1, Table 1)", ""]
    lines += [
        "| layer | ROME S | MEMIT S | MEMIT − ROME (S) | MEMIT S − MEMIT's best layer |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in layers:
        rome, memit = by.get(("rome", layer)), by.get(("memit", layer))
        cells = []
        for run in (rome, memit):
            post = run.values["post"] if run else None
            cells.append(level(s_of(post), bootstrap_se(post)[3]) if run else "-")
        if rome and memit:
            diff, se = difference(memit, rome)
            cells.append(cell(diff[3], se[3]))
        else:
            cells.append("-")
        if memit and "memit" in best:
            diff, se = difference(memit, by[("memit", best["memit"])])
            cells.append(cell(diff[3], se[3]))
        else:
            cells.append("-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("")
    chosen = ", ".join(f"{a.upper()} {layer}" for a, layer in best.items())
    lines.append(f"Best layer by S: {chosen} (differences paired over the same facts).")
    return lines


def lambda_findings(runs: list[Run]) -> list[str]:
    lines = ["### Lambda search (paper Tables 3-4)", ""]
    for algorithm in ("memit", "emmet"):
        done = sorted(
            (r for r in runs if r.field("algorithm") == algorithm), key=lambda r: r.field("lambda")
        )
        if not done:
            continue
        best = max(done, key=lambda r: s_of(r.values["post"]))
        lines.append(f"**{algorithm.upper()}** (best λ = {best.field('lambda'):g} by S)")
        lines.append("")
        lines += ["| λ | ES | PS | NS | S | S − best |", "|---:|---:|---:|---:|---:|---:|"]
        for run in done:
            values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
            diff, dse = difference(run, best)
            row = [f"{run.field('lambda'):g}"] + [level(v, s) for v, s in zip(values, se)]
            lines.append("| " + " | ".join(row) + f" | {cell(diff[3], dse[3])} |")
        lines.append("")
    return lines


def batch_findings(runs: list[Run]) -> list[str]:
    lines = ["### Batch scaling (paper Figs. 2-3)", ""]
    header = "| algorithm | batch | ES | PS | NS | S |"
    lines += [header, "|---|---:|---:|---:|---:|---:|"]
    changes = []
    for algorithm in ("memit", "emmet"):
        done = sorted(
            (r for r in runs if r.field("algorithm") == algorithm), key=lambda r: r.field("n_edits")
        )
        for run in done:
            values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
            cells = [level(v, s) for v, s in zip(values, se)]
            lines.append(
                f"| {algorithm.upper()} | {run.field('n_edits')} | " + " | ".join(cells) + " |"
            )
        for smaller, larger in zip(done, done[1:]):  # the same facts in the next larger batch
            diff, se = difference(larger, smaller)
            changes.append(
                f"- {algorithm.upper()}, the {smaller.field('n_edits')} facts of a batch of "
                f"{smaller.field('n_edits')} edited in a batch of {larger.field('n_edits')} "
                "instead (paired): "
                + ", ".join(f"{m} {cell(d, s)}" for m, d, s in zip((*METRICS, "S"), diff, se))
            )
    return lines + [""] + changes


def sequential_findings(runs: list[Run]) -> list[str]:
    lines = ["### Sequential-batched editing (paper Figs. 4-5, Table 2)", ""]
    header = (
        "| algorithm | edits | schedule | ES | PS | NS | S | S, each_batch (paper's schedule) |"
    )
    lines += [header, "|---|---:|---|---:|---:|---:|---:|---:|"]
    key = lambda r: (r.field("algorithm"), r.field("n_edits"), r.field("batch_size"))  # noqa: E731
    for run in sorted(runs, key=key):
        values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
        each, each_se = s_of(run.values["each_batch"]), bootstrap_se(run.values["each_batch"])[3]
        n, size = run.field("n_edits"), run.field("batch_size")
        cells = [level(v, s) for v, s in zip(values, se)]
        lines.append(
            f"| {run.field('algorithm').upper()} | {n} | {n // size}x{size} | "
            + " | ".join(cells)
            + f" | {level(each, each_se)} |"
        )
    lines += ["", "Smaller sequential batches against one batch of all the edits (S, paired):"]
    rome = {r.field("n_edits"): r for r in runs if r.field("algorithm") == "rome"}
    for algorithm in ("memit", "emmet"):
        for total in sorted({r.field("n_edits") for r in runs}):
            same = {
                r.field("batch_size"): r
                for r in runs
                if r.field("algorithm") == algorithm and r.field("n_edits") == total
            }
            if total not in same:
                continue
            smaller = [
                (f"{algorithm.upper()} {total // size}x{size}", same[size])
                for size in sorted(size for size in same if size < total)
            ]
            if total in rome and rome[total].field("batch_size") == 1:  # ROME's singular edits
                smaller.insert(0, (f"ROME {total}x1", rome[total]))
            for name, run in smaller:
                for stage in ("post", "each_batch"):
                    d, s = difference(run, same[total], stage)
                    lines.append(
                        f"- {name} − {algorithm.upper()} 1x{total} ({stage}): "
                        f"S {cell(d[3], s[3])}, NS {cell(d[2], s[2])}"
                    )
    return lines


FINDINGS = {
    "layer_search": layer_findings,
    "lambda_search": lambda_findings,
    "batch_scaling": batch_findings,
    "sequential": sequential_findings,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the directory holding one folder per experiment")
    parser.add_argument("--wandb", action="store_true", help="also log each report to W&B")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    parts = ["# Study findings (written by docs/study_smollm2.py)", ""]
    costs = ["| experiment | runs | editexp (h of this 2-core CPU) | paper's code (h, estimated) |"]
    costs.append("|---|---:|---:|---:|")
    for name in EXPERIMENTS:
        directory = args.root / name
        if not directory.is_dir():
            continue
        runs = runs_of(directory)
        if not runs:
            continue
        report(directory, name, args.wandb)
        parts += FINDINGS[name](runs) + [""]
        costs.append(
            f"| {name} | {len(runs)} | {machine_hours(runs, THREADS[name]):.2f} "
            f"| {paper_hours(runs):.1f} |"
        )
    parts += ["### Cost", "", *costs, ""]
    (OUT / "findings.md").write_text("\n".join(parts))
    print(f"wrote {OUT / 'findings.md'}")


if __name__ == "__main__":
    main()
