#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian's slurm-wlm and munge, to try
# mpirl's batch scripts and to run the SLURM tests. Needs root.
#
#   hpc/slurm/local-cluster.sh start    # install if needed, configure, start munged/slurmctld/slurmd
#   hpc/slurm/local-cluster.sh status
#   hpc/slurm/local-cluster.sh stop     # cancel jobs, stop the daemons it started, leave nothing running
#
# Idempotent: start on a running cluster only checks it; stop on a stopped one does nothing.
# It writes /etc/slurm/slurm.conf only if that file is absent or was written by this script.
set -euo pipefail

state=${MPIRL_SLURM_STATE:-/var/lib/mpirl-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by mpirl hpc/slurm/local-cluster.sh"
say() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { printf '[local-cluster] error: %s\n' "$*" >&2; exit 1; }

running() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
    say "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
    if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
        die "$conf exists and was not written by this script; not touching a real cluster's config"
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$state/ctld" "$state/d" /etc/slurm
    cat >"$conf.tmp" <<CONF
$marker
ClusterName=mpirl-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=600
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$conf.tmp" "$conf"
    # cgroup plugins are off (proctrack/linuxproc, task/none); an empty cgroup.conf keeps slurmd quiet.
    [ -f /etc/slurm/cgroup.conf ] || echo "$marker" >/etc/slurm/cgroup.conf
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || true; fi
        [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    munged --force --pid-file="$state/munged.pid" 2>/dev/null || munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not come up"
}

start() {
    [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root; run this as root"
    install
    mkdir -p "$state"
    configure
    start_munge
    running slurmctld || { say "starting slurmctld"; slurmctld -f "$conf"; }
    running slurmd || { say "starting slurmd"; slurmd -f "$conf"; }
    for _ in $(seq 100); do
        st=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
        case "$st" in idle|mixed|allocated) say "up: node $(hostname -s) $st ($(nproc) CPUs)"; return 0 ;; esac
        # A node marked down by an earlier crash comes back here.
        [ "${st%%\**}" = down ] && scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        sleep 0.2
    done
    die "the node did not become idle; see $state/slurmctld.log and $state/slurmd.log"
}

stop() {
    if running slurmctld; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    for d in slurmd slurmctld munged; do
        if running "$d"; then
            pid=$(cat "$state/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            say "stopped $d"
        fi
        rm -f "$state/$d.pid"
    done
    # Job steps that outlived slurmd (slurmstepd) go too: nothing of ours stays behind.
    pkill -f slurmstepd 2>/dev/null || true
}

status() {
    for d in munged slurmctld slurmd; do
        if running "$d"; then echo "$d: running (pid $(cat "$state/$d.pid"))"; else echo "$d: stopped"; fi
    done
    running slurmctld && sinfo || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
