#!/usr/bin/env bash
# A SLURM cluster on this machine, from Debian's slurm-wlm and munge, to try mpirl's batch
# scripts and to run the SLURM tests. Needs root.
#
#   hpc/slurm/local-cluster.sh start                 # one node: this host (install if needed)
#   hpc/slurm/local-cluster.sh start --nodes 2       # two nodes in namespaces, joined by a link
#   hpc/slurm/local-cluster.sh start --nodes 2 --link-rate 1gbit
#   hpc/slurm/local-cluster.sh link-rate 100mbit     # shape the nodes' links; "reset" unshapes
#   hpc/slurm/local-cluster.sh kill-node mpirl-n2    # crash a node: kill every process on it
#   hpc/slurm/local-cluster.sh kill-slurmd mpirl-n2  # only its slurmd dies (its job steps run on)
#   hpc/slurm/local-cluster.sh cut-link mpirl-n2     # partition a node (its processes run on);
#   hpc/slurm/local-cluster.sh mend-link mpirl-n2    # ... and join it again
#   hpc/slurm/local-cluster.sh status
#   hpc/slurm/local-cluster.sh stop                  # cancel jobs, stop daemons, remove nodes
#
# With --nodes N >= 2 each node mpirl-n<i> is a network + UTS namespace with its own hostname,
# address and slurmd; the host (the "login node") runs slurmctld and munged and is the switch
# (see nodes.sh). on-node.sh runs a command on a node, as ssh would.
# Idempotent: start on a running cluster checks it and restarts a node's missing slurmd (after
# kill-node); stop on a stopped one does nothing. It writes /etc/slurm/slurm.conf only if that
# file is absent or was written by this script.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${MPIRL_SLURM_STATE:-/var/lib/mpirl-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by mpirl hpc/slurm/local-cluster.sh"
say() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { printf '[local-cluster] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=nodes.sh
. "$here/nodes.sh"

# A zombie counts as dead: a killed daemon stays one until this container's init reaps it.
# The file is read once: a daemon such as munged removes its own on exit.
pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' "/proc/$pid/status"
}
running() { pid_alive "$state/$1.pid"; }
# wait_gone PIDFILE: up to 5 s for its process to be gone (or a zombie); false if it is not.
wait_gone() {
    local _
    for _ in $(seq 50); do pid_alive "$1" || return 0; sleep 0.1; done
    ! pid_alive "$1"
}
# The node names of the running multi-node cluster (empty for the one-node cluster).
cluster_nodes() { [ -f "$state/nodes" ] && cat "$state/nodes" || true; }

