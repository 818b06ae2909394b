#!/usr/bin/env bash
# README command 2: install on first use, then run the whole test suite (unit, MPI, CLI, SLURM).
#
#   launch/test.sh                 # everything
#   launch/test.sh tests/unit -x   # pytest arguments pass through
#
# SLURM tests need a cluster: as root, with none answering, this starts the single-node one of
# hpc/slurm/local-cluster.sh for the run and stops it afterwards (MPIRL_TEST_SLURM=0: don't).
# They run against that local cluster only, unless MPIRL_TEST_SLURM=1 (then against any).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/launch/install.sh"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

slurm_started=0
if [ "${MPIRL_TEST_SLURM:-auto}" != 0 ] && [ "$(id -u)" = 0 ] && ! sinfo >/dev/null 2>&1; then
    if bash "$repo/hpc/slurm/local-cluster.sh" start; then
        slurm_started=1
        trap 'bash "$repo/hpc/slurm/local-cluster.sh" stop' EXIT
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
