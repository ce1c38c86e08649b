"""Tables, figures and findings of docs/study-smollm2.md from the study's sweep directories.

    python docs/study_smollm2.py multirun/paper_scale [--wandb]

expects one directory per experiment below the given root (``layer_search``, ``lambda_search``,
``batch_scaling``, ``sequential``, ``remedies``, ``repeats``; each a Hydra sweep directory or
the parent of several, as launchers/study_paper_scale.sh writes them), runs ``editexp-report``
on each into ``<experiment>/report``, copies its tables and PNG figures into
``docs/study-smollm2/<experiment>/`` with its findings (``findings.md``: the paper's claims
checked with numbers and standard errors, between-run spread where the study repeated a
comparison, forgetting (held-out perplexity) against edits) and its cost (``cost.json``,
beside the paper's code's estimate for the same grid points), and assembles
``docs/study-smollm2/findings.md`` from every experiment's: an experiment whose runs are not
below the root keeps what was committed for it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from editexp.cache import atomic_write_json, atomic_write_text
from editexp.evaluation.metrics import harmonic_mean
from editexp.report import FinishedRun, collect
from editexp.report import main as report_main
from editexp.run_cost import Cost

DOCS = Path(__file__).resolve().parent
OUT = DOCS / "study-smollm2"
EXPERIMENTS = (
    "layer_search",
    "lambda_search",
    "batch_scaling",
    "sequential",
    "remedies",
    "repeats",
)
METRICS = ("ES", "PS", "NS")
BOOTSTRAP = 2000

# The study's main series, one strong colour each in every figure; the other series (lambdas
# of the search, batch sizes of the curves) take free colours from the shared colours file
SERIES_COLORS = {
    "MEMIT": "#1f77b4",
    "MEMIT, λ 1000": "#1f77b4",  # MEMIT at its chosen lambda, where the figure names lambdas
    "ROME": "#ff7f0e",
    "EMMET": "#2ca02c",
    "EMMET, λ 0": "#2ca02c",
    "EMMET, λ 0.0001": "#d62728",  # EMMET at its tuned lambda, beside lambda 0 in stage 3
    "ALPHAEDIT": "#9467bd",
}

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


def override(run: Run, key: str, default: str = "0") -> str:
    """The value of ``key`` in the overrides that made the run (``default`` if not set)."""
    for item in run.finished.overrides or []:
        if item.lstrip("+").startswith(f"{key}="):
            return item.split("=", 1)[1]
    return default


def series(run: Run) -> str:
    """Algorithm and lambda, e.g. "EMMET λ=0" (lambda where the algorithm has one)."""
    lam = run.field("lambda")
    name = run.field("algorithm").upper()
    return name if lam is None else f"{name} λ={lam:g}"


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


# Report files an experiment does not keep: batch scaling's two EMMET lambdas at 1024 facts
# make editexp-report draw lambda panels of one point per batch, which stage 2 answers; the
# repeats' fact sets would be pooled into one point per batch size (repeats_figure draws them).
NOT_KEPT = {
    "batch_scaling": ("metric_vs_lambda", "lambda_"),
    "repeats": ("metric_vs_batch_size",),
}


def report(directory: Path, target: Path, wandb: bool, colors: Path) -> None:
    """editexp-report into <directory>/report (and to W&B, ``wandb``), each series in the
    colour the study's ``colors`` file gives it; its tables and PNGs into ``target``, less
    the files :data:`NOT_KEPT` names for the experiment."""
    args = [str(directory), "--colors", str(colors)] + (["--wandb"] if wandb else [])
    assert report_main(args) == 0, f"editexp-report {directory} failed"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    dropped = NOT_KEPT.get(directory.name, ())
    for path in sorted((directory / "report").iterdir()):
        if path.suffix in (".md", ".csv", ".png") and not path.name.startswith(dropped):
            shutil.copy(path, target / path.name)


def seed_colors(path: Path) -> None:
    """Write :data:`SERIES_COLORS` into the study's colours file. A label that had one of
    their colours loses it and gets a free one at its next report: no two labels share one."""
    colors = json.loads(path.read_text()) if path.exists() else {}
    reserved = set(SERIES_COLORS.values())
    colors = {label: c for label, c in colors.items() if c not in reserved} | SERIES_COLORS
    atomic_write_text(path, json.dumps(colors, indent=1, sort_keys=True) + "\n")


def runs_of(directory: Path) -> list[Run]:
    return [Run.read(finished) for finished in collect(directory).runs]


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
    best, tie_break = {}, {}
    for algorithm in ("rome", "memit"):
        done = [by[(algorithm, n)] for n in layers if (algorithm, n) in by]
        if done:
            by_s, by_ns = by_s_and_tie_break(done)
            best[algorithm], tie_break[algorithm] = by_s.field("layer")[0], by_ns.field("layer")[0]
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
    ties = ", ".join(f"{a.upper()} {layer}" for a, layer in tie_break.items())
    lines.append(
        f"Best layer by S: {chosen}; by the NS tie-break: {ties} (differences paired over the "
        "same facts)."
    )
    return lines


def by_s_and_tie_break(done: list[Run]) -> tuple[Run, Run]:
    """The run (lambda, layer) chosen by best S, and by the NS tie-break: of the runs whose S
    is within one paired SE of the best S, the one with the best NS (locality first among
    equals)."""
    best = max(done, key=lambda r: s_of(r.values["post"]))
    tied = []
    for run in done:
        diff, se = difference(run, best)
        if diff[3] >= -se[3]:
            tied.append(run)
    return best, max(tied, key=lambda r: with_s(r.values["post"])[2])


def lambda_findings(study: dict[str, list[Run]]) -> list[str]:
    runs = study["lambda_search"]
    lines = ["### Lambda search (paper Tables 3-4)", ""]
    for n in sorted({r.field("n_edits") for r in runs}, reverse=True):
        for algorithm in ("memit", "emmet"):
            done = sorted(
                (r for r in runs if r.field("algorithm") == algorithm and r.field("n_edits") == n),
                key=lambda r: r.field("lambda"),
            )
            if not done:
                continue
            best, tie_break = by_s_and_tie_break(done)
            lines.append(
                f"**{algorithm.upper()}, one batch of {n}** (best λ by S: "
                f"{best.field('lambda'):g}; by the NS tie-break: {tie_break.field('lambda'):g})"
            )
            lines += ["", "| λ | ES | PS | NS | S | S − best |", "|---:|---:|---:|---:|---:|---:|"]
            for run in done:
                values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
                diff, dse = difference(run, best)
                row = [f"{run.field('lambda'):g}"] + [level(v, s) for v, s in zip(values, se)]
                lines.append("| " + " | ".join(row) + f" | {cell(diff[3], dse[3])} |")
            lines.append("")
    return lines


def batch_findings(study: dict[str, list[Run]]) -> list[str]:
    runs = study["batch_scaling"]
    lines = ["### Batch scaling (paper Figs. 2-3)", ""]
    lines += [f"Held-out perplexity (PPL) of the unedited model: {unedited_ppl(runs)}.", ""]
    lines += ["| series | batch | ES | PS | NS | S | PPL |", "|---|---:|---:|---:|---:|---:|---:|"]
    changes = []
    for name in sorted({series(r) for r in runs}):
        done = sorted((r for r in runs if series(r) == name), key=lambda r: r.field("n_edits"))
        for run in done:
            values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
            cells = [level(v, s) for v, s in zip(values, se)] + [ppl(run, "post")]
            lines.append(f"| {name} | {run.field('n_edits')} | " + " | ".join(cells) + " |")
        for smaller, larger in zip(done, done[1:]):  # the same facts in the next larger batch
            diff, se = difference(larger, smaller)
            changes.append(
                f"- {name}, the {smaller.field('n_edits')} facts of a batch of "
                f"{smaller.field('n_edits')} edited in a batch of {larger.field('n_edits')} "
                "instead (paired): "
                + ", ".join(f"{m} {cell(d, s)}" for m, d, s in zip((*METRICS, "S"), diff, se))
            )
    by_size: dict[int, dict[str, Run]] = {}
    for run in runs:
        by_size.setdefault(run.field("n_edits"), {})[series(run)] = run
    for n, same in sorted(by_size.items()):  # MEMIT against each EMMET on the same facts
        memit = [r for name, r in same.items() if name.startswith("MEMIT")]
        for name, emmet in sorted(same.items()):
            if memit and name.startswith("EMMET"):
                diff, se = difference(memit[0], emmet)
                changes.append(
                    f"- {series(memit[0])} − {name}, one batch of {n} (paired): "
                    f"S {cell(diff[3], se[3])}, NS {cell(diff[2], se[2])}"
                )
    return lines + [""] + changes


def ppl(run: Run, stage: str) -> str:
    """The run's held-out perplexity at ``stage`` ("pre", "post"), or "-" if not scored."""
    value = run.finished.metric(stage, "PPL")
    return "-" if value is None else f"{value:.2f}"


