#!/usr/bin/env bash
# Start a one-machine SLURM cluster (munged, slurmctld, slurmd) for editexp tests.
#
# Idempotent: if `sinfo` already shows a usable node, nothing is done. Daemons that this
# script starts are recorded under $EDITEXP_SLURM_STATE_DIR so that stop.sh stops only them.
# Environment:
#   EDITEXP_SLURM_STATE_DIR  where pids and the lock live (default /tmp/editexp-local-slurm)
#   EDITEXP_SLURM_WAIT_S     how long to wait for the node to become idle (default 60)
#   EDITEXP_SLURM_CLEAR_SAVED_JOBS=1
#                            start slurmctld with -c: jobs that an earlier cluster saved in
#                            /var/spool/slurmctld do not come back (CI sets this: its jobs
#                            must not wait behind someone else's)
set -euo pipefail

STATE_DIR=${EDITEXP_SLURM_STATE_DIR:-/tmp/editexp-local-slurm}
WAIT_S=${EDITEXP_SLURM_WAIT_S:-60}
CLEAR_SAVED_JOBS=${EDITEXP_SLURM_CLEAR_SAVED_JOBS:-0}
PACKAGES=(slurmctld slurmd slurm-client munge)
SLURM_CONF=/etc/slurm/slurm.conf
CONF_MARKER="# Written by editexp launchers/local-slurm/start.sh"
LOG_DIR=/var/log/slurm
MUNGE_LOG=/var/log/munge/munged.log
CTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid
MUNGE_PIDFILE=/run/munge/munged.pid

log() { echo "local-slurm: $*"; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STARTED_ANY=0

# Fail: stop what this run already started (so a failed start leaves nothing behind).
die() {
    echo "local-slurm: ERROR: $*" >&2
    if [[ $STARTED_ANY -eq 1 ]]; then
        exec 9>&-
        "$SCRIPT_DIR/stop.sh" >&2 || true
    fi
    exit 1
}

# Print the last lines of a log file to stderr (used before failing).
show_log() {
    local file=$1
    if [[ -f $file ]]; then
        echo "---- last lines of $file ----" >&2
        tail -n 25 "$file" >&2
        echo "----" >&2
    else
        echo "(no log file $file)" >&2
    fi
}

USABLE_STATES='^(idle|mixed|allocated|completing)$'

# True when sinfo answers and at least one node can run jobs.
cluster_healthy() {
    command -v sinfo >/dev/null 2>&1 || return 1
    # Our own config names this host as controller: without slurmctld here, sinfo would
    # only hang in its retry loop (about 9 s).
    if grep -qsF "$CONF_MARKER" "$SLURM_CONF" && ! pgrep -x slurmctld >/dev/null; then
        return 1
    fi
    local states
    states=$(timeout 10 sinfo -h -o '%T' 2>/dev/null) || return 1
    grep -Eq "$USABLE_STATES" <<<"$states"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

has_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"

    # Keep package scripts from starting daemons we would not have recorded.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi

    local need_update=0
    for pkg in "${missing[@]}"; do
        has_candidate "$pkg" || need_update=1
    done
    local ok=0
    if [[ $need_update -eq 1 ]]; then
        log "package lists lack ${missing[*]}: running apt-get update"
        apt-get update -q && apt_install "${missing[@]}" && ok=1
    else
        # Lists may be stale (old versions gone from the mirror): update once and retry.
        if apt_install "${missing[@]}"; then
            ok=1
        else
            log "apt-get install failed: running apt-get update and retrying"
            apt-get update -q && apt_install "${missing[@]}" && ok=1
        fi
    fi
    [[ $own_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $ok -eq 1 ]] || die "apt-get could not install ${missing[*]} (see the output above)"
}

ensure_munge_key() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge
    if [[ ! -s $key ]]; then
        log "creating $key"
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge "$key"
    chmod 700 /etc/munge
    chmod 400 "$key"
}

# Available memory for jobs in MB: total minus max(2 GB, 15 %) for the OS and daemons.
real_memory_mb() {
    local total headroom
    total=$(free -m | awk '/^Mem:/ {print $2}')
    headroom=$((total * 15 / 100))
    [[ $headroom -lt 2048 ]] && headroom=2048
    echo $((total - headroom))
}

