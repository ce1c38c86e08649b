"""Figure and table of docs/sequential-remedies.md from sequential runs with eval.schedule=every_k.

    python docs/sequential_remedies.py outputs/remedies/smollm2-135m/256 --name remedies-256

reads every run directory below the given one (summary.json, or .hydra/config.yaml for a run
still going), and writes docs/<name>.png (ES, PS, NS, S of all facts edited so far, against
edits done) and docs/<name>.md (the metrics after the last update, the first batch's ES right
after its own update and after the last one, and S / NS against plain MEMIT's best schedule).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

METRICS = ("ES", "PS", "NS", "S")
DOCS = Path(__file__).resolve().parent
COLORS = {"MEMIT": "C0", "MEMIT keep_edits": "C2", "AlphaEdit": "C3", "EMMET": "C1"}


@dataclass
class SequentialRun:
    directory: Path
    method: str  # "MEMIT", "MEMIT keep_edits", "AlphaEdit", ...
    batch_size: int
    n_updates: int
    lam: float | None
    batches: list[dict]  # rows of batches.jsonl
    facts: list[dict]  # rows of facts.jsonl, in edit order
    finished: bool
    pre: dict[str, float]  # pre-edit means over all the run's facts (finished runs)

    @property
    def schedule(self) -> str:
        return f"{self.n_updates}x{self.batch_size}"

    def curve(self, metric: str) -> list[tuple[int, float]]:
        return [
            (row["edits_done"], row["metrics"][metric])
            for row in self.batches
            if metric in row.get("metrics", {})
        ]

    def final(self, metric: str) -> float | None:
        """The metric over all edited facts after the last update (the last scoring)."""
        done = self.batch_size * self.n_updates
        rows = [row for row in self.batches if row["edits_done"] == done]
        return rows[-1]["metrics"].get(metric) if rows and rows[-1]["metrics"] else None

    def first_batch_es(self) -> tuple[float | None, float | None]:
        """ES (%) of the first batch's facts right after its own update, and after the last."""
        first = self.batches[0]["metrics"].get("ES") if self.batches else None
        if not self.finished:
            return first, None
        values = [fact["post"]["ES"] for fact in self.facts[: self.batch_size]]
        return first, 100.0 * sum(values) / len(values)


def method_name(algorithm: str, keep_edits: bool) -> str:
    name = {"memit": "MEMIT", "emmet": "EMMET", "alphaedit": "AlphaEdit"}.get(algorithm, algorithm)
    return name + (" keep_edits" if keep_edits and algorithm != "alphaedit" else "")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(directory: Path) -> SequentialRun | None:
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        algorithm, keep = summary["algorithm"], bool(summary.get("keep_edits"))
        batch_size, n_edits, lam = summary["batch_size"], summary["n_edits"], summary["lambda"]
        pre = {metric: summary["pre"][metric]["mean"] for metric in METRICS}
    elif (directory / ".hydra" / "config.yaml").is_file():
        cfg = OmegaConf.load(directory / ".hydra" / "config.yaml")
        algorithm, keep = cfg.algorithm.name, bool(cfg.sequential.keep_edits)
        batch_size, n_edits, lam = cfg.batch_size, cfg.n_edits, cfg["lambda"]
        pre = {}
    else:
        return None
    return SequentialRun(
        directory=directory,
        method=method_name(algorithm, keep),
        batch_size=int(batch_size),
        n_updates=int(n_edits) // int(batch_size),
        lam=lam,
        batches=read_jsonl(directory / "batches.jsonl"),
        facts=read_jsonl(directory / "facts.jsonl"),
        finished=summary_path.is_file(),
        pre=pre,
    )


def collect(root: Path) -> list[SequentialRun]:
    runs = [load_run(path.parent) for path in sorted(root.rglob("batches.jsonl"))]
    order = list(COLORS)
    return sorted(
        (run for run in runs if run is not None),
        key=lambda run: (order.index(run.method) if run.method in order else 99, run.batch_size),
    )


def figure(runs: list[SequentialRun], title: str) -> Figure:
    fig = Figure(figsize=(4.0 * len(METRICS), 4.2), layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    styles = ["-", "--", ":", "-."]
    sizes = sorted({run.batch_size for run in runs})
    for ax, metric in zip(axes, METRICS):
        for run in runs:
            points = run.curve(metric)
            if not points:
                continue
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker="o",
                markersize=3,
                color=COLORS.get(run.method, "C7"),
                linestyle=styles[sizes.index(run.batch_size) % len(styles)],
                label=f"{run.method}, {run.schedule}",
            )
        pre = next((run.pre[metric] for run in runs if run.pre), None)
        if pre is not None:
            ax.axhline(pre, color="0.5", linewidth=1, linestyle=":", label="unedited model")
        ax.set_title(metric)
        ax.set_xlabel("edits done")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of all facts edited so far")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    fig.suptitle(title)
    return fig


def cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[SequentialRun]) -> str:
    finished = [run for run in runs if run.finished]
    memit = [run for run in finished if run.method == "MEMIT"]
    best = max(memit, key=lambda run: run.final("S") or 0.0) if memit else None
    lines = [
        "| method | updates x batch | λ | ES | PS | NS | S | first batch ES: after its update "
        "→ after the last | S − MEMIT best | NS − MEMIT best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        first_own, first_last = run.first_batch_es()
        delta_s = delta_ns = None
        if best is not None and run.finished:
            delta_s = run.final("S") - best.final("S")
            delta_ns = run.final("NS") - best.final("NS")
        status = "" if run.finished else " (running)"
        lines.append(
            f"| {run.method}{status} | {run.schedule} | {cell(run.lam, 'g')} | "
            + " | ".join(cell(run.final(metric)) for metric in METRICS)
            + f" | {cell(first_own)} → {cell(first_last)} | {cell(delta_s)} | {cell(delta_ns)} |"
        )
    if best is not None:
        lines.append("")
        lines.append(
            f"MEMIT's best schedule: {best.schedule} (S {cell(best.final('S'))}). Goal: S at "
            "least 5 above it with NS at most 3 below."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory holding the run directories")
    parser.add_argument("--name", required=True, help="output name under docs/")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args()
    runs = collect(args.root)
    if not runs:
        raise SystemExit(f"no runs with batches.jsonl below {args.root}")
    figure(runs, args.title or str(args.root)).savefig(DOCS / f"{args.name}.png", dpi=110)
    (DOCS / f"{args.name}.md").write_text(table(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
