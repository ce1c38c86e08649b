"""Per-fact comparison of editexp's post-edit scores with the paper code's (docs/fidelity.md).

    python docs/fidelity_per_fact.py ../shared/reference/ume-smollm2-memit-l1-post-64.json \
        seed0=RUN_DIR seed1=RUN_DIR ... ume0=RUN_DIR ... > docs/fidelity_per_fact.md

Each ``LABEL=RUN_DIR`` is an editexp run directory (its ``facts.jsonl`` and ``batches.jsonl``).
Runs whose labels share a prefix before their trailing digits form a group (``seed0``,
``seed1``, ... are the group ``seed``). The first run is compared fact by fact; for every fact
whose ES or PS outcome differs from the reference in any run, each group gives the range of the
fact's margins over its runs and says whether the reference's value lies inside it.

Units as the reference's: percent; a margin is 100 x (p(new) - p(true)) on a prompt (ES: the
rewrite prompt; PS: the mean over the paraphrases), p = exp(-mean token NLL). Reads JSON only.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

SCORES = ("ES", "PS", "NS")
Fact = dict[str, float]


def reference_facts(path: Path) -> dict[int, Fact]:
    """The reference's per-fact scores, by case id, in percent."""
    return {int(fact["case_id"]): fact for fact in json.loads(path.read_text())["facts"]}


def run_facts(run_dir: Path) -> dict[int, Fact]:
    """A run's post-edit scores per case id, in the reference's units (percent)."""
    facts = {}
    for line in (run_dir / "facts.jsonl").read_text().splitlines():
        row = json.loads(line)
        post = row["post"]
        facts[int(row["case_id"])] = {
            name: 100 * float(post[name])
            for name in SCORES + tuple(s + "_magnitude" for s in SCORES)
        }
    return facts


def delta_norm(run_dir: Path) -> float:
    """||Delta|| of the run's (first) update."""
    first = json.loads((run_dir / "batches.jsonl").read_text().splitlines()[0])
    return float(first["update"]["delta_norm"])


def outcome_gap(ours: Fact, reference: Fact) -> float:
    """How far the ES and PS outcomes disagree (percentage points, summed)."""
    return abs(ours["ES"] - reference["ES"]) + abs(ours["PS"] - reference["PS"])


def magnitude_gap(ours: Fact, reference: Fact) -> float:
    return abs(ours["ES_magnitude"] - reference["ES_magnitude"]) + abs(
        ours["PS_magnitude"] - reference["PS_magnitude"]
    )


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def aggregate_table(runs: dict[str, tuple[Path, dict[int, Fact]]], reference: dict[int, Fact]):
    lines = [
        "| run | ES | PS | NS | ES margin | PS margin | NS margin | ES facts off | PS facts off"
        " | delta norm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ids = sorted(reference)
    ref_row = [mean([reference[c][k] for c in ids]) for k in _columns()]
    lines.append(
        "| reference (UME) | " + " | ".join(f"{v:.2f}" for v in ref_row) + " | | | 340.4 |"
    )
    for label, (run_dir, facts) in runs.items():
        row = [mean([facts[c][k] for c in ids]) for k in _columns()]
        off = {s: [c for c in ids if facts[c][s] != reference[c][s]] for s in ("ES", "PS")}
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.2f}" for v in row)
            + f" | {len(off['ES'])} | {len(off['PS'])} | {delta_norm(run_dir):.1f} |"
        )
    return lines


def _columns() -> tuple[str, ...]:
    return SCORES + tuple(s + "_magnitude" for s in SCORES)


def fact_table(facts: dict[int, Fact], reference: dict[int, Fact]) -> list[str]:
    """Every fact, the largest disagreement (ES/PS outcome, then ES/PS margin) first."""
    order = sorted(
        reference,
        key=lambda c: (
            -outcome_gap(facts[c], reference[c]),
            -magnitude_gap(facts[c], reference[c]),
        ),
    )
    lines = [
        "| case | ES ref / ours | PS ref / ours | NS ref / ours | ES margin ref / ours"
        " | PS margin ref / ours | NS margin ref / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in order:
        ref, ours = reference[case], facts[case]
        cells = [f"{ref[k]:.0f} / {ours[k]:.0f}" for k in SCORES]
        cells += [f"{ref[k + '_magnitude']:.2f} / {ours[k + '_magnitude']:.2f}" for k in SCORES]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def group_of(label: str) -> str:
    return re.sub(r"\d+$", "", label)


def disputed_table(runs: dict[str, tuple[Path, dict[int, Fact]]], reference: dict[int, Fact]):
    """Facts whose ES or PS outcome differs from the reference in some run: per group, the
    range of the ES and PS margins over its runs and the share of runs agreeing with the
    reference's outcome."""
    disputed = sorted(
        {c for _, facts in runs.values() for c in reference if outcome_gap(facts[c], reference[c])}
    )
    groups: dict[str, list[dict[int, Fact]]] = {}
    for label, (_, facts) in runs.items():
        groups.setdefault(group_of(label), []).append(facts)
    lines = [
        "| case | reference ES, PS (margins) | group (runs) | ES margin min..max (mean)"
        " | ref inside | ES as ref | PS margin min..max (mean) | ref inside | PS as ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in disputed:
        ref = reference[case]
        outcomes = f"{ref['ES']:.0f}, {ref['PS']:.0f}"
        head = f"{outcomes} ({ref['ES_magnitude']:.2f}, {ref['PS_magnitude']:.2f})"
        for group, members in groups.items():
            cells = []
            for score in ("ES", "PS"):
                margins = [facts[case][score + "_magnitude"] for facts in members]
                low, high = min(margins), max(margins)
                inside = low <= ref[score + "_magnitude"] <= high
                agree = sum(facts[case][score] == ref[score] for facts in members)
                cells += [
                    f"{low:.2f}..{high:.2f} ({mean(margins):.2f})",
                    "yes" if inside else "no",
                    f"{agree}/{len(members)}",
                ]
            lines.append(
                f"| {case} | {head} | {group} ({len(members)}) | " + " | ".join(cells) + " |"
            )
    return lines


def main(argv: list[str]) -> None:
    reference = reference_facts(Path(argv[0]))
    runs = {}
    for item in argv[1:]:
        label, _, directory = item.partition("=")
        runs[label] = (Path(directory), run_facts(Path(directory)))
    first_label, (_, first) = next(iter(runs.items()))
    print("## Aggregates (mean over the 64 facts, percent)\n")
    print("\n".join(aggregate_table(runs, reference)))
    print(f"\n## Every fact, {first_label} against the reference, largest disagreement first\n")
    print("\n".join(fact_table(first, reference)))
    print("\n## Facts whose ES or PS outcome differs from the reference in some run\n")
    print("\n".join(disputed_table(runs, reference)))


if __name__ == "__main__":
    main(sys.argv[1:])
