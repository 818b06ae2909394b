#!/usr/bin/env bash
# README command 2: install on first use, then run the whole test suite (unit, MPI, CLI, SLURM).
#
#   launch/test.sh                 # everything
#   launch/test.sh tests/unit -x   # pytest arguments pass through
#
# SLURM tests need a cluster: as root, with none answering, this starts hpc/slurm/local-cluster.sh's
# two-node cluster (network namespaces) for the run and stops it afterwards, also when the tests
# fail or the run is interrupted (MPIRL_TEST_SLURM=0: don't). The one-node tests' jobs run on one
# of its nodes; the two-node tests use both. Where namespaces cannot be made (no root in the
# kernel's eyes, a container without CAP_SYS_ADMIN) it falls back to the one-node cluster and the
# two-node tests are skipped with that reason. MPIRL_TEST_SLURM_NODES=1 asks for one node.
# The tests run against that local cluster only, unless MPIRL_TEST_SLURM=1 (then against any).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/launch/install.sh"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

cluster="$repo/hpc/slurm/local-cluster.sh"
if [ "${MPIRL_TEST_SLURM:-auto}" != 0 ] && [ "$(id -u)" = 0 ] && ! timeout 20 sinfo >/dev/null 2>&1; then
    # Set before starting: a start that fails half-way (namespaces made, a daemon not up) is undone too.
    trap 'bash "$cluster" stop' EXIT
    trap 'exit 130' INT TERM  # so that an interrupted run also stops the cluster (the EXIT trap)
    nodes=${MPIRL_TEST_SLURM_NODES:-2}
    if bash "$cluster" start --nodes "$nodes"; then
        :
    elif [ "$nodes" != 1 ] && bash "$cluster" stop && bash "$cluster" start; then
        echo "launch/test.sh: warning: the $nodes-node cluster did not start (see above); one node instead: two-node tests will be skipped" >&2
    else
        echo "launch/test.sh: warning: the local SLURM cluster did not start; SLURM tests will be skipped" >&2
    fi
fi

set +e
"${MPIRL_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "launch/test.sh: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$rc"
