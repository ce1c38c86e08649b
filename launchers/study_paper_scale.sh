#!/bin/bash
# The paper's procedure on SmolLM2-135M at the paper's scale, as far as the data allows
# (docs/study-smollm2.md; issue 24), on the one-machine SLURM cluster (launchers/local-slurm).
# Choices are made on the tuning facts and compared on the evaluation facts (data.split: case
# ids divisible by 5 tune, the others evaluate; editexp/data/counterfact.py):
#
#   1. layer search (tuning, 100 facts): singular ROME and MEMIT (lambda 1) at all 30 layers
#   2. lambda search (tuning) at MEMIT's best layer: one batch of 512 (the tuning split holds
#      532 facts, so not the paper's 1024), and of 64 and 256 (values cached: scoring only)
#   3. batch scaling (evaluation): one batch of 16 ... 2048 facts, MEMIT and EMMET
#   4. sequential-batched (evaluation), a curve point every 512 edits (eval.schedule=every_k)
#      with the paper's each_batch scores and held-out perplexity: MEMIT 1024x2 and 256x8 (2048
#      edits; the 1x2048 points are stage 3's), MEMIT 256x4 and EMMET 256x4 (1024 edits,
#      against stage 3's 1x1024)
#   5. the remedies, MEMIT with keep_edits and AlphaEdit, 256x4, against MEMIT 256x4
#   6. repeats of the headline comparison: 1x256 against 4x64 and 16x16 on 3 disjoint fact
#      sets, prefix seed 0
#
# Cut to fit the 15-hour budget (docs/study-smollm2.md, "How it is run", three revisions): no
# GE in stages 4-6 (their forgetting measure is held-out perplexity); no MEMIT 64x32, EMMET
# 256x8, EMMET 1024x2 or ROME 2048x1; the remedies at 1024 edits, not 2048; the repeats with one
# prefix seed and without the 1024-edit comparison
#
# CounterFact here has 2,758 records (2,226 for evaluation), so the paper's 4096 edits become
# 2048; the choice rule is the best post-edit S on the tuning facts (the paper's Table 3 also
# weighs NS; docs/study-smollm2.md compares the two).
#
#   STUDY_DIR=multirun/paper_scale launchers/study_paper_scale.sh   (resumable: run it again)
#   STAGES="1 2" launchers/study_paper_scale.sh                     (only some stages)
#   DRY_RUN=1 launchers/study_paper_scale.sh                        (the commands only)
#   PRECISION=bf16-mixed launchers/study_paper_scale.sh             (default 32-true)
#
# The finished runs' records (summaries, per-fact rows, configs: editexp/run_archive.py) are
# kept in the repository, in ARCHIVE (docs/study-smollm2/runs), so that the study goes on from
# a fresh machine: they are restored into STUDY_DIR before the stages run (the same commands
# then skip those runs) and saved back after each stage and on exit; commit them.
#
# Whatever PRECISION says, EMMET with batches of 1024 facts or more runs in 32-true: its
# ill-conditioned solve (1024 constraints in d_k = 1536) turns bf16-mixed's small differences
# in keys and values into ES -1.9 +- 1.0 on 1024 facts at lambda 0 (docs/precision.md). Its
# lambda grid (1e-7 ... 1e-2) does not regularise at this scale (K^T C0^-1 K has entries of
# order d_k), so the same holds at the lambda it is tuned to.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
STUDY_DIR=$(realpath -m "${STUDY_DIR:-multirun/paper_scale}")
export GPUS=0 MEM_GB=${MEM_GB:-8} TIME_MIN=${TIME_MIN:-1440} STATS=local
MODEL=smollm2-135m
N_LAYERS=30
PRECISION=${PRECISION:-32-true}
COMMON=(model=$MODEL "+eval.metrics=[perplexity]" +eval.perplexity.n_tokens=16384)
TUNING=(data.split=tuning eval.generation_facts=0)       # choices by S: GE is not needed
EVALUATION=(data.split=evaluation eval.generation_facts=100)
SEQUENTIAL=(data.split=evaluation eval.generation_facts=0)  # stages 4-6: no GE (the cuts above)

