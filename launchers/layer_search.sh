#!/usr/bin/env bash
# Layer search (Yoon et al. 2024, Sec. 4.1, Fig. 1): singular edits with ROME and MEMIT at
# every layer of the model, one SLURM job per (algorithm, layer): 2 x 32 jobs for Llama-3-8B.
#
#   launchers/layer_search.sh                                  # llama3-8b, 1000 facts
#   PARTITION=gpu ACCOUNT=myproj launchers/layer_search.sh model=llama2-7b n_edits=100
#
# Arguments are editexp overrides, appended last (they win). Environment (defaults):
#   MODEL (llama3-8b; a model=... argument wins)   PARTITION (the cluster's default)
#   ACCOUNT (none)   TIME_MIN (720, per job)   GPUS (1)   CPUS (8)   MEM_GB (64)
#   STATS: slurm (a job computes the statistics first) | local (here) | skip
#   STATS_GROUP (8): layers per statistics job (each layer holds a d_k x d_k float64 sum)
#   SWEEP_DIR (multirun/layer_search/<model>/<arguments>: the same command continues the same sweep)
#   DRY_RUN=1: print the commands only
# editexp blocks until every job has finished (run it in tmux or screen); the jobs go on
# if it is interrupted, and `editexp-report <sweep dir>` works on a partial sweep.
set -euo pipefail

EXPERIMENT=layer_search
STATS_GROUP=${STATS_GROUP:-8}
# shellcheck source=launchers/common.sh
. "$(dirname "$0")/common.sh" "$@"

# 1. Layer statistics of every layer, STATS_GROUP layers per job (a layer= argument only
# concerns the sweep's own layer axis).
for index in "${!stats_args[@]}"; do
    [[ ${stats_args[index]} == layer=* ]] && unset "stats_args[index]"
done
stats_args=("${stats_args[@]}")
n_layers=$(editexp model="$MODEL" "${stats_args[@]}" --cfg job -p model.n_layers)
pids=()
for ((first = 0; first < n_layers; first += STATS_GROUP)); do
    last=$((first + STATS_GROUP < n_layers ? first + STATS_GROUP : n_layers))
    if [[ $STATS == slurm ]]; then
        stats "layer=[$(seq -s, "$first" $((last - 1)))]" &
        pids+=($!)
    else
        stats "layer=[$(seq -s, "$first" $((last - 1)))]"
    fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 2. The sweep: every (algorithm, layer) as a job of one SLURM array.
echo "Sweep dir: $SWEEP_DIR"
status=0
run editexp -m +experiment=layer_search model="$MODEL" "${launcher[@]}" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
echo "Tables and figures (also for a partial sweep): editexp-report $SWEEP_DIR"
exit $status