def unedited_ppl(runs: list[Run]) -> str:
    """The unedited model's perplexity, the same in every run (one model, one text)."""
    found = sorted({ppl(run, "pre") for run in runs} - {"-"})
    return " / ".join(found) if found else "not scored"


def one_batch_size(run: Run) -> int:
    """Facts per update (a batch run's one batch holds all its edits)."""
    return run.field("n_edits") if run.field("mode") == "batch" else run.field("batch_size")


def sequential_findings(study: dict[str, list[Run]]) -> list[str]:
    runs = study["sequential"]
    lines = ["### Sequential-batched editing (paper Figs. 4-5, Table 2)", ""]
    lines += sequential_table(runs) + [""]
    lines += [
        "Smaller sequential batches against one batch of all the edits (paired over the facts):"
    ]
    lines += schedule_comparisons(runs, study.get("batch_scaling", []))
    against_memit = emmet_against_memit(runs, study.get("batch_scaling", []))
    if against_memit:
        lines += [
            "",
            "EMMET's sequential schedules against MEMIT's one batch of the same edits (paired):",
        ]
        lines += against_memit
    lines += ["", "The best batch size for the same edits (S, and NS, paired against the best):"]
    lines += best_batch_size_lines(runs, study.get("batch_scaling", []))
    return lines + [""] + forgetting_lines(runs)


