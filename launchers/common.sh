# Shared by the launcher scripts: settings from the environment, SLURM requests, and the
# statistics step. Source it with EXPERIMENT set and the script's arguments: . common.sh "$@"
# shellcheck shell=bash

MODEL=${MODEL:-llama3-8b}
for arg in "$@"; do [[ $arg == model=* ]] && MODEL=${arg#model=}; done
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} TIME_MIN=${TIME_MIN:-720}
GPUS=${GPUS:-1} CPUS=${CPUS:-8} MEM_GB=${MEM_GB:-64} STATS=${STATS:-slurm}

# The arguments as one directory name that is also a plain Hydra override value ("default"
# without any): joined by "+", "=" becomes "-" and any other character but letters, digits and
# "._-" becomes "_"; a name longer than 100 characters keeps its head and ends with a hash of
# the whole.
sweep_name() {
    local name
    name=$(IFS=+; printf '%s' "$*" | tr '=' '-' | tr -c 'A-Za-z0-9._+-' '_')
    if ((${#name} > 100)); then
        name="${name:0:87}-$(printf '%s' "$name" | sha256sum | cut -c1-12)"
    fi
    printf '%s' "${name:-default}"
}
# The same command (model and arguments) gives the same sweep directory, so running it again
# continues the sweep: finished grid points are skipped, interrupted ones resume.
SWEEP_DIR=${SWEEP_DIR:-multirun/$EXPERIMENT/$MODEL/$(sweep_name "$@")}
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

# The overrides that change the layer statistics, passed on to editexp-stats.
stats_args=()
for arg in "$@"; do
    case $arg in model=* | model.* | layer=* | stats.* | data.* | device=* | precision=* | eval.held_out_keys=*)
        stats_args+=("$arg") ;;
    esac
done

# Layer statistics C0, computed once so that the grid points only read the cache (without
# this, all jobs would wait on the cache's file lock while the first one computes).
# Extra arguments (e.g. layer=[...]) are appended.
stats() {
    case $STATS in
    slurm) run srun "${srun_opts[@]}" editexp-stats model="$MODEL" "${stats_args[@]}" "$@" ;;
    local) run editexp-stats model="$MODEL" "${stats_args[@]}" "$@" ;;
    skip) ;;
    *) echo "STATS=$STATS: expected slurm, local or skip" >&2 && return 2 ;;
    esac
}
