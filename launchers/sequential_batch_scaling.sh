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
#   SWEEP_DIR (multirun/sequential_batch_scaling/<model>/<time>)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

MODEL=${MODEL:-llama3-8b}
for arg in "$@"; do [[ $arg == model=* ]] && MODEL=${arg#model=}; done
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} TIME_MIN=${TIME_MIN:-720}
GPUS=${GPUS:-1} CPUS=${CPUS:-8} MEM_GB=${MEM_GB:-64} STATS=${STATS:-slurm}
SWEEP_DIR=${SWEEP_DIR:-multirun/sequential_batch_scaling/$MODEL/$(date +%Y-%m-%d_%H-%M-%S)}
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

# 2. The sweep: every (algorithm, batch size) as a job of one SLURM array. A job that hits its
# time limit is requeued and resumes after its last completed update.
echo "Sweep dir: $SWEEP_DIR"
status=0
run editexp -m +experiment=sequential_batch_scaling model="$MODEL" "${launcher[@]}" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
echo "Tables and figures (also for a partial sweep): editexp-report $SWEEP_DIR"
exit $status