def emmet_against_memit(runs: list[Run], batch_runs: list[Run]) -> list[str]:
    """Each sequential EMMET run against MEMIT's one batch of all its edits, paired."""
    memit = {
        r.field("n_edits"): r
        for r in batch_runs + runs
        if r.field("algorithm") == "memit" and one_batch_size(r) == r.field("n_edits")
    }
    emmet = [r for r in runs if r.field("algorithm") == "emmet" and r.field("n_edits") in memit]
    return [line for r in emmet for line in against_lines(label(r), r, memit[r.field("n_edits")])]


def best_batch_size_lines(runs: list[Run], batch_runs: list[Run]) -> list[str]:
    """The paper's "sequential batches of 1024 scale best": per series and number of edits,
    the schedule with the best S on each scoring schedule, and every other one against it,
    paired (the same facts in the same order), in S and in NS (the paper's "larger sequential
    batches keep NS better"). One batch of all the edits (a batch-scaling run) counts as the
    schedule 1xN."""
    totals = {r.field("n_edits") for r in runs}
    groups: dict[tuple[str, int], dict[int, Run]] = {}
    for run in runs + [r for r in batch_runs if r.field("n_edits") in totals]:
        if run.field("algorithm") != "rome":  # ROME has one schedule: singular edits
            groups.setdefault((series(run), run.field("n_edits")), {})[one_batch_size(run)] = run
    lines = []
    for (name, total), by_size in sorted(groups.items()):
        if len(by_size) < 2:
            continue
        for stage in ("post", "each_batch"):
            best = max(by_size, key=lambda size: s_of(by_size[size].values[stage]))
            s_best = s_of(by_size[best].values[stage])
            others = []
            for size, run in sorted(by_size.items()):
                if size != best:
                    d, se = difference(run, by_size[best], stage)
                    nsd = f"NS {cell(d[2], se[2])}"
                    others.append(f"{total // size}x{size} {cell(d[3], se[3])} ({nsd})")
            lines.append(
                f"- {name}, {total} edits ({stage}): best {total // best}x{best} "
                f"(S {s_best:.1f}); " + ", ".join(others)
            )
    return lines


def sequential_table(runs: list[Run]) -> list[str]:
    lines = []
    header = "| series | edits | schedule | ES | PS | NS | S | S, each_batch (paper's schedule) |"
    lines += [header, "|---|---:|---|---:|---:|---:|---:|---:|"]
    key = lambda r: (r.field("algorithm"), r.field("n_edits"), r.field("batch_size"))  # noqa: E731
    for run in sorted(runs, key=key):
        values, se = with_s(run.values["post"]), bootstrap_se(run.values["post"])
        each, each_se = s_of(run.values["each_batch"]), bootstrap_se(run.values["each_batch"])[3]
        n, size = run.field("n_edits"), run.field("batch_size")
        cells = [level(v, s) for v, s in zip(values, se)]
        lines.append(
            f"| {series(run)} | {n} | {n // size}x{size} | "
            + " | ".join(cells)
            + f" | {level(each, each_se)} |"
        )
    return lines


