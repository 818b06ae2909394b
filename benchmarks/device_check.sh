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
#   b. Pong at 1 rank on the GPU, stepped by gymnasium (b_pong) and by EnvPool (b_pong_envpool):
#      acting and training frames/s, updates/s, GPU busy share, and the share of an iteration
#      spent in env, replay sample, host-to-device copy, update and allreduce
#      (benchmarks/profile_step.py).
#   e. (run after b) the host side of that iteration on CUDA: the iteration at 16, 4 and 1 torch
#      threads, one sync, one tiny launch, a batch's copy three ways, the greedy forward, and
#      the profiler's top operators (benchmarks/gpu_overhead.py), since b found the GPU idle.
#   c. 2 ranks share the one GPU through torch.distributed Gloo (NCCL refuses two ranks on one
#      GPU), started with torchrun (the machine has no MPI runtime): replicas bitwise identical.
#   d. A checkpoint written on CUDA resumes on the CPU, and one written on the CPU on CUDA.
#   f. (last, so it never costs the checks above) step b's EnvPool profile again with
#      --precision bf16: its frames/s and update share beside b_pong_envpool's float32 ones.
# Then benchmarks/device_summary.py writes $OUT/device_check.json and prints a table for
# BENCHMARKS.md ($OUT/device_check.txt); every log, step result and run summary (not the
# checkpoints) goes into $OUT/device_check_logs.tar.gz. Three files, since the device tool
# brings back at most eight. The steps work in a scratch folder outside $OUT.
#
# The whole check keeps to DEVICE_CHECK_BUDGET_S seconds (default 420, inside the device tool's
# 10-minute command limit): each step's timeout is cut to what is left, and a step with under
# 15 s left is skipped (exit 124), so a slow step costs the later ones, never the results.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dry=0
[ "${1:-}" = --dry ] && dry=1
out=${OUT:-$repo/runs/device-check}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
budget=${DEVICE_CHECK_BUDGET_S:-420}

# Wheels carried from device_prepare.sh (the device has no network), installed out of the way.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$dry" = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        echo "device_check: warning: carried wheels did not install" >&2
    for t in .whl/*.tar.gz; do [ -e "$t" ] && tar -C /tmp/site -xzf "$t"; done  # EnvPool, slimmed
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
    e_iters=5
    c_steps=2000
    d_steps=1200
else
    dev=cuda
    a_args=()
    b_iters=400
    e_iters=100
    c_steps=30000
    d_steps=6000
fi
quiet=(--no-tensorboard --log-interval 100000)
status=0
reserve=20  # seconds kept for the summary and the packing at the end
step() {  # step NAME TIMEOUT CMD...: run within the budget, log to $work/NAME.log, keep the exit code
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS left=$((budget - reserve - SECONDS)) rc
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        rc=124
        echo "skipped: the check's budget of $budget s was spent" >"$work/$name.log"
    else
        timeout "$limit" "$@" >"$work/$name.log" 2>&1
        rc=$?
    fi
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$work/$name.rc.json"
    echo "device_check: $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || { status=1; tail -5 "$work/$name.log"; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (dry run)"; } \
    >"$work/gpu.txt"
"$py" -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())' \
    >"$work/versions.txt" 2>&1

step a_cartpole 150 "$py" -m mpirl.train --device "$dev" --seed 1 --run-dir "$work/a_cartpole" "${quiet[@]}" "${a_args[@]}"
for eb in gymnasium envpool; do  # the same profile on each env backend (EnvPool where it imports)
    name=b_pong$([ "$eb" = envpool ] && echo _envpool)
    step "$name" 90 "$py" benchmarks/profile_step.py --config configs/atari-dqn.toml --env ALE/Pong-v5 \
        --env-backend "$eb" --device "$dev" --iterations "$b_iters" --json "$work/$name.json"
done
step e_overhead 90 "$py" benchmarks/gpu_overhead.py --config configs/atari-dqn.toml --env ALE/Pong-v5 \
    --env-backend envpool --device "$dev" --iterations "$e_iters" --json "$work/e_overhead.json"
step c_shared_gpu 120 "$py" -m torch.distributed.run --standalone --nproc-per-node 2 -m mpirl.train \
    --backend gloo --device "$dev" --total-env-steps "$c_steps" --learning-starts-per-rank 500 --eval-interval 0 \
    --final-eval-episodes 2 --run-dir "$work/c_shared" "${quiet[@]}"
# d: half the steps on one device, the rest resumed on the other (and the reverse).
other=cpu  # the other device of step d
short=(--learning-starts-per-rank 500 --eval-interval 0 --final-eval-episodes 2 --checkpoint-interval $((d_steps / 2)))
step d_cuda_first 60 "$py" -m mpirl.train --device "$dev" --total-env-steps $((d_steps / 2)) \
    --run-dir "$work/d_cuda_to_cpu" "${short[@]}" "${quiet[@]}"
step d_then_cpu 60 "$py" -m mpirl.train --device "$other" --total-env-steps "$d_steps" --resume auto \
    --run-dir "$work/d_cuda_to_cpu" "${short[@]}" "${quiet[@]}"
step d_cpu_first 60 "$py" -m mpirl.train --device "$other" --total-env-steps $((d_steps / 2)) \
    --run-dir "$work/d_cpu_to_cuda" "${short[@]}" "${quiet[@]}"
step d_then_cuda 60 "$py" -m mpirl.train --device "$dev" --total-env-steps "$d_steps" --resume auto \
    --run-dir "$work/d_cpu_to_cuda" "${short[@]}" "${quiet[@]}"
step f_pong_bf16 60 "$py" benchmarks/profile_step.py --config configs/atari-dqn.toml --env ALE/Pong-v5 \
    --env-backend envpool --device "$dev" --iterations "$b_iters" --precision bf16 --json "$work/f_pong_bf16.json"

"$py" benchmarks/device_summary.py "$work" $([ "$dry" = 1 ] && echo --dry) | tee "$out/device_check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
cp "$work/device_check.json" "$out/" 2>/dev/null || status=1
(cd "$work" && find . -type f ! -name '*.h5' ! -path '*/tensorboard/*' -print0 |
    tar --null -czf "$out/device_check_logs.tar.gz" -T -) || status=1
rm -rf "$work"
exit "$status"
