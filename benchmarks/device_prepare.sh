#!/usr/bin/env bash
# Prepare what benchmarks/device_check.sh needs on a lent GPU machine that has no network and
# lacks some packages (see the device tool's KINDS.md: Python 3.12, torch with CUDA, h5py,
# numpy, opencv, cloudpickle; no gymnasium, no ale-py, no EnvPool, no MPI runtime). Downloads
# their wheels, for Python 3.12 on x86-64, into .whl/ (ignored by git through .git/info/exclude),
# which the device tool carries (`carry: [".whl"]`) and device_check.sh installs into /tmp/site.
#
# EnvPool's wheel (53 MB) and its assets' (62 MB) would not fit the device's 64 MiB carry, so
# EnvPool travels as .whl/envpool-slim.tar.gz: the wheel's package with its Atari and classic
# control engines only (the other engines' folders removed, and its entry.py registering those
# two families), and the assets' Atari ROMs. The engines themselves are the wheel's, unchanged.
#
#   benchmarks/device_prepare.sh        # here, with the package registry reachable
#
# Versions are the ones this checkout's virtualenv runs, so both machines run the same envs.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${MPIRL_PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
wanted=(
    "gymnasium==$(version gymnasium 1.4.0)"
    "farama-notifications==$(version farama-notifications 0.0.6)"
    "ale-py==$(version ale-py 0.12.1)"
    "dm-env==$(version dm-env 1.6)"
    "dm-tree==$(version dm-tree 0.1.10)"
    "optree==$(version optree 0.20.0)"
)
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${wanted[@]}"

# EnvPool, slimmed (see above).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$tmp/wheels" \
    "envpool==$(version envpool 1.2.5)" "envpool-assets==$(version envpool-assets 0.3.0)"
mkdir -p "$tmp/site"
unzip -q "$tmp"/wheels/envpool-[0-9]*.whl -d "$tmp/site"
unzip -q "$tmp"/wheels/envpool_assets-*.whl 'envpool_assets/__init__.py' 'envpool_assets/atari/*' -d "$tmp/site"
find "$tmp/site/envpool" -mindepth 1 -maxdepth 1 -type d \
    ! -name atari ! -name classic_control ! -name python -exec rm -rf {} +
cat >"$tmp/site/envpool/entry.py" <<'PY'
"""Registration of the engines this slim copy keeps (benchmarks/device_prepare.sh)."""

import envpool.atari.registration  # noqa: F401
import envpool.classic_control.registration  # noqa: F401
PY
rm -f .whl/envpool-slim.tar.gz
tar -C "$tmp/site" -czf .whl/envpool-slim.tar.gz .
ls -la .whl
du -sh .whl
echo "device_prepare: carry .whl with benchmarks/device_check.sh (the device tool's carry: [\".whl\"])"