def schedule_comparisons(runs: list[Run], batch_runs: list[Run]) -> list[str]:
    """Each smaller sequential schedule and ROME's singular edits against one batch of all the
    edits, on both scoring schedules (:func:`schedule_pairs`)."""
    pairs = schedule_pairs(runs, batch_runs)
    return [line for name, run, whole in pairs for line in against_lines(name, run, whole)]


def against_lines(name: str, run: Run, whole: Run) -> list[str]:
    """``run`` (called ``name``) − ``whole``, one batch of all its edits, paired over the facts:
    S, ES, PS and NS after all the edits and after each fact's own update (each_batch)."""
    lines = []
    for stage in ("post", "each_batch"):
        d, s = difference(run, whole, stage)
        metrics = ", ".join(f"{m} {cell(d[i], s[i])}" for i, m in ((0, "ES"), (1, "PS"), (2, "NS")))
        lines.append(
            f"- {name} − {series(whole)} 1x{whole.field('n_edits')} ({stage}): "
            f"S {cell(d[3], s[3])}; {metrics}"
        )
    return lines


def schedule_pairs(runs: list[Run], batch_runs: list[Run]) -> list[tuple[str, Run, Run]]:
    """(name, sequential run, one batch of all its edits): each smaller sequential schedule of
    MEMIT and EMMET, and ROME's singular edits, with the one batch (a sequential run of one
    update, or a batch-scaling run of the same size) of its algorithm, at its lambda where
    there is one."""
    totals = {r.field("n_edits") for r in runs}
    one_batch = [
        r
        for r in runs + batch_runs
        if one_batch_size(r) in totals and one_batch_size(r) == r.field("n_edits")
    ]
    rome = {r.field("n_edits"): r for r in runs if r.field("algorithm") == "rome"}
    lambda_of = {(r.field("algorithm"), r.field("n_edits")): r.field("lambda") for r in runs}
    kind = lambda r: (r.field("algorithm"), r.field("n_edits"))  # noqa: E731
    pairs = []
    for algorithm in ("memit", "emmet"):
        for total in sorted(totals):
            whole = sorted(  # the same series (lambda) as the sequential runs first
                (r for r in one_batch if kind(r) == (algorithm, total)),
                key=lambda r: r.field("lambda") != lambda_of.get(kind(r)),
            )
            smaller = sorted(
                (
                    r
                    for r in runs
                    if kind(r) == (algorithm, total) and r.field("batch_size") < total
                ),
                key=lambda r: r.field("batch_size"),
            )
            if not whole:
                continue
            named = [
                (f"{series(r)} {total // r.field('batch_size')}x{r.field('batch_size')}", r)
                for r in smaller
            ]
            if total in rome and rome[total].field("batch_size") == 1:  # ROME's singular edits
                named.insert(0, (f"ROME {total}x1", rome[total]))
            pairs += [(name, run, whole[0]) for name, run in named]
    return pairs


def schedule_figure(study: dict[str, list[Run]]) -> Figure | None:
    """Stage 4's headline: each smaller sequential schedule against one batch of all the
    edits (:func:`paired_figure`)."""
    pairs = schedule_pairs(study["sequential"], study.get("batch_scaling", []))
    if not pairs:
        return None
    plot = PairedPlot(
        pairs=[(run, whole) for _, run, whole in pairs],
        ticks=[f"{name}\n− 1x{whole.field('n_edits')}" for name, _, whole in pairs],
        colors=[SERIES_COLORS.get(series(run).split(" λ")[0], "0.3") for _, run, _ in pairs],
        difference="schedule − one batch",
        title="Sequential batches against one batch of the same edits, paired over the facts",
    )
    figure, _ = paired_figure(plot)
    return figure


SCORINGS = {"post": ("o", "after all the edits"), "each_batch": ("s", "after its own update")}


@dataclass
class PairedPlot:
    """What :func:`paired_figure` draws: (run, base) pairs, one tick and one colour each."""

    pairs: list[tuple[Run, Run]]
    ticks: list[str]
    colors: list[str]
    difference: str  # each panel's title after its metric, e.g. "schedule − one batch"
    title: str
    targets: dict[str, float] = field(default_factory=dict)  # metric -> goal (dotted line)