install() {
    local missing=()
    command -v slurmctld >/dev/null && command -v munged >/dev/null || missing+=(slurm-wlm munge)
    if [ "$1" -gt 1 ]; then
        command -v ip >/dev/null || missing+=(iproute2)
        command -v nsenter >/dev/null || missing+=(util-linux)
    fi
    [ ${#missing[@]} = 0 ] && return
    [ "$(id -u)" = 0 ] || die "${missing[*]} not installed, and installing them needs root"
    say "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

configure() {  # configure N
    if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
        die "$conf exists and was not written by this script; not touching a real cluster's config"
    fi
    local host cpus mem ctld nodes slurmd_files
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$state/ctld" /etc/slurm
    if [ "$1" = 1 ]; then
        mkdir -p "$state/d"
        ctld=$host
        nodes="NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        slurmd_files="SlurmdSpoolDir=$state/d
SlurmdPidFile=$state/slurmd.pid
SlurmdLogFile=$state/slurmd.log"
    else
        # Every node runs on its own slice of the cores (nodes.sh) but declares all of them and
        # this machine's memory, and slurmd trusts that (config_overrides), so that a job of 2
        # tasks per node fits on a 2-core machine; such a job oversubscribes each node's slice
        # (fine for testing, not for timing). One task per node has its node's cores to itself.
        ctld="$host($net.1)"
        nodes=""
        local i
        for i in $(seq "$1"); do
            mkdir -p "$state/d-$(node_name "$i")" "$state/tmp-$(node_name "$i")"
            nodes+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
        done
        # Per-node paths (%n: the node's name); TmpFS too, because /tmp is shared here and the
        # PMIx plugin of every node's slurmstepd makes the same spmix_appdir_<job> folder in it.
        # A node that stops answering is down after SlurmdTimeout (SLURM's default 300 s; sites
        # use 60-300): 10 s here, since 5 s let a node that was slow to answer under load (load
        # average 11) be counted as not responding. SLURM downs a node at a ping round once its
        # last answer is SlurmdTimeout older than the round before; a ping to a dead slurmd
        # (refused, or unanswered with its link down: measured alike) fails only after
        # MessageTimeout + 1-3 s, and no round starts before the last one ended. With SLURM's
        # MessageTimeout of 10 s detection took 25-30 s (two failing rounds of 11-13 s); 5 s here
        # (RPCs within one machine answer in milliseconds).
        slurmd_files="SlurmdParameters=config_overrides
SlurmdSpoolDir=$state/d-%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/slurmd-%n.log
TmpFS=$state/tmp-%n
SlurmdTimeout=${MPIRL_SLURMD_TIMEOUT:-10}
MessageTimeout=${MPIRL_MESSAGE_TIMEOUT:-5}"
    fi
    cat >"$conf.tmp" <<CONF
$marker
ClusterName=mpirl-local
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Job credentials live 15 s, not SLURM's 120: a requeued job waits out that lifetime before it
# starts again (slurmd refuses a relaunch while the old credential is revoked), so 15 s here.
AuthInfo=cred_expire=15
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
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/slurmctld.log
$slurmd_files
${nodes%$'\n'}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
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

# slurmd of each node, started inside the node (it finds its NodeName from the hostname).
start_slurmds() {
    local name
    if [ "$1" = 1 ]; then
        running slurmd || { say "starting slurmd"; slurmd -f "$conf"; }
        return
    fi
    for name in $(cluster_nodes); do
        pid_alive "$state/slurmd-$name.pid" && continue
        # A node with no process left (after kill-node) boots: an empty /tmp, and no step sockets
        # or PMIx folders of the steps that died with it (stepd.slurm.pmix.<job>.<step>, pmix.*,
        # spmix_appdir_*): the requeued job, same id and step, would fail to bind them there.
        if [ -z "$(ip netns pids "$name" 2>/dev/null)" ]; then
            find "$state/tmp-$name" -mindepth 1 -delete 2>/dev/null || true
            rm -rf "$state/d-$name"/stepd.slurm.pmix.* "$state/d-$name"/pmix.*
        fi
        say "starting slurmd on $name ($(node_addr "${name#mpirl-n}"))"
        "$here/on-node.sh" "$name" "slurmd -f $conf"
    done
}

cpus_note() {  # what each node runs on, for the start-up line
    local name out=""
    for name in $(cluster_nodes); do out+="${out:+, }$name on CPU $(cat "$(cpus_file "$name")")"; done
    echo "${out:-$(nproc) CPUs}"
}

wait_idle() {  # every node idle (or busy with jobs); nodes marked down by a crash come back
    local want=$1 st ok down
    for _ in $(seq 150); do
        st=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
        ok=$(awk '$2 ~ /^(idle|mixed|allocated|completing)$/' <<<"$st" | wc -l)
        if [ "$ok" -ge "$want" ]; then
            say "up: $(tr '\n' ' ' <<<"$st")($(cpus_note))"
            return 0
        fi
        down=$(awk '$2 ~ /^(down|drain|drained|draining)/ {print $1}' <<<"$st")
        for n in $down; do scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; done
        sleep 0.2
    done
    die "nodes did not become idle: $st; see $state/slurmctld.log and $state/slurmd*.log"
}

start() {  # start N RATE
    local n=$1 rate=$2
    [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root; run this as root"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || die "--nodes takes a positive number"
    local have_nodes
    have_nodes=$(cluster_nodes | wc -l)
    if running slurmctld && [ "$have_nodes" != "$((n > 1 ? n : 0))" ]; then
        die "a cluster of $((have_nodes > 0 ? have_nodes : 1)) node(s) is running; stop it first"
    fi
    install "$n"
    mkdir -p "$state"
    if [ "$n" = 1 ] && [ -n "$(existing_nodes)" ] && ! running slurmctld; then
        network_down  # a multi-node cluster's leftovers (its daemons are gone)
        rm -f "$state/nodes"
    fi
    if [ "$n" -gt 1 ]; then
        netns_allowed || die "cannot create network namespaces here (ip netns add failed): --nodes $n needs them"
        network_up "$n"
        for i in $(seq "$n"); do node_name "$i"; done >"$state/nodes"
    fi
    configure "$n"
    start_munge
    if running slurmctld; then
        scontrol reconfigure >/dev/null  # a running cluster reads the configuration just written
    else
        say "starting slurmctld"
        slurmctld -f "$conf"
    fi
    start_slurmds "$n"
    [ -z "$rate" ] || link_rate "$rate"
    wait_idle "$n"
}

stop() {
    if running slurmctld; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local d pid f
    for f in "$state"/slurmd*.pid "$state/slurmctld.pid" "$state/munged.pid"; do
        [ -f "$f" ] || continue
        d=$(basename "$f" .pid)
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            wait_gone "$f" || kill -9 "$pid" 2>/dev/null || true
            say "stopped $d"
        fi
        rm -f "$f"
    done
    # Job steps that outlived slurmd (slurmstepd) go too: nothing of ours stays behind.
    pkill -f slurmstepd 2>/dev/null || true
    if [ -n "$(existing_nodes)" ]; then
        network_down
        say "removed the nodes' namespaces, links and /etc/hosts entries"
    fi
    rm -f "$state/nodes"
}

status() {
    local d f
    for d in munged slurmctld; do
        if running "$d"; then echo "$d: running (pid $(cat "$state/$d.pid"))"; else echo "$d: stopped"; fi
    done
    for f in "$state"/slurmd*.pid; do
        [ -f "$f" ] || continue
        d=$(basename "$f" .pid)
        if pid_alive "$f"; then echo "$d: running (pid $(cat "$f"))"; else echo "$d: stopped"; fi
    done
    [ -z "$(existing_nodes)" ] || link_status
    if running slurmctld; then sinfo -N; fi
}

cluster_node() {  # cluster_node NAME: dies unless NAME is a node of this cluster
    [ -n "$1" ] || die "usage: $cmd NODE"
    grep -qxF "$1" <(cluster_nodes) || die "no node $1 in this cluster ($(cluster_nodes | tr '\n' ' '))"
}

kill_node() {
    local name=$1
    cluster_node "$name"
    kill_node_procs "$name" || die "processes of $name survived kill -9"
    rm -f "$state/slurmd-$name.pid"
    say "killed every process on $name; 'start --nodes $(cluster_nodes | wc -l)' brings its slurmd back"
}

kill_slurmd() {  # SIGKILL, as a crash: SLURM then marks the node down; 'start' brings it back
    local name=$1 f
    cluster_node "$name"
    f="$state/slurmd-$name.pid"
    pid_alive "$f" || die "$name has no slurmd running"
    kill -9 "$(cat "$f")"
    wait_gone "$f" || die "$name's slurmd (pid $(cat "$f")) survived kill -9"
    say "killed $name's slurmd (pid $(cat "$f")); its job steps run on"
}

cmd=${1:-}
[ $# = 0 ] || shift
nodes=1
rate=""
case "$cmd" in
    start)
        while [ $# -gt 0 ]; do
            case "$1" in
                --nodes) nodes=${2:?--nodes N}; shift 2 ;;
                --nodes=*) nodes=${1#*=}; shift ;;
                --link-rate) rate=${2:?--link-rate RATE}; shift 2 ;;
                --link-rate=*) rate=${1#*=}; shift ;;
                *) die "start: unknown option $1" ;;
            esac
        done
        [ -z "$rate" ] || [ "$nodes" -gt 1 ] || die "--link-rate needs --nodes 2 or more (one node has no link)"
        [ -z "$rate" ] || [ "$rate" = reset ] || tc_rate_bits "$rate" >/dev/null
        start "$nodes" "$rate" ;;
    stop) stop ;;
    status) status ;;
    link-rate)
        [ -n "$(cluster_nodes)" ] || die "link-rate needs a cluster started with --nodes 2 or more"
        rate=${1:?usage: link-rate RATE|reset}
        [ "$rate" = reset ] || tc_rate_bits "$rate" >/dev/null
        link_rate "$rate"
        link_status ;;
    kill-node) kill_node "${1:-}" ;;
    kill-slurmd) kill_slurmd "${1:-}" ;;
    cut-link) cluster_node "${1:-}" && link_state "$1" down && say "$1's link is cut" ;;
    mend-link) cluster_node "${1:-}" && link_state "$1" up && say "$1's link is up again" ;;
    *) echo "usage: $0 start [--nodes N] [--link-rate RATE] | stop | status | link-rate RATE|reset | kill-node NODE | kill-slurmd NODE | cut-link NODE | mend-link NODE" >&2
       exit 2 ;;
esac
