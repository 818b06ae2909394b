# Simulated compute nodes for hpc/slurm/local-cluster.sh --nodes N (N >= 2): sourced, not run.
#
# Node i (1..N) is a Linux network namespace and a UTS namespace, both named mpirl-n<i>:
#   - its own hostname (mpirl-n<i>), interface eth0 with address $net.(10+i) on a private /24,
#     its own TCP ports (each node's slurmd listens on 6818 in its namespace);
#   - a veth pair joins its eth0 to the bridge mpirl-br0 on the host, which holds $net.1 (the
#     login node: slurmctld, sbatch, mpirun). The bridge is the cluster's switch.
# Processes, the filesystem (repository, virtualenv, /run/munge) and /dev/shm stay shared: the
# shared filesystem of a cluster, on one kernel. Cores are not shared where there are enough:
# each node gets its own slice of this machine's CPUs ($state/ns/mpirl-n<i>.cpus, applied by
# on-node.sh with taskset), so a rank sees the cores of its node only, as on a real cluster; with
# fewer CPUs than nodes, node i gets CPU (i-1) mod C and the nodes share.
#
# Namespace handles: /run/netns/mpirl-n<i> (ip netns) and $state/ns/mpirl-n<i>.uts (a bind mount
# of the UTS namespace, made by unshare --uts=FILE). on-node.sh enters both.

bridge=mpirl-br0
net=${MPIRL_CLUSTER_NET:-10.77.0}
hosts_marker="# mpirl local-cluster node"

node_name() { echo "mpirl-n$1"; }
node_addr() { echo "$net.$((10 + $1))"; }
uts_file() { echo "$state/ns/$1.uts"; }
cpus_file() { echo "$state/ns/$1.cpus"; }