def paired_figure(plot: PairedPlot, extra: int = 0) -> tuple[Figure, list[Any]]:
    """One tick per (run, base) pair: run − base in ES, PS, NS and S, paired over the facts,
    scored after all the edits and after its own update (the paper's each_batch), ±1 SE over
    the facts; ``extra`` panels are left empty to the right and returned."""
    found = {
        (i, stage): difference(run, base, stage)
        for i, (run, base) in enumerate(plot.pairs)
        for stage in SCORINGS
    }
    colors, targets = plot.colors, plot.targets
    limit = symmetric_limit(list(found.values()))
    figure = Figure(figsize=(3.6 * (4 + extra), 4.2), layout="constrained")
    axes = figure.subplots(1, 4 + extra)
    for k, (ax, metric) in enumerate(zip(axes, (*METRICS, "S"))):
        for (i, stage), (d, se) in found.items():
            x = i - 0.12 if stage == "post" else i + 0.12
            face = colors[i] if stage == "post" else "white"
            style = {"marker": SCORINGS[stage][0], "mfc": face, "capsize": 3}
            ax.errorbar(x, d[k], yerr=se[k], color=colors[i], **style)
        difference_panel(ax, plot.ticks, limit, f"{metric}: {plot.difference}")
        if metric in targets:
            ax.axhline(targets[metric], color="0.2", ls=":", lw=1.2)
        ax.tick_params(axis="x", labelsize="small", labelrotation=30)
    handles = [
        Line2D([], [], color="0.3", marker=m, mfc="0.3" if stage == "post" else "white", ls="none")
        for stage, (m, _) in SCORINGS.items()
    ]
    labels = [f"scored {text} (±1 SE over facts, paired)" for _, text in SCORINGS.values()]
    if targets:
        handles.append(Line2D([], [], color="0.2", ls=":"))
        labels.append("target (" + ", ".join(f"{m} {v:+g}" for m, v in targets.items()) + ")")
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    figure.suptitle(plot.title)
    return figure, list(axes[4:])


def perplexity_curve(run: Run) -> dict[int, float]:
    """A sequential run's held-out perplexity at each curve point: edits done -> PPL."""
    return {
        row.edits_done: row.edited_so_far["PPL"]["mean"]
        for row in run.finished.batches()
        if "PPL" in row.edited_so_far
    }


def forgetting_lines(runs: list[Run]) -> list[str]:
    """Held-out perplexity before editing and at every curve point of the sequential runs."""
    curves: list[tuple[str, float, dict[int, float]]] = []  # (run's label, before, points)
    for run in runs:
        points = perplexity_curve(run)
        pre = run.finished.metric("pre", "PPL")
        if points and pre is not None:
            curves.append((label(run), pre, points))
    if not curves:
        return []
    edits = sorted({n for *_, points in curves for n in points})
    lines = ["Forgetting: held-out perplexity (WikiText-2 after C0's sample) as edits accumulate:"]
    lines += ["", "| run | before | " + " | ".join(f"{n} edits" for n in edits) + " |"]
    lines.append("|---|---:|" + "---:|" * len(edits))
    for name, pre, points in sorted(curves, key=lambda curve: curve[0]):
        cells = [f"{points[n]:.2f}" if n in points else "-" for n in edits]
        lines.append(f"| {name} | {pre:.2f} | " + " | ".join(cells) + " |")
    return lines + [""]


def label(run: Run) -> str:
    """A sequential run's name: series, schedule and whether it kept earlier edits' keys."""
    n, size = run.field("n_edits"), run.field("batch_size")
    keep = ", keep_edits" if run.field("keep_edits") else ""
    return f"{series(run)} {n // size}x{size}{keep}"


def remedy_pairs(study: dict[str, list[Run]]) -> list[tuple[Run, Run]]:
    """Each remedy run with plain MEMIT on the same schedule (stage 4), its comparator."""
    plain = {
        (r.field("n_edits"), r.field("batch_size")): r
        for r in study.get("sequential", [])
        if r.field("algorithm") == "memit" and not r.field("keep_edits")
    }
    pairs = []
    for run in sorted(study["remedies"], key=label):
        base = plain.get((run.field("n_edits"), run.field("batch_size")))
        if base is not None:
            pairs.append((run, base))
    return pairs


REMEDY_TARGET = {"NS": -3.0, "S": 5.0}  # S at least plain MEMIT's + 5, NS at most 3 lower


