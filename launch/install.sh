#!/usr/bin/env bash
# mpirl installer: OpenMPI, a virtualenv with torch, horovod (PyTorch + MPI + Gloo), mpirl.
#
#   launch/install.sh            # idempotent; seconds when everything is in place
#
# Environment (all optional):
#   MPIRL_VENV          virtualenv to create/use            (default: <repo>/.venv)
#   MPIRL_CACHE         wheel cache, shared by clones         (default: ~/.cache/mpirl)
#   MPIRL_PYTHON        interpreter for a new venv            (default: python3)
#   MPIRL_TORCH_SPEC    pip requirement for torch             (default: torch==2.13.0 without
#                       a GPU; torch with nvidia-smi present, i.e. PyPI's CUDA build)
#   MPIRL_TORCH_INDEX   extra index for torch, e.g. https://download.pytorch.org/whl/cu124
#   MPIRL_EXTRAS        extras of mpirl to install            (default: test)
#   HOROVOD_GPU_OPERATIONS=NCCL  build horovod with NCCL (set automatically when nvcc
#                       and nvidia-smi are present; export HOROVOD_GPU_OPERATIONS= to disable).
#                       Without it on a CUDA host, GPU collectives go through torch.distributed
#                       NCCL (mpirl's --backend auto), which every CUDA torch wheel carries.
#
# Horovod 0.28.1 (its last release) declares C++14, which torch >= 2.1 cannot compile with;
# we patch both CMakeLists.txt to C++17, build once with pip wheel and keep the wheel in
# MPIRL_CACHE keyed by python, torch, MPI and GPU settings, so later installs take seconds.
set -euo pipefail

HOROVOD_VERSION=0.28.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MPIRL_VENV:-$repo/.venv}
cache=${MPIRL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpirl}
extras=${MPIRL_EXTRAS-test}

say() { printf '[mpirl-install] %s\n' "$*" >&2; }
die() { printf '[mpirl-install] error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    # Only as root on Debian/Ubuntu; elsewhere say exactly what is missing.
    if is_root && have apt-get; then
        say "installing Debian packages: $*"
        if [ ! -f /tmp/.mpirl-apt-updated ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq && touch /tmp/.mpirl-apt-updated
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        return 1
    fi
}

# --- 1. system prerequisites: MPI, C++ compiler, cmake ------------------------------
if ! have mpirun || ! have mpicxx; then
    apt_install openmpi-bin libopenmpi-dev ||
        die "mpirun/mpicxx not found: install an MPI with its compiler wrappers (Debian: apt-get install openmpi-bin libopenmpi-dev; clusters: module load openmpi)"
fi
if ! have g++ && ! have c++; then
    apt_install g++ make || die "no C++ compiler (g++) found: install one (Debian: apt-get install g++ make)"
fi
if ! have make; then
    apt_install make || die "make not found: install it (Debian: apt-get install make)"
fi
python=${MPIRL_PYTHON:-python3}
have "$python" || die "$python not found: install Python >= 3.9 or set MPIRL_PYTHON"

# --- 2. virtualenv ------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$python" -m venv "$venv" || die "could not create a virtualenv at $venv (Debian: apt-get install python3-venv)"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# Fast path: a stamp of everything that decides the install; when it matches and the
# imports work, there is nothing to do.
stamp_src=$(cat "$repo/setup.cfg" "$repo/launch/install.sh"; echo "$extras ${MPIRL_TORCH_SPEC-} ${HOROVOD_GPU_OPERATIONS-}")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f "$venv/.mpirl-stamp" ] && [ "$(cat "$venv/.mpirl-stamp")" = "$stamp" ] &&
    "$py" -c 'import horovod.torch, mpi4py.MPI, mpirl' 2>/dev/null; then
    exit 0
fi

# --- 3. torch -----------------------------------------------------------------------
if ! "$py" -c 'import torch' 2>/dev/null; then
    if [ -n "${MPIRL_TORCH_SPEC-}" ]; then
        spec=$MPIRL_TORCH_SPEC
    elif have nvidia-smi && nvidia-smi -L >/dev/null 2>&1; then
        spec=torch
    else
        spec=torch==2.13.0
    fi
    say "installing $spec"
    if [ -n "${MPIRL_TORCH_INDEX-}" ]; then
        pip install "$spec" --extra-index-url "$MPIRL_TORCH_INDEX"
    else
        pip install "$spec"
    fi
fi
"$py" -c 'import numpy' 2>/dev/null || pip install 'numpy>=1.24'
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "cpu")')

