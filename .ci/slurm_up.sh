#!/usr/bin/env bash
# Install (if needed), configure and start a single-node SLURM cluster on this
# host: munged + slurmctld + slurmd, all run as root, no systemd, no cgroups.
#
# Idempotent: safe to run repeatedly, and after the daemons of a previous
# session were killed (stale pid files / sockets are cleaned up).
#
# Usage:   sudo .ci/slurm_up.sh          (must run as root)
# Env:     SLURM_UP_TIMEOUT  seconds to wait for the node to become idle (60)
#          SLURM_UP_FORCE_RESTART=1  restart slurmctld/slurmd even if running
#
# Prints "slurm up: node <name> idle" on success; exits non-zero otherwise.
set -euo pipefail

TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
FORCE_RESTART="${SLURM_UP_FORCE_RESTART:-0}"

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"

die() {
    echo "slurm_up: ERROR: $*" >&2
    exit 1
}

log() {
    echo "slurm_up: $*" >&2
}

# proc_alive PID NAME -> 0 if PID is a live (non-zombie) process called NAME
proc_alive() {
    local pid=$1 name=$2 comm st
    [[ -r "/proc/$pid/comm" ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ "$comm" == "$name" ]] || return 1
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# pid_alive PIDFILE NAME -> 0 if the pid in PIDFILE is a live process called NAME
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s "$pidfile" ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n "$pid" ]] || return 1
    proc_alive "$pid" "$name"
}

# daemon_running NAME PIDFILE -> 0 if a live process with that exact name runs
daemon_running() {
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" "$name" && return 0
    for pid in $(pgrep -x "$name" 2>/dev/null || true); do
        proc_alive "$pid" "$name" && return 0
    done
    return 1
}

[[ $(id -u) -eq 0 ]] || die "must be run as root"

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1 || ! command -v sinfo >/dev/null 2>&1; then
    log "installing slurm-wlm and munge with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi
for b in slurmctld slurmd munged sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found after installation"
done

