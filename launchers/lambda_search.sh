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
#   SWEEP_DIR (multirun/lambda_search/<model>/<time>)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

MODEL=${MODEL:-llama3-8b}
for arg in "$@"; do [[ $arg == model=* ]] && MODEL=${arg#model=}; done
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} TIME_MIN=${TIME_MIN:-720}
GPUS=${GPUS:-1} CPUS=${CPUS:-8} MEM_GB=${MEM_GB:-64} STATS=${STATS:-slurm}
SWEEP_DIR=${SWEEP_DIR:-multirun/lambda_search/$MODEL/$(date +%Y-%m-%d_%H-%M-%S)}
SWEEP_DIR=$(realpath -m "$SWEEP_DIR")

run() {
    echo "+ $*"
    [[ -n ${DRY_RUN:-} ]] || "$@"
}

# SLURM requests, as srun options (statistics) and as Hydra launcher overrides (grid points).
srun_opts=(--job-name=editexp-stats --time="$TIME_MIN" --cpus-per-task="$CPUS" --mem="${MEM_GB}G")
launcher=(hydra/launcher=slurm hydra.launcher.timeout_min="$TIME_MIN"
    hydra.launcher.cpus_per_task="$CPUS" hydra.launcher.mem_gb="$MEM_GB")
if [[ -n $PARTITION ]]; then
    srun_opts+=(--partition="$PARTITION") && launcher+=(hydra.launcher.partition="$PARTITION")
fi
if [[ -n $ACCOUNT ]]; then
    srun_opts+=(--account="$ACCOUNT") && launcher+=(hydra.launcher.account="$ACCOUNT")
fi
if [[ $GPUS -gt 0 ]]; then
    srun_opts+=(--gpus-per-node="$GPUS") && launcher+=(hydra.launcher.gpus_per_node="$GPUS")
else
    launcher+=(hydra.launcher.gpus_per_node=null)
fi

# 1. Layer statistics C0 of the edited layer(s) (model.default_layer or layer=...), computed
# once so that the grid points only read the cache (without this, all jobs would wait on the
# cache's file lock while the first one computes). Overrides that change them are passed on.
stats_args=()
for arg in "$@"; do
    case $arg in model=* | model.* | layer=* | stats.* | data.* | device=* | eval.held_out_keys=*)
        stats_args+=("$arg") ;;
    esac
done
case $STATS in
slurm) run srun "${srun_opts[@]}" editexp-stats model="$MODEL" "${stats_args[@]}" ;;
local) run editexp-stats model="$MODEL" "${stats_args[@]}" ;;
skip) ;;
*) echo "STATS=$STATS: expected slurm, local or skip" >&2 && exit 2 ;;
esac

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
