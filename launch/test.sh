#!/usr/bin/env bash
# README command 2: install on first use, then run the whole test suite (unit + MPI + CLI).
#
#   launch/test.sh                 # everything
#   launch/test.sh tests/unit -x   # pytest arguments pass through
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/launch/install.sh"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
set +e
"${MPIRL_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "launch/test.sh: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$rc"