def remedies_findings(study: dict[str, list[Run]]) -> list[str]:
    """keep_edits MEMIT and AlphaEdit against plain MEMIT on the same schedule and facts, each
    scoring checked against :data:`REMEDY_TARGET`."""
    lines = ["### Remedies for sequential editing", ""]
    for run, base in remedy_pairs(study):
        for stage in ("post", "each_batch"):
            diff, se = difference(run, base, stage)
            met = diff[3] >= REMEDY_TARGET["S"] and diff[2] >= REMEDY_TARGET["NS"]
            lines.append(
                f"- {label(run)} − {label(base)} ({stage}): S {cell(diff[3], se[3])}; "
                f"ES {cell(diff[0], se[0])}, PS {cell(diff[1], se[1])}, "
                f"NS {cell(diff[2], se[2])}: target {'met' if met else 'missed'}"
            )
    return lines + [""] + forgetting_lines(study["remedies"])


def remedy_color(run: Run) -> str:
    """A remedy's colour as editexp-report draws its series; plain MEMIT, the comparator,
    in black."""
    if run.field("algorithm") == "alphaedit":
        return SERIES_COLORS["ALPHAEDIT"]
    return SERIES_COLORS["MEMIT"] if run.field("keep_edits") else "black"


def remedy_name(run: Run) -> str:
    """A remedy's tick: its algorithm and whether it kept earlier edits' keys."""
    keep = ", keep_edits" if run.field("keep_edits") else ""
    return f"{run.field('algorithm').upper()}{keep}"


def remedies_figure(study: dict[str, list[Run]]) -> Figure | None:
    """Stage 5: each remedy against plain MEMIT on the same schedule and facts, paired, with
    the target; and held-out perplexity of all three as the edits accumulate."""
    pairs = remedy_pairs(study)
    if not pairs:
        return None
    plot = PairedPlot(
        pairs=pairs,
        ticks=[remedy_name(run) for run, _ in pairs],
        colors=[remedy_color(run) for run, _ in pairs],
        difference="remedy − plain MEMIT",
        title=f"Remedies against plain {label(pairs[0][1])} on the same facts, paired",
        targets=REMEDY_TARGET,
    )
    figure, (ax,) = paired_figure(plot, extra=1)
    for run in [pairs[0][1]] + [run for run, _ in pairs]:
        curve = {0: run.finished.metric("pre", "PPL")} | perplexity_curve(run)
        x, y = zip(*[(n, ppl) for n, ppl in curve.items() if ppl is not None])
        ax.plot(x, y, marker="o", color=remedy_color(run), label=label(run))
    ax.set_ylim(bottom=0)
    ax.set_title("held-out perplexity", fontsize="medium")
    ax.set_xlabel("edits done")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


Draws = dict[tuple[str, str], dict[int, Run]]  # (fact set, prefix seed) -> batch size -> run


def repeat_draws(runs: list[Run]) -> dict[int, Draws]:
    """The repeats' runs by number of edits, then draw (fact set, prefix seed), then batch."""
    by_total: dict[int, Draws] = {}
    for run in runs:
        draw = (override(run, "data.fact_set"), override(run, "editing.prefixes.seed"))
        draws = by_total.setdefault(run.field("n_edits"), {})
        draws.setdefault(draw, {})[run.field("batch_size")] = run
    return dict(sorted(by_total.items()))


def smaller_batches(draws: Draws, total: int) -> list[int]:
    return sorted({size for same in draws.values() for size in same if size < total})


