#!/usr/bin/env bash
# Sequential-batched editing (Sec. 4.4, Table 2, Figs. 4-5): n_edits facts (4096) as
# n_edits / batch_size updates for every paper batch size that divides n_edits, with MEMIT and
# EMMET, one SLURM job per (algorithm, batch size). ROME runs batch size 1 only, as its own
# sweep: launchers/sequential_batch_scaling.sh algorithm=rome batch_size=1
#
#   launchers/sequential_batch_scaling.sh                       # llama3-8b, 4096 edits
#   PARTITION=gpu launchers/sequential_batch_scaling.sh n_edits=1024 eval.schedule=final
#
# Arguments are editexp overrides, appended last (they win). Environment (defaults):
#   MODEL (llama3-8b; a model=... argument wins)   PARTITION (the cluster's default)
#   ACCOUNT (none)   TIME_MIN (720, per job)   GPUS (1)   CPUS (8)   MEM_GB (64)
#   STATS: slurm (a job computes the statistics first) | local (here) | skip
#   SWEEP_DIR (multirun/sequential_batch_scaling/<model>/<arguments>: the same command continues the same sweep)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

EXPERIMENT=sequential_batch_scaling
# shellcheck source=launchers/common.sh
. "$(dirname "$0")/common.sh" "$@"

# 1. Layer statistics of the edited layer(s) (model.default_layer or layer=...).
stats

# 2. The sweep: every (algorithm, batch size) as a job of one SLURM array. A job that hits its
# time limit is requeued and resumes after its last completed update.
echo "Sweep dir: $SWEEP_DIR"
status=0
run editexp -m +experiment=sequential_batch_scaling model="$MODEL" "${launcher[@]}" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
echo "Tables and figures (also for a partial sweep): editexp-report $SWEEP_DIR"
exit $status