write_slurm_conf() {
    local host cpus mem tmp
    host=$(hostname)
    cpus=$(nproc)
    mem=$(real_memory_mb)
    [[ $mem -gt 0 ]] || die "not enough memory for a SLURM node (RealMemory=$mem MB)"
    mkdir -p /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$CONF_MARKER
ClusterName=editexp-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=30
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Schedule often (defaults 60 s / 30 s) so requeued and waiting jobs start quickly.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
DefMemPerCPU=$((mem / cpus))
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $SLURM_CONF ]] && cmp -s "$tmp" "$SLURM_CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if [[ -f $SLURM_CONF ]] && ! grep -qF "$CONF_MARKER" "$SLURM_CONF"; then
        log "backing up foreign $SLURM_CONF to $SLURM_CONF.editexp-backup"
        cp -p "$SLURM_CONF" "$SLURM_CONF.editexp-backup"
    fi
    install -m 644 "$tmp" "$SLURM_CONF"
    rm -f "$tmp"
    log "wrote $SLURM_CONF (NodeName=$host CPUs=$cpus RealMemory=$mem)"
}

# Record a daemon's pid (read from its pid file) as started by us.
record_pid() {
    local name=$1 pidfile=$2 pid="" i
    for ((i = 0; i < 50; i++)); do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && break
        pid=""
        sleep 0.1
    done
    [[ -n $pid ]] || return 1
    echo "$pid" >"$STATE_DIR/$name.pid"
    STARTED_ANY=1
}

start_munged() {
    if pgrep -x munged >/dev/null; then
        log "munged already running (not started by this script; left alone)"
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    log "starting munged"
    if ! runuser -u munge -- /usr/sbin/munged 9>&- || ! record_pid munged "$MUNGE_PIDFILE"; then
        show_log "$MUNGE_LOG"
        die "munged failed to start"
    fi
    munge -n | unmunge >/dev/null || {
        show_log "$MUNGE_LOG"
        die "munge does not work (munge -n | unmunge failed)"
    }
}

# start_slurm_daemon NAME PIDFILE LOGFILE [ARGS...]
start_slurm_daemon() {
    local name=$1 pidfile=$2 logfile=$3
    shift 3
    if pgrep -x "$name" >/dev/null; then
        log "$name already running (not started by this script; left alone)"
        return 0
    fi
    log "starting $name $*"
    if ! "/usr/sbin/$name" "$@" 9>&- || ! record_pid "$name" "$pidfile"; then
        show_log "$logfile"
        die "$name failed to start"
    fi
}

# check_alive NAME LOG: fail if a daemon this run started has exited.
check_alive() {
    local record="$STATE_DIR/$1.pid"
    [[ -f $record ]] || return 0
    kill -0 "$(cat "$record")" 2>/dev/null && return 0
    show_log "$2"
    die "$1 exited during startup"
}

# Wait until our node responds and can take jobs (idle, or busy with recovered jobs).
wait_for_node() {
    local host deadline state=""
    host=$(hostname)
    deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        state=$(timeout 10 sinfo -h -n "$host" -o '%T' 2>/dev/null || true)
        grep -Eq "$USABLE_STATES" <<<"$state" && return 0
        check_alive slurmctld "$LOG_DIR/slurmctld.log"
        check_alive slurmd "$LOG_DIR/slurmd.log"
        sleep 1
    done
    echo "local-slurm: node $host is '${state:-unknown}' after ${WAIT_S}s" >&2
    show_log "$LOG_DIR/slurmctld.log"
    show_log "$LOG_DIR/slurmd.log"
    die "the SLURM node did not become usable within ${WAIT_S}s"
}

main() {
    if cluster_healthy; then
        log "a SLURM cluster is already up (sinfo works); nothing to do"
        sinfo
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "must run as root to install and start SLURM (try: sudo $0)"

    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die "could not lock $STATE_DIR/lock (another start/stop is running)"
    if cluster_healthy; then
        log "a SLURM cluster came up meanwhile; nothing to do"
        return 0
    fi

    install_packages
    ensure_munge_key
    write_slurm_conf
    start_munged
    local ctld_args=()
    if [[ $CLEAR_SAVED_JOBS == 1 ]]; then
        log "EDITEXP_SLURM_CLEAR_SAVED_JOBS=1: jobs saved by an earlier cluster are discarded"
        ctld_args=(-c)
    fi
    start_slurm_daemon slurmctld "$CTLD_PIDFILE" "$LOG_DIR/slurmctld.log" "${ctld_args[@]}"
    start_slurm_daemon slurmd "$SLURMD_PIDFILE" "$LOG_DIR/slurmd.log"
    wait_for_node
    local started=() f
    for f in "$STATE_DIR"/*.pid; do
        [[ -e $f ]] && started+=("$(basename "$f" .pid)")
    done
    log "cluster is up (started by this script: ${started[*]:-nothing})"
    sinfo
}

main "$@"