# best <sweep dir> <field> [algorithm [positive]]: the field's value in the finished run with
# the best S (of the algorithm's runs; "positive": of those with lambda > 0). Where the sweep's
# runs are not on this machine (a fresh clone, a new cluster account), the same choice is read
# from the report committed for it: $REPORTS/<experiment>/results.csv (docs/study-smollm2);
# a placeholder in a dry run where neither exists.
REPORTS=$(realpath -m "${REPORTS:-$here/../docs/study-smollm2}")
best() {
    python - "$STUDY_DIR" "$REPORTS" "${DRY_RUN:-}" "$@" <<'PY'
import csv
import sys
from pathlib import Path

from editexp.report import collect

study, reports, dry_run, root, name, *only = sys.argv[1:]
root = Path(root)
if root.is_dir():
    runs = [
        {name: r.field(name), "algorithm": r.field("algorithm"), "lambda": r.field("lambda"),
         "S": r.metric("post", "S")}
        for r in collect(root).runs
    ]  # fmt: skip
else:
    experiment, *sweep = root.relative_to(study).parts
    table = Path(reports) / experiment / "results.csv"
    if not table.is_file():
        if dry_run:
            sys.exit(print(f"BEST_{name.upper()}"))
        sys.exit(f"study: no runs in {root} and no committed report {table}: run the stage first")
    prefix = "/".join(sweep) + "/" if sweep else ""
    with table.open() as file:
        rows = [row for row in csv.DictReader(file) if row["run_dir"].startswith(prefix)]
    runs = [
        {name: row[name], "algorithm": row["algorithm"],
         "lambda": float(row["lambda"] or 0),  # ROME's: none
         "S": float(row["post_S_mean"])}
        for row in rows
    ]  # fmt: skip
runs = [r for r in runs if not only or r["algorithm"] == only[0]]
runs = [r for r in runs if "positive" not in only or r["lambda"] > 0]
value = max(runs, key=lambda r: r["S"])[name]
if isinstance(value, tuple):  # a run's layers
    value = value[0]
print(f"{float(value):g}" if name == "lambda" else value)
PY
}

# Two 1-CPU jobs side by side where grid points are independent and short; one 2-CPU job at a
# time where they share the values the first point computes, or where a run must finish within
# a session (stages 4-5).
one_cpu() { export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CPUS=1; }
two_cpus() { export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CPUS=2; }

stage1() {  # layer search on 100 tuning facts, every layer
    one_cpu
    local layers
    layers=$(seq -s, 0 $((N_LAYERS - 1)))
    echo "+ editexp-stats model=$MODEL precision=$PRECISION layer=[$layers]"
    [[ -n ${DRY_RUN:-} ]] ||
        OMP_NUM_THREADS=2 editexp-stats model=$MODEL precision="$PRECISION" "layer=[$layers]"
    SWEEP_DIR=$STUDY_DIR/layer_search STATS=skip "$here/layer_search.sh" "${COMMON[@]}" \
        precision="$PRECISION" \
        "${TUNING[@]}" layer="$layers" n_edits=100 hydra.launcher.array_parallelism=2
}

stage2() {  # lambda search at MEMIT's best layer: 512, 256 and 64 tuning facts in one batch
    two_cpus
    local layer n
    layer=$(best "$STUDY_DIR/layer_search" layer memit)
    for n in 512 256 64; do  # MEMIT and EMMET, each over its lambda grid
        SWEEP_DIR=$STUDY_DIR/lambda_search/$n "$here/lambda_search.sh" "${COMMON[@]}" \
            precision="$PRECISION" "${TUNING[@]}" layer="$layer" n_edits=$n hydra.launcher.array_parallelism=1
    done
}

