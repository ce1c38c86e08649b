#!/bin/bash
# The paper's whole procedure on SmolLM2-135M at the scale of the first study
# (docs/study-smollm2/first-study/README.md), on the
# one-machine SLURM cluster (launchers/local-slurm): layer search -> lambda search at the best
# layer -> batch scaling and sequential-batched editing at the chosen lambdas. Each stage reads
# the previous one's results. Resumable: run it again with the same STUDY_DIR and finished grid
# points are skipped, interrupted ones resume.
#
#   STUDY_DIR=multirun/study launchers/study_smollm2.sh            (about 6 h on 2 CPU cores)
#   STAGES="1 2" launchers/study_smollm2.sh                        (only some stages)
#   python docs/study_smollm2.py $STUDY_DIR [--wandb]              (tables, figures, findings)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
STUDY_DIR=$(realpath -m "${STUDY_DIR:-multirun/study}")
export GPUS=0 MEM_GB=${MEM_GB:-8} TIME_MIN=${TIME_MIN:-600} STATS=local
MODEL=smollm2-135m
LAYERS=0,1,2,3,5,7,9,11,13,15,17,19,21,23,25,27,29  # every other layer, and the first four

# best <sweep dir> <field> [algorithm]: the field's value in the finished run with the best S
best() {
    python - "$@" <<'PY'
import sys
from pathlib import Path

from editexp.report import collect

root, name, *algorithm = sys.argv[1:]
runs = [r for r in collect(Path(root)).runs if not algorithm or r.field("algorithm") == algorithm[0]]
value = max(runs, key=lambda r: r.metric("post", "S")).field(name)
print(value[0] if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value)
PY
}

# Two 1-CPU jobs side by side where the grid points are independent, one 2-CPU job at a time
# where they share the values the first point computes (lambda search, batch scaling).
one_cpu() { export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CPUS=1; }
two_cpus() { export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CPUS=2; }

stage1() {  # layer search: ROME and MEMIT (lambda 1) singular edits, 40 facts per layer, GE on 10
    one_cpu
    echo "+ editexp-stats model=$MODEL layer=[$LAYERS]"
    [[ -n ${DRY_RUN:-} ]] || OMP_NUM_THREADS=2 editexp-stats model=$MODEL "layer=[$LAYERS]"
    SWEEP_DIR=$STUDY_DIR/layer_search STATS=skip STATS_GROUP=30 "$here/layer_search.sh" \
        model=$MODEL layer=$LAYERS n_edits=40 eval.generation_facts=10 \
        hydra.launcher.array_parallelism=2
}

stage2() {  # lambda search at MEMIT's best layer: one batch of 256 facts, 9 + 7 lambdas
    two_cpus
    local layer
    layer=$(best "$STUDY_DIR/layer_search" layer memit)
    SWEEP_DIR=$STUDY_DIR/lambda_search "$here/lambda_search.sh" model=$MODEL layer="$layer" \
        n_edits=256 eval.generation_facts=10 hydra.launcher.array_parallelism=1
}

chosen() {  # the overrides of the best layer and the chosen lambdas
    echo "layer=$(best "$STUDY_DIR/layer_search" layer memit)" \
        "model.hparams.memit.lambda=$(best "$STUDY_DIR/lambda_search/memit" lambda)" \
        "model.hparams.emmet.lambda=$(best "$STUDY_DIR/lambda_search/emmet" lambda)"
}

stage3() {  # batch scaling: single batches of 16, 64, 256, 1024 facts, MEMIT and EMMET
    two_cpus
    # shellcheck disable=SC2046
    SWEEP_DIR=$STUDY_DIR/batch_scaling "$here/batch_scaling.sh" model=$MODEL $(chosen) \
        max_edits=1024 eval.generation_facts=10 hydra.launcher.array_parallelism=1
}

stage4() {  # sequential: 256 edits as 256x1 (ROME), 16x16, 4x64, 1x256; 1024 as 4x256, 1x1024
    one_cpu
    local common dir=$STUDY_DIR/sequential
    # shellcheck disable=SC2207
    common=(model=$MODEL $(chosen) eval.schedule=every_k eval.generation_facts=10
        hydra.launcher.array_parallelism=2)
    SWEEP_DIR=$dir/256 "$here/sequential_batch_scaling.sh" "${common[@]}" n_edits=256 \
        batch_size=16,64,256 eval.every_k=1 &
    SWEEP_DIR=$dir/rome STATS=skip "$here/sequential_batch_scaling.sh" "${common[@]}" \
        algorithm=rome n_edits=256 batch_size=1 eval.every_k=16 &
    SWEEP_DIR=$dir/1024 STATS=skip "$here/sequential_batch_scaling.sh" "${common[@]}" \
        algorithm=memit n_edits=1024 batch_size=256,1024 eval.every_k=1 &
    wait
}

for stage in ${STAGES:-1 2 3 4}; do
    echo "$(date -u +%T) stage $stage"
    "stage$stage"
done