# --- 4. mpi4py, built against this machine's MPI and cached ---------------------------
# No binary wheel from PyPI: it may carry an MPI of its own, not the one mpirun starts.
mpi_id=$(mpirun --version 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9.\n' '_')
py_id=$("$py" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
if ! "$py" -c 'import mpi4py.MPI' 2>/dev/null; then
    mpi4py_dir="$cache/mpi4py/$(printf '%s' "$py_id|$mpi_id|$(command -v mpicc)" | sha256sum | cut -c1-16)"
    wheel=$(ls "$mpi4py_dir"/mpi4py-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "building mpi4py against $(command -v mpicc) (a few minutes, once)"
        tmp=$(mktemp -d)
        MPICC=$(command -v mpicc) pip wheel --no-deps --no-binary mpi4py -w "$tmp" 'mpi4py>=3.1'
        built=$(ls "$tmp"/mpi4py-*.whl)
        mkdir -p "$mpi4py_dir"
        cp "$built" "$mpi4py_dir/.partial" && mv "$mpi4py_dir/.partial" "$mpi4py_dir/$(basename "$built")"
        rm -rf "$tmp"
        wheel="$mpi4py_dir/$(basename "$built")"
    fi
    pip install "$wheel"
fi

# --- 5. horovod, from the wheel cache or built once -----------------------------------
if [ -z "${HOROVOD_GPU_OPERATIONS+x}" ] && have nvcc && [ "$torch_cuda" != cpu ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
fi
gpu_ops=${HOROVOD_GPU_OPERATIONS:-none}
key=$(printf '%s' "$HOROVOD_VERSION|$py_id|$torch_version|$torch_cuda|$mpi_id|$gpu_ops" | sha256sum | cut -c1-16)
wheel_dir="$cache/horovod/$key"

if ! "$py" -c 'import horovod.torch' 2>/dev/null; then
    wheel=$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        have cmake || pip install 'cmake>=3.13'
        export PATH="$venv/bin:$PATH"
        have cmake || die "cmake not found and could not be installed with pip"
        say "building horovod $HOROVOD_VERSION (torch $torch_version, $mpi_id, GPU ops: $gpu_ops); takes ~8 min on 2 cores, once"
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
        tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
        src="$work/horovod-$HOROVOD_VERSION"
        # torch >= 2.1 headers need C++17 (see header comment).
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" &&
            die "could not patch horovod's C++ standard"
        pip install setuptools wheel packaging pyyaml psutil cloudpickle
        mkdir -p "$work/out"
        (
            cd "$src"
            export CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
                HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
            export MAKEFLAGS="-j$(nproc)"
            "$py" -m pip wheel --no-deps --no-build-isolation -w "$work/out" . >"$work/build.log" 2>&1
        ) || { tail -n 40 "$work/build.log" >&2; die "horovod build failed (full log above)"; }
        mkdir -p "$wheel_dir"
        # Copy then rename, so a concurrent installer never sees a half-written wheel.
        built=$(ls "$work"/out/horovod-*.whl)
        cp "$built" "$wheel_dir/.partial" && mv "$wheel_dir/.partial" "$wheel_dir/$(basename "$built")"
        wheel="$wheel_dir/$(basename "$built")"
        say "cached $wheel"
    else
        say "installing cached horovod wheel $(basename "$wheel")"
    fi
    pip install "$wheel"
fi
"$py" -c 'import horovod.torch as hvd; assert hvd.mpi_built(), "horovod has no MPI"' ||
    die "horovod imports but was not built with MPI; remove $wheel_dir and rerun"
if [ "$torch_cuda" != cpu ] && [ "$gpu_ops" = none ]; then
    # A CUDA host without nvcc (the common case with pip's CUDA torch): Horovod serves CPU
    # tensors only, and a CUDA tensor would crash it at the first allreduce. mpirl's
    # --backend auto sends CUDA collectives through torch.distributed NCCL instead.
    say "CUDA torch ($torch_cuda) but no nvcc: Horovod is built for CPU tensors only; GPU collectives will go"
    say "through torch.distributed NCCL (--backend auto). Check: .venv/bin/python -m mpirl.train --dry-run"
fi

# --- 6. mpirl itself ----------------------------------------------------------------
if [[ ",$extras," == *",envpool,"* || ",$extras," == *",test,"* ]] && ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "EnvPool's wheels need Python >= 3.11 ($("$py" -V)): envpool is skipped; --env-backend auto uses gymnasium"
fi
target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
say "installing mpirl (editable${extras:+, extras: $extras})"
pip install -e "$target"

echo "$stamp" >"$venv/.mpirl-stamp"
say "ready: $venv (torch $torch_version/$torch_cuda, horovod $HOROVOD_VERSION, $("$py" -c 'import mpi4py.MPI as M; print(M.Get_library_version().strip(chr(0)).splitlines()[0])'))"