CHOSEN=()
choose() {  # CHOSEN: the best layer and the lambdas chosen at 512 facts (read once)
    ((${#CHOSEN[@]})) && return
    local layer memit emmet  # assigned apart from `local`, so that a failed choice stops here
    layer=$(best "$STUDY_DIR/layer_search" layer memit)
    memit=$(best "$STUDY_DIR/lambda_search/512/memit" lambda)
    emmet=$(best "$STUDY_DIR/lambda_search/512/emmet" lambda)
    CHOSEN=("layer=$layer" "model.hparams.memit.lambda=$memit" "model.hparams.emmet.lambda=$emmet")
}

stage3() {  # batch scaling: one batch of 16 ... 2048 evaluation facts
    two_cpus
    choose
    local dir=$STUDY_DIR/batch_scaling emmet_positive
    SWEEP_DIR=$dir/memit "$here/batch_scaling.sh" "${COMMON[@]}" precision="$PRECISION" \
        "${EVALUATION[@]}" "${CHOSEN[@]}" algorithm=memit n_edits=16,64,256,1024,2048 \
        hydra.launcher.array_parallelism=1
    # EMMET at lambda 0 (the paper's) edits at most d_k = 1536 facts in one batch (K^T C0^-1 K
    # is singular beyond); past that, with its best positive lambda on the tuning facts
    SWEEP_DIR=$dir/emmet-lambda0 STATS=skip "$here/batch_scaling.sh" "${COMMON[@]}" \
        precision="$PRECISION" "${EVALUATION[@]}" "${CHOSEN[@]}" algorithm=emmet lambda=0 \
        n_edits=16,64,256 hydra.launcher.array_parallelism=1
    SWEEP_DIR=$dir/emmet-lambda0-1024 "$here/batch_scaling.sh" "${COMMON[@]}" \
        precision=32-true "${EVALUATION[@]}" "${CHOSEN[@]}" algorithm=emmet lambda=0 n_edits=1024
    # Beyond d_k, EMMET with lambda > 0 is MEMIT at lambda (editexp/editing/emmet.py); with
    # the lambda tuned on EMMET's grid it is an almost unregularised least-squares update. A
    # failed point is reported, not fatal: it is a finding.
    emmet_positive=$(best "$STUDY_DIR/lambda_search/512/emmet" lambda emmet positive)
    SWEEP_DIR=$dir/emmet-positive "$here/batch_scaling.sh" "${COMMON[@]}" precision=32-true \
        "${EVALUATION[@]}" "${CHOSEN[@]}" algorithm=emmet lambda="$emmet_positive" \
        n_edits=1024,2048 hydra.launcher.array_parallelism=1 ||
        echo "EMMET at lambda=$emmet_positive: a grid point failed (editexp-report $dir/emmet-positive)"
}

stage4() {  # sequential-batched, a curve point every 512 edits
    # 2-thread jobs one at a time: a run of 2048 sequential edits (about 2 h in 32-true on a
    # 2-core CPU) must finish within one session when the machine may not outlive it
    two_cpus
    choose
    local dir=$STUDY_DIR/sequential common
    common=("${COMMON[@]}" "${SEQUENTIAL[@]}" "${CHOSEN[@]}" precision="$PRECISION"
        eval.schedule=every_k hydra.launcher.array_parallelism=1)
    # EMMET 4x256 against its one batch of 1024 (stage 3), which broke the model
    SWEEP_DIR=$dir/256-emmet "$here/sequential_batch_scaling.sh" "${common[@]}" \
        algorithm=emmet n_edits=1024 batch_size=256 eval.every_k=2
    # the paper's "sequential batches of 1024 scale best": 1024x2 and 256x8 against 1x2048;
    # 256x4 against 1x1024, and the remedies' comparator (stage 5)
    SWEEP_DIR=$dir/1024 STATS=skip "$here/sequential_batch_scaling.sh" "${common[@]}" \
        algorithm=memit n_edits=2048 batch_size=1024 eval.every_k=1
    SWEEP_DIR=$dir/256 STATS=skip "$here/sequential_batch_scaling.sh" "${common[@]}" \
        algorithm=memit n_edits=2048,1024 batch_size=256 eval.every_k=2
}

stage5() {  # the remedies: MEMIT keep_edits and AlphaEdit, 256x4, against MEMIT 256x4
    two_cpus  # as stage 4: one run at a time, each within a session
    choose
    SWEEP_DIR=$STUDY_DIR/remedies STATS=skip "$here/sequential_batch_scaling.sh" \
        "${COMMON[@]}" precision="$PRECISION" "${SEQUENTIAL[@]}" "${CHOSEN[@]}" n_edits=1024 \
        batch_size=256 eval.schedule=every_k eval.every_k=2 \
        hydra.launcher.array_parallelism=1 algorithm=memit,alphaedit sequential.keep_edits=true
}

stage6() {  # repeats: disjoint fact sets, each_batch scores (the paper's)
    # one fact set per sweep, so that each finishes its three schedules before the next starts
    two_cpus
    choose
    local common fact_set
    # no held-out perplexity here: the repeats measure the spread of ES, PS, NS and S
    common=(model=$MODEL precision="$PRECISION" "${SEQUENTIAL[@]}"
        "${CHOSEN[@]}" eval.schedule=each_batch algorithm=memit
        hydra.launcher.array_parallelism=1)
    for fact_set in 0 1 2; do
        SWEEP_DIR=$STUDY_DIR/repeats/256/set$fact_set STATS=skip \
            "$here/sequential_batch_scaling.sh" "${common[@]}" n_edits=256 \
            batch_size=256,64,16 data.fact_set=$fact_set editing.prefixes.seed=0
    done
}

ARCHIVE=$(realpath -m "${ARCHIVE:-$here/../docs/study-smollm2/runs}")
archive() {  # archive <from> <to>: the finished runs' records
    [[ -n ${DRY_RUN:-} || ! -d $1 ]] || python -m editexp.run_archive "$1" "$2"
}
archive "$ARCHIVE" "$STUDY_DIR"
trap 'archive "$STUDY_DIR" "$ARCHIVE"' EXIT
for stage in ${STAGES:-1 2 3 4 5 6}; do
    echo "$(date -u +%T) stage $stage"
    "stage$stage"
    archive "$STUDY_DIR" "$ARCHIVE"
done
