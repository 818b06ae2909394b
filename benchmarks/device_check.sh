#!/usr/bin/env bash
# The GPU check of mpirl, as one command for a lent GPU machine (at most 8 minutes), or, with
# --dry, the same steps on this machine's CPU with small budgets (a test runs it, so it cannot rot
# between device loans).
#
#   benchmarks/device_prepare.sh          # here, once: wheels the device lacks, into .whl/ (ignored)
#   benchmarks/device_check.sh            # there: results in $OUT (else runs/device-check)
#   benchmarks/device_check.sh --dry      # here: CPU only, every step but the GPU
#
# Steps (each with its own timeout; a failed step is reported and the others still run):
#   a. 1 rank on CUDA solves CartPole-v1 with default options.
#   b. Pong at 1 rank on the GPU: acting and training frames/s, updates/s, GPU busy share, and
#      the share of an iteration spent in env, replay sample, host-to-device copy, update and
#      allreduce (benchmarks/profile_step.py).
#   c. 2 ranks share the one GPU through torch.distributed Gloo (NCCL refuses two ranks on one
#      GPU), started with torchrun (the machine has no MPI runtime): replicas bitwise identical.
#   d. A checkpoint written on CUDA resumes on the CPU, and one written on the CPU on CUDA.
# Then benchmarks/device_summary.py writes $OUT/device_check.json and prints a table for
# BENCHMARKS.md.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dry=0
[ "${1:-}" = --dry ] && dry=1
out=${OUT:-$repo/runs/device-check}
mkdir -p "$out"

# Wheels carried from device_prepare.sh (the device has no network), installed out of the way.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$dry" = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        echo "device_check: warning: carried wheels did not install" >&2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${MPIRL_PYTHON:-}
if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python; else py=python3; fi
fi

if [ "$dry" = 1 ]; then
    dev=cpu
    a_args=(--total-env-steps 3000 --learning-starts-per-rank 500 --eval-interval 1500 --eval-episodes 2
            --final-eval-episodes 2)
    b_iters=20
    c_steps=2000
    d_steps=1200
else
    dev=cuda
    a_args=()
    b_iters=400
    c_steps=30000
    d_steps=6000
fi
quiet=(--no-tensorboard --log-interval 100000)
status=0
step() {  # step NAME TIMEOUT CMD...: run, log to $out/NAME.log, remember the exit code
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$out/$name.rc.json"
    echo "device_check: $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || { status=1; tail -5 "$out/$name.log"; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (dry run)"; } \
    >"$out/gpu.txt"
"$py" -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())' \
    >"$out/versions.txt" 2>&1

rm -rf "$out/a_cartpole" "$out/c_shared" "$out/d_cuda_to_cpu" "$out/d_cpu_to_cuda"
step a_cartpole 240 "$py" -m mpirl.train --device "$dev" --seed 1 --run-dir "$out/a_cartpole" "${quiet[@]}" "${a_args[@]}"
step b_pong 240 "$py" benchmarks/profile_step.py --config configs/atari-dqn.toml --env ALE/Pong-v5 --device "$dev" \
    --iterations "$b_iters" --json "$out/b_pong.json"
step c_shared_gpu 180 "$py" -m torch.distributed.run --standalone --nproc-per-node 2 -m mpirl.train \
    --backend gloo --device "$dev" --total-env-steps "$c_steps" --learning-starts-per-rank 500 --eval-interval 0 \
    --final-eval-episodes 2 --run-dir "$out/c_shared" "${quiet[@]}"
# d: half the steps on one device, the rest resumed on the other (and the reverse).
other=cpu  # the other device of step d
short=(--learning-starts-per-rank 500 --eval-interval 0 --final-eval-episodes 2 --checkpoint-interval $((d_steps / 2)))
step d_cuda_first 120 "$py" -m mpirl.train --device "$dev" --total-env-steps $((d_steps / 2)) \
    --run-dir "$out/d_cuda_to_cpu" "${short[@]}" "${quiet[@]}"
step d_then_cpu 120 "$py" -m mpirl.train --device "$other" --total-env-steps "$d_steps" --resume auto \
    --run-dir "$out/d_cuda_to_cpu" "${short[@]}" "${quiet[@]}"
step d_cpu_first 120 "$py" -m mpirl.train --device "$other" --total-env-steps $((d_steps / 2)) \
    --run-dir "$out/d_cpu_to_cuda" "${short[@]}" "${quiet[@]}"
step d_then_cuda 120 "$py" -m mpirl.train --device "$dev" --total-env-steps "$d_steps" --resume auto \
    --run-dir "$out/d_cpu_to_cuda" "${short[@]}" "${quiet[@]}"

"$py" benchmarks/device_summary.py "$out" $([ "$dry" = 1 ] && echo --dry) || status=1
exit "$status"
