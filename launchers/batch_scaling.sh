#!/usr/bin/env bash
# Batch editing (Sec. 4.3, Figs. 2-3): one update of 16, 64, 256, 1024, 4096 edits with MEMIT
# and EMMET, one SLURM job per (algorithm, size); max_edits=... caps the sizes.
#
#   launchers/batch_scaling.sh                                  # llama3-8b, up to 4096 edits
#   PARTITION=gpu ACCOUNT=myproj launchers/batch_scaling.sh model=llama2-7b max_edits=1024
#
# Arguments are editexp overrides, appended last (they win). Environment (defaults):
#   MODEL (llama3-8b; a model=... argument wins)   PARTITION (the cluster's default)
#   ACCOUNT (none)   TIME_MIN (720, per job)   GPUS (1)   CPUS (8)   MEM_GB (64)
#   STATS: slurm (a job computes the statistics first) | local (here) | skip
#   SWEEP_DIR (multirun/batch_scaling/<model>/<arguments>: the same command continues the same sweep)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

EXPERIMENT=batch_scaling
# shellcheck source=launchers/common.sh
. "$(dirname "$0")/common.sh" "$@"

# 1. Layer statistics of the edited layer(s) (model.default_layer or layer=...).
stats

# 2. The sweep: every (algorithm, batch size) as a job of one SLURM array.
echo "Sweep dir: $SWEEP_DIR"
status=0
run editexp -m +experiment=batch_scaling model="$MODEL" "${launcher[@]}" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
echo "Tables and figures (also for a partial sweep): editexp-report $SWEEP_DIR"
exit $status