def repeats_findings(study: dict[str, list[Run]]) -> list[str]:
    """Each smaller sequential schedule against one batch of all the edits, on every disjoint
    fact set and prefix seed: the differences, their mean, and their spread between runs."""
    lines = ["### Repeats: disjoint fact sets x prefix seeds (paper's each_batch scores)", ""]
    for total, draws in repeat_draws(study["repeats"]).items():
        sizes = smaller_batches(draws, total)
        lines += [f"**{total} edits** (S of each schedule − S of 1x{total}, paired over the facts)"]
        lines += [
            "",
            "| fact set | prefix seed | S 1x"
            + f"{total} | "
            + " | ".join(f"{total // m}x{m} − 1x{total}" for m in sizes)
            + " |",
        ]
        lines.append("|---:|---:|---:|" + "---:|" * len(sizes))
        diffs: dict[int, list[tuple[float, float]]] = {m: [] for m in sizes}
        for (fact_set, seed), same in sorted(draws.items()):
            if total not in same:
                continue
            cells = []
            for m in sizes:
                if m not in same:
                    cells.append("-")
                    continue
                d, se = difference(same[m], same[total], "each_batch")
                diffs[m].append((d[3], se[3]))
                cells.append(cell(d[3], se[3]))
            whole = same[total].values["each_batch"]
            lines.append(
                f"| {fact_set} | {seed} | {level(s_of(whole), bootstrap_se(whole)[3])} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
        lines += [
            spread_line(f"{total // m}x{m} − 1x{total}", found)
            for m, found in diffs.items()
            if len(found) >= 2
        ]
        lines.append("")
    return lines


def repeats_figure(runs: list[Run]) -> Figure:
    """The headline comparison, one row per number of edits: each smaller schedule's paired
    difference from one batch of all the edits (ES, PS, NS, S; the paper's each_batch scores),
    one marker per draw with its within-run SE, and their mean with the SE between draws."""
    by_total = repeat_draws(runs)
    figure = Figure(figsize=(13, 3.2 * len(by_total) + 0.6), layout="constrained")
    axes = figure.subplots(len(by_total), 4, squeeze=False)
    for row, (total, draws) in zip(axes, by_total.items()):
        sizes = smaller_batches(draws, total)
        pairs = [
            (draw, m, *difference(same[m], same[total], "each_batch"))
            for draw, same in sorted(draws.items())
            for m in sizes
            if m in same and total in same
        ]
        names = sorted({draw for draw, *_ in pairs})
        limit = symmetric_limit([(d, se) for *_, d, se in pairs])
        for k, (ax, metric) in enumerate(zip(row, (*METRICS, "S"))):
            for x, m in enumerate(sizes):
                found = [(draw, d[k], se[k]) for draw, size, d, se in pairs if size == m]
                draw_repeats(ax, x, [(names.index(draw), d, se) for draw, d, se in found])
            ticks = [f"{total // m}x{m}" for m in sizes]
            difference_panel(ax, ticks, limit, f"{metric}: schedule − 1x{total}")
    handles = [
        Line2D([], [], color=SERIES_COLORS["MEMIT"], marker=MARKERS[i % len(MARKERS)], ls="none")
        for i in range(len(names))
    ] + [Line2D([], [], color="black", marker="_", markersize=14, ls="none")]
    labels = [
        f"fact set {fact_set}, prefix seed {seed} (±1 SE over facts)" for fact_set, seed in names
    ]
    figure.legend(
        handles,
        labels + ["mean of the draws (±1 SE between draws)"],
        loc="outside lower center",
        ncol=2,
        frameon=False,
        fontsize="small",
    )
    figure.suptitle(
        "MEMIT, layer 3, λ 1000: smaller sequential batches against one batch of "
        "all the edits, paired over the facts (paper's each_batch scores)"
    )
    return figure


MARKERS = "osD^vP*X"  # one per draw of the repeats


def draw_repeats(ax: Any, x: int, found: list[tuple[int, float, float]]) -> None:
    """At tick ``x``: each draw's (index, difference, within-run SE) as its own marker, and,
    from two draws on, their mean with the SE between draws (a black bar to their right)."""
    for index, d, se in found:
        offset = x - 0.25 + 0.5 * index / max(len(found), 2)
        marker = MARKERS[index % len(MARKERS)]
        ax.errorbar(offset, d, yerr=se, color=SERIES_COLORS["MEMIT"], marker=marker, capsize=3)
    if len(found) >= 2:
        d = np.array([value for _, value, _ in found])
        sem = d.std(ddof=1) / np.sqrt(len(d))
        style = {"color": "black", "marker": "_", "markersize": 14, "capsize": 5, "lw": 2}
        ax.errorbar(x + 0.3, d.mean(), yerr=sem, **style)


def difference_panel(ax: Any, ticks: list[str], limit: float, title: str) -> None:
    """A panel of paired differences: one tick per comparison, a zero line, and a y range
    symmetric about zero (``limit`` points each way), so no gain or loss looks bigger."""
    ax.axhline(0, color="0.35", ls="--", lw=1)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlim(-0.6, len(ticks) - 0.4)
    ax.set_ylim(-limit, limit)
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel("difference (points)")
    ax.grid(alpha=0.3)


def symmetric_limit(found: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """A y range that holds every (difference, SE) pair's ±1 SE bar, at least ±5 points."""
    return max([5.0] + [abs(d[k]) + se[k] + 1 for d, se in found for k in range(4)])


def spread_line(name: str, found: list[tuple[float, float]]) -> str:
    """A difference repeated over runs ((value, within-run SE) each): its mean, the spread
    between runs, and the mean within-run SE."""
    d = np.array([value for value, _ in found])
    within = float(np.mean([se for _, se in found]))
    spread = d.std(ddof=1)
    return (
        f"- {name} over {len(d)} runs: mean {d.mean():+.1f}, between-run SD {spread:.1f} "
        f"(SE of the mean {spread / np.sqrt(len(d)):.1f}), mean within-run SE {within:.1f}; "
        f"{int((d > 0).sum())} of {len(d)} positive"
    )


def layer_study(study: dict[str, list[Run]]) -> list[str]:
    return layer_findings(study["layer_search"])


FINDINGS = {
    "layer_search": layer_study,
    "lambda_search": lambda_findings,
    "batch_scaling": batch_findings,
    "sequential": sequential_findings,
    "remedies": remedies_findings,
    "repeats": repeats_findings,
}


# The study's own figures, beside editexp-report's: experiment -> (file name, figure)
FIGURES = {
    "repeats": ("repeats_vs_one_batch.png", lambda study: repeats_figure(study["repeats"])),
    "sequential": ("sequential_vs_one_batch.png", schedule_figure),
    "remedies": ("remedies_vs_plain.png", remedies_figure),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the directory holding one folder per experiment")
    parser.add_argument("--wandb", action="store_true", help="also log each report to W&B")
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        default=EXPERIMENTS,
        help="only these (the finished stages of a study still running)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seed_colors(args.root / "colors.json")
    study = {}
    for name in args.experiments:
        directory = args.root / name
        runs = runs_of(directory) if directory.is_dir() else []
        if runs:
            report(directory, args.out / name, args.wandb, args.root / "colors.json")
            study[name] = runs
    for name in set(study) & set(FIGURES):  # the study's own figures, from all its runs
        file_name, draw = FIGURES[name]
        figure = draw(study)
        if figure is not None:
            figure.savefig(args.out / name / file_name, dpi=150)
    write_findings(args.out, study)
    print(f"wrote {args.out / 'findings.md'}")


def write_findings(out: Path, study: dict[str, list[Run]]) -> None:
    """Each experiment's findings and cost into ``out/<experiment>/`` (findings.md, cost.json),
    then ``out/findings.md`` from every experiment's files there: those written now and those
    committed before, so that an experiment whose runs are not on this machine keeps its
    findings."""
    for name, runs in study.items():
        atomic_write_text(out / name / "findings.md", "\n".join(FINDINGS[name](study)) + "\n")
        cost = Cost.of([run.finished.record for run in runs])
        row = {"runs": len(runs), "wall_hours": cost.wall_hours, "cpu_hours": cost.cpu_hours}
        atomic_write_json(out / name / "cost.json", row | {"paper_hours": paper_hours(runs)})
    parts = ["# Study findings (written by docs/study_smollm2.py)", ""]
    done = [name for name in EXPERIMENTS if (out / name / "findings.md").is_file()]
    for name in done:
        parts += [(out / name / "findings.md").read_text().rstrip("\n"), ""]
    parts += ["### Cost", "", *cost_lines(out, done), ""]
    atomic_write_text(out / "findings.md", "\n".join(parts))


def cost_lines(out: Path, experiments: list[str]) -> list[str]:
    """Per experiment (its cost.json): its runs' hours summed (not the sweep's elapsed time,
    which is shorter where jobs ran side by side) and CPU-hours (seconds x threads), shared work
    counted where it was computed, beside the paper's code's estimate for the same points."""
    lines = [
        "| experiment | runs | run hours (summed) | CPU-hours "
        "| paper's code (h of this CPU, est.) |"
    ]
    lines.append("|---|---:|---:|---:|---:|")
    for name in experiments:
        path = out / name / "cost.json"
        if not path.is_file():
            continue
        row = json.loads(path.read_text())
        cpu = "?" if row["cpu_hours"] is None else f"{row['cpu_hours']:.2f}"
        lines.append(
            f"| {name} | {row['runs']} | {row['wall_hours']:.2f} | {cpu} "
            f"| {row['paper_hours']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