# The CPU list (taskset -c form) of node INDEX of N: a contiguous slice of the CPUs this script
# may use, C/N of them (node i gets the remainder's extra CPU first), or one shared CPU if C < N.
node_cpus() {  # node_cpus INDEX N
    local -a all
    mapfile -t all < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")')
    local c=${#all[@]} i=$(($1 - 1)) n=$2
    if [ "$c" -lt "$n" ]; then
        echo "${all[$((i % c))]}"
        return
    fi
    local first=$((i * c / n)) last=$(((i + 1) * c / n - 1)) out="" k
    for k in $(seq "$first" "$last"); do out+="${out:+,}${all[$k]}"; done
    echo "$out"
}

# Can this process make network namespaces and veth pairs here? (root, and a kernel that lets it)
netns_allowed() {
    local probe=mpirl-probe-$$
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe"
}

node_up() {  # node_up INDEX N: namespaces, link, address and CPUs of one node (idempotent)
    local name addr uts
    name=$(node_name "$1")
    addr=$(node_addr "$1")
    uts=$(uts_file "$name")
    [ -e "/run/netns/$name" ] || ip netns add "$name"
    if ! ip link show "$name" >/dev/null 2>&1; then
        ip link add "$name" type veth peer name eth0 netns "$name"
    fi
    ip link set "$name" master "$bridge" up
    ip -n "$name" link set lo up
    ip -n "$name" addr replace "$addr/24" dev eth0
    ip -n "$name" link set eth0 up
    mkdir -p "$(dirname "$uts")"
    node_cpus "$1" "$2" >"$(cpus_file "$name")"
    if ! nsenter --uts="$uts" true 2>/dev/null; then
        touch "$uts"
        unshare --uts="$uts" hostname "$name"
    fi
}

network_up() {  # network_up N
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        ip link add "$bridge" type bridge
    fi
    ip addr replace "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
    local i
    for i in $(seq "$1"); do node_up "$i" "$1"; done
    hosts_add "$1"
}

# Names resolve on every node (the filesystem is shared): mpirun --host, torch's rendezvous.
hosts_add() {
    local i tmp=/etc/hosts.mpirl.tmp
    grep -vF "$hosts_marker" /etc/hosts >"$tmp" || true
    for i in $(seq "$1"); do
        printf '%s %s %s\n' "$(node_addr "$i")" "$(node_name "$i")" "$hosts_marker" >>"$tmp"
    done
    cat "$tmp" >/etc/hosts  # in place: /etc/hosts may be a bind mount that cannot be renamed over
    rm -f "$tmp"
}

hosts_remove() {
    grep -qF "$hosts_marker" /etc/hosts 2>/dev/null || return 0
    local tmp=/etc/hosts.mpirl.tmp
    grep -vF "$hosts_marker" /etc/hosts >"$tmp" || true
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

# The nodes that exist now (namespaces named mpirl-n<i>), whatever the state file says.
existing_nodes() {
    ip netns list 2>/dev/null | awk '$1 ~ /^mpirl-n[0-9]+$/ {print $1}'
}

# Kill every process of a node (slurmd, slurmstepd, job ranks): what a crash does to them.
kill_node_procs() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    local _
    for _ in $(seq 50); do
        [ -z "$(ip netns pids "$1" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    return 1
}

# A node's link down or up: down, what it sends and what is sent to it vanish (no reset, no
# error), as when its switch port or cable fails; its processes run on, cut off.
link_state() {  # link_state NODE down|up
    ip -n "$1" link set eth0 "$2"
}

network_down() {
    local name uts
    for name in $(existing_nodes); do
        kill_node_procs "$name" || say "warning: processes of $name did not end"
        uts=$(uts_file "$name")
        if mountpoint -q "$uts" 2>/dev/null || grep -qF " $uts " /proc/mounts; then umount "$uts"; fi
        rm -f "$uts" "$(cpus_file "$name")"
        ip link del "$name" 2>/dev/null || true  # also removes eth0 inside the namespace
        ip netns del "$name"
    done
    if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
    hosts_remove
}

# Shape the link of every node to RATE (tc's units: 10gbit, 1gbit, 100mbit), both directions:
# a token bucket on the node's eth0 (what it sends) and on its bridge port (what it receives), as
# a full-duplex NIC of that speed. "reset" removes the shaping.
link_rate() {
    local rate=$1 name burst
    for name in $(existing_nodes); do
        if [ "$rate" = reset ]; then
            ip netns exec "$name" tc qdisc del dev eth0 root 2>/dev/null || true
            tc qdisc del dev "$name" root 2>/dev/null || true
            continue
        fi
        burst=$(tbf_burst "$rate")
        ip netns exec "$name" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
        tc qdisc replace dev "$name" root tbf rate "$rate" burst "$burst" latency 50ms
    done
}

# The bucket holds 1 ms of the rate: less and 10gbit does not reach its rate here (64 KiB gave
# 2.5 Gbit/s; 1.25 MB gives 6.6-8.3, as much as this VM's CPU moves over a veth at 10gbit); more
# would let bursts pass at memory speed (a real NIC has none). At least 16 KiB (100mbit: 12.5 KB).
tbf_burst() {
    local bits
    bits=$(tc_rate_bits "$1")
    local bytes=$((bits / 8 / 1000))
    [ "$bytes" -ge 16384 ] || bytes=16384
    echo "$bytes"
}

tc_rate_bits() {  # 10gbit -> 10000000000
    local r=${1,,} n mult=1
    case "$r" in
        *gbit) n=${r%gbit}; mult=1000000000 ;;
        *mbit) n=${r%mbit}; mult=1000000 ;;
        *kbit) n=${r%kbit}; mult=1000 ;;
        *bit) n=${r%bit} ;;
        *) die "link rate '$1': use tc's units, e.g. 10gbit, 1gbit, 100mbit, or reset" ;;
    esac
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt 0 ] || die "link rate '$1': a whole positive number of bit/s"
    echo $((n * mult))
}

link_status() {
    local name q
    for name in $(existing_nodes); do
        q=$(ip netns exec "$name" tc qdisc show dev eth0 | awk '$2 == "tbf" {print "tbf rate " $8}')
        echo "$name: $(node_addr "${name#mpirl-n}") ${q:-unshaped}"
    done
}
