#!/usr/bin/env bash
# Lambda search (Sec. 4.2, Tables 3-4): one batch of 1024 edits over each algorithm's lambda
# grid (conf/algorithm/<name>.yaml), MEMIT then EMMET into SWEEP_DIR/memit and SWEEP_DIR/emmet (the job
# directories are <algorithm>-<n>), one SLURM job per (algorithm, lambda).
#
#   launchers/lambda_search.sh                                  # llama3-8b
#   ALGORITHMS=emmet PARTITION=gpu launchers/lambda_search.sh n_edits=256
#
# Arguments are editexp overrides, appended last (they win). Environment (defaults):
#   MODEL (llama3-8b; a model=... argument wins)   PARTITION (the cluster's default)
#   ACCOUNT (none)   TIME_MIN (720, per job)   GPUS (1)   CPUS (8)   MEM_GB (64)
#   ALGORITHMS ("memit emmet")
#   STATS: slurm (a job computes the statistics first) | local (here) | skip
#   SWEEP_DIR (multirun/lambda_search/<model>/<arguments>: the same command continues the same sweep)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

EXPERIMENT=lambda_search
# shellcheck source=launchers/common.sh
. "$(dirname "$0")/common.sh" "$@"

# 1. Layer statistics of the edited layer(s) (model.default_layer or layer=...).
stats

# 2. One sweep per algorithm (each derives its lambda grid from its own config), each in its
#    own directory below SWEEP_DIR; editexp-report SWEEP_DIR reads both (and both grids).
echo "Sweep dir: $SWEEP_DIR"
status=0
for algorithm in ${ALGORITHMS:-memit emmet}; do
    run editexp -m +experiment=lambda_search algorithm="$algorithm" model="$MODEL" \
        "${launcher[@]}" hydra.sweep.dir="$SWEEP_DIR/$algorithm" "$@" || status=$?
done
echo "Tables and figures (also for a partial sweep): editexp-report $SWEEP_DIR"
exit $status
