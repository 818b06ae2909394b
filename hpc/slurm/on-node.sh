#!/usr/bin/env bash
# Run a command on a node of the local cluster (hpc/slurm/local-cluster.sh start --nodes N), as
# ssh would: inside the node's network and UTS namespaces, the words joined and run by /bin/sh in
# a fresh login environment (HOME, USER, LOGNAME, PATH, LANG; nothing else of the caller's).
#
#   hpc/slurm/on-node.sh mpirl-n2 hostname
#   mpirun --mca plm_rsh_agent "$PWD/hpc/slurm/on-node.sh" --host mpirl-n1,mpirl-n2 -np 2 ...
#
# The second line is Open MPI's rsh launcher with this script as its agent instead of ssh: mpirun
# (on the host, the login node) starts its orted on each node through it, and no ssh daemon is
# involved. Needs root (nsenter), like the cluster itself. The command runs on the node's own
# CPUs (taskset -c with the list local-cluster.sh gave the node), and so does all it starts.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 NODE COMMAND [ARG...]" >&2; exit 2; }
node=$1
shift
state=${MPIRL_SLURM_STATE:-/var/lib/mpirl-slurm}
uts="$state/ns/$node.uts"
[ -e "/run/netns/$node" ] && [ -e "$uts" ] || {
    echo "on-node.sh: no node $node here (hpc/slurm/local-cluster.sh start --nodes N makes mpirl-n1..N)" >&2
    exit 255  # what ssh returns when it cannot reach the host
}
cpus=()
[ -s "$state/ns/$node.cpus" ] && cpus=(taskset -c "$(cat "$state/ns/$node.cpus")")
exec "${cpus[@]}" nsenter --net="/run/netns/$node" --uts="$uts" -- \
    env -i HOME="${HOME:-/root}" USER="$(id -un)" LOGNAME="$(id -un)" LANG="${LANG:-C.UTF-8}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/sh -c "$*"
