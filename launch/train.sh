#!/usr/bin/env bash
# README command 1: install on first use, then train under mpirun (2 ranks by default).
#
#   launch/train.sh                              # CartPole-v1, 2 ranks, default options
#   MPIRL_NP=4 launch/train.sh --env Acrobot-v1   # any option of `python -m mpirl.train --help`
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/launch/install.sh"
exec "$repo/launch/mpirun.sh" -np "${MPIRL_NP:-2}" -- python -m mpirl.train "$@"
