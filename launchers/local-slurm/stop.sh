#!/usr/bin/env bash
# Stop the daemons that launchers/local-slurm/start.sh started (and only those).
# Idempotent: with nothing recorded it says so and exits 0.
set -euo pipefail

STATE_DIR=${EDITEXP_SLURM_STATE_DIR:-/tmp/editexp-local-slurm}
STOP_WAIT_S=${EDITEXP_SLURM_STOP_WAIT_S:-20}

log() { echo "local-slurm: $*"; }

# stop_daemon NAME: stop the pid recorded in $STATE_DIR/NAME.pid if it is still NAME.
stop_daemon() {
    local name=$1 record="$STATE_DIR/$1.pid" pid comm i
    [[ -f $record ]] || return 0
    pid=$(cat "$record")
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [[ $comm != "$name" ]]; then
        log "$name (pid $pid) is not running any more"
        rm -f "$record"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_WAIT_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for ${STOP_WAIT_S}s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$record"
}

main() {
    if [[ ! -d $STATE_DIR ]] || ! compgen -G "$STATE_DIR/*.pid" >/dev/null; then
        log "nothing recorded in $STATE_DIR: nothing to stop"
        return 0
    fi
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || {
        echo "local-slurm: ERROR: could not lock $STATE_DIR/lock" >&2
        exit 1
    }
    local jobs
    jobs=$(timeout 5 squeue -h -o '%i' 2>/dev/null | wc -l || true)
    if [[ ${jobs:-0} -gt 0 ]]; then
        log "warning: $jobs job(s) still queued or running; slurmctld saves them and" \
            "they come back at the next start (scancel them if unwanted)"
    fi
    # Reverse start order: compute node, controller, then authentication.
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    log "stopped"
}

main "$@"