# --------------------------------------------------------------------------
# 2. munge
# --------------------------------------------------------------------------
MUNGE_USER=munge
id "$MUNGE_USER" >/dev/null 2>&1 || MUNGE_USER=root
mkdir -p /etc/munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
if [[ ! -s "$MUNGE_KEY" ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --force --keyfile="$MUNGE_KEY" >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
fi
chown -R "$MUNGE_USER:" /etc/munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 "$MUNGE_RUN"
chmod 0400 "$MUNGE_KEY"

munge_ok() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

if ! munge_ok; then
    if daemon_running munged "$MUNGE_PID"; then
        log "munged running but not answering; restarting it"
        if pid_alive "$MUNGE_PID" munged; then
            kill "$(tr -dc '0-9' <"$MUNGE_PID")" 2>/dev/null || true
            sleep 1
        fi
    fi
    # stale pid file / socket lock from a killed daemon
    if ! pid_alive "$MUNGE_PID" munged; then
        rm -f "$MUNGE_PID" "$MUNGE_RUN"/munge.socket.2 "$MUNGE_RUN"/munge.socket.2.lock
    fi
    log "starting munged"
    if [[ "$MUNGE_USER" != root ]]; then
        runuser -u "$MUNGE_USER" -- /usr/sbin/munged --force \
            || die "could not start munged (see /var/log/munge/munged.log)"
    else
        /usr/sbin/munged --force || die "could not start munged"
    fi
    for _ in $(seq 1 20); do
        munge_ok && break
        sleep 0.5
    done
    munge_ok || die "munge does not work (munge -n | unmunge failed); see /var/log/munge/munged.log"
fi

# --------------------------------------------------------------------------
# 3. slurm.conf
# --------------------------------------------------------------------------
NODE=$(hostname -s)
[[ -n "$NODE" ]] || die "hostname -s is empty"
# nproc counts OMP_NUM_THREADS as the CPUs it may use: a CI run with OMP_NUM_THREADS=1 would get a
# one-CPU node that never schedules the two-task jobs.
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
# leave ~5% (at least 256 MB) for the OS so slurmd never reports low memory
REAL_MEM=$((MEM_MB - (MEM_MB / 20 > 256 ? MEM_MB / 20 : 256)))
((REAL_MEM > 0)) || REAL_MEM=$MEM_MB

# The node must resolve; fall back to loopback if it does not.
NODE_ADDR=$NODE
getent hosts "$NODE" >/dev/null 2>&1 || NODE_ADDR=127.0.0.1

# Use the real socket/core/thread layout when slurmd reports one that matches
# nproc, otherwise just CPUs=.
TOPO=""
if hw=$(slurmd -C 2>/dev/null | head -n1); then
    hw_cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    hw_s=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    hw_c=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    hw_t=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    if [[ "$hw_cpus" == "$NCPU" && -n "$hw_s" && -n "$hw_c" && -n "$hw_t" ]]; then
        TOPO=" Sockets=$hw_s CoresPerSocket=$hw_c ThreadsPerCore=$hw_t"
    fi
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
chmod 0755 "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR"

NEW_CONF=$(mktemp)
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# Generated by trainer_pkg .ci/slurm_up.sh -- single-node test cluster.
ClusterName=ci
SlurmctldHost=${NODE}(${NODE_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s); keep it short so requeue tests are fast.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# sacct needs slurmdbd; finished jobs are logged here instead (one line each).
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# timers: fast kill, fast scheduling, finished jobs stay visible to
# "scontrol show job" for an hour.
KillWait=5
MinJobAge=3600
InactiveLimit=0
Waittime=0
OverTimeLimit=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
SchedulerTimeSlice=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName=${NODE} NodeAddr=${NODE_ADDR} CPUs=${NCPU}${TOPO} RealMemory=${REAL_MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

CONF_CHANGED=0
if [[ ! -f "$CONF" ]] || ! cmp -s "$NEW_CONF" "$CONF"; then
    log "writing $CONF"
    install -m 0644 "$NEW_CONF" "$CONF"
    CONF_CHANGED=1
fi
# cgroup-free: no cgroup.conf needed with proctrack/linuxproc + task/none,
# but make sure an old one cannot pull cgroup plugins in.
if [[ -f "$CONF_DIR/cgroup.conf" ]] && grep -qi '^[[:space:]]*CgroupPlugin' "$CONF_DIR/cgroup.conf"; then
    log "moving away $CONF_DIR/cgroup.conf"
    mv -f "$CONF_DIR/cgroup.conf" "$CONF_DIR/cgroup.conf.disabled"
fi

# --------------------------------------------------------------------------
# 4. slurmctld + slurmd
# --------------------------------------------------------------------------
stop_daemon() { # NAME PIDFILE
    local name=$1 pidfile=$2 pid
    if pid_alive "$pidfile" "$name"; then
        pid=$(tr -dc '0-9' <"$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.5
        done
        if [[ -d "/proc/$pid" ]]; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

if [[ "$CONF_CHANGED" == 1 || "$FORCE_RESTART" == 1 ]]; then
    if daemon_running slurmctld "$CTLD_PID" || daemon_running slurmd "$SLURMD_PID"; then
        log "configuration changed: restarting slurmctld and slurmd"
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
fi

ctld_ok() {
    scontrol ping 2>/dev/null | grep -q 'is UP'
}

if ! daemon_running slurmctld "$CTLD_PID"; then
    rm -f "$CTLD_PID"
    log "starting slurmctld"
    # no -c: keep job state from an earlier run (requeue tests survive restarts)
    /usr/sbin/slurmctld </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1 \
        || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
for _ in $(seq 1 40); do
    ctld_ok && break
    sleep 0.5
done
ctld_ok || die "slurmctld is not responding (scontrol ping); see $LOG_DIR/slurmctld.log"

if ! daemon_running slurmd "$SLURMD_PID"; then
    rm -f "$SLURMD_PID"
    log "starting slurmd"
    /usr/sbin/slurmd </dev/null >>"$LOG_DIR/slurmd.stdout" 2>&1 \
        || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
fi

# --------------------------------------------------------------------------
# 5. wait for the node to become usable
# --------------------------------------------------------------------------
node_state() {
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1
}

deadline=$((SECONDS + TIMEOUT))
resumed=0
state=""
while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case "$state" in
        idle | mixed | allocated | completing)
            echo "slurm up: node $NODE $state"
            exit 0
            ;;
        *drain* | *down* | *fail*)
            # down/drained after an unclean stop: put it back into service
            if ((resumed < 5)); then
                log "node $NODE is '$state'; resuming it"
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                resumed=$((resumed + 1))
            fi
            ;;
    esac
    # slurmd may have died right after start (e.g. bad node config)
    if ! daemon_running slurmd "$SLURMD_PID"; then
        rm -f "$SLURMD_PID"
        log "slurmd not running; starting it again"
        /usr/sbin/slurmd </dev/null >>"$LOG_DIR/slurmd.stdout" 2>&1 || true
    fi
    sleep 1
done

die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-unknown}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log
$(scontrol show node "$NODE" 2>&1 | sed 's/^/    /')"
