#!/usr/bin/env bash
# The body of mpirl's batch scripts (train.sbatch, sweep.sbatch exec it, so it IS the batch shell
# and receives the --signal=B:USR1 SLURM sends before the time limit).
#
# It starts one job step of `python -m mpirl.train` on all tasks of the allocation, forwards
# USR1/TERM to it (the ranks agree on a step, rank 0 writes a checkpoint, they exit 0), and then
# requeues the job, whose next start resumes from that checkpoint (--resume auto).
#
# A step that fails (a rank killed, by the OOM killer or with its node) is requeued too, but only
# when this start wrote a newer checkpoint than the one it resumed from: every retry then resumes
# further on, and a run that fails before making progress (a bug, a bad option) ends the job with
# the step's exit code instead of repeating. MPIRL_REQUEUE_ON_FAILURE=0 turns this off. A node
# that stops answering is SLURM's to handle: it kills the job (NODE_FAIL) and requeues it (the
# scripts ask for --requeue), on nodes that still work.
#
# Environment: MPIRL_HOME (repo; default $SLURM_SUBMIT_DIR), MPIRL_VENV (default $MPIRL_HOME/.venv),
# MPIRL_RUN_DIR (default $MPIRL_HOME/runs/<job name>-<job id>[_<array task>]),
# MPIRL_LAUNCHER=srun|mpirun (default srun), MPIRL_SRUN_MPI (default pmix),
# MPIRL_REQUEUE_ON_FAILURE=1|0 (default 1: see above).
# Arguments are passed to `python -m mpirl.train`.
set -uo pipefail

home=${MPIRL_HOME:-${SLURM_SUBMIT_DIR:?run this inside a SLURM job, or set MPIRL_HOME}}
venv=${MPIRL_VENV:-$home/.venv}
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    job_key="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    job_key="${SLURM_JOB_ID:?not inside a SLURM job}"
fi
run_dir=${MPIRL_RUN_DIR:-$home/runs/${SLURM_JOB_NAME:-mpirl}-$job_key}
ntasks=${SLURM_NTASKS:-1}
restarts=${SLURM_RESTART_COUNT:-0}
py="$venv/bin/python"
[ -x "$py" ] || { echo "[mpirl] error: no virtualenv at $venv (run launch/install.sh first)" >&2; exit 2; }

echo "[mpirl] job $job_key (restart $restarts) on $(hostname -s): $ntasks task(s) on ${SLURM_JOB_NUM_NODES:-1} node(s), run dir $run_dir"

# One core per rank: Horovod's background thread shares it, so let MPI yield while it waits.
if [ "${SLURM_CPUS_PER_TASK:-1}" -le 1 ]; then
    export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
fi

# Same world size as tasks asked for, or fail: a PMI mismatch must not become N 1-rank jobs.
args=(-m mpi4py -m mpirl.train --run-dir "$run_dir" --resume auto --expect-world-size "$ntasks" "$@")
case "${MPIRL_LAUNCHER:-srun}" in
    srun) launch=(srun --mpi="${MPIRL_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 "$py" "${args[@]}") ;;
    mpirun)
        [ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        launch=(mpirun -np "$ntasks" "$py" "${args[@]}") ;;
    *) echo "[mpirl] error: MPIRL_LAUNCHER must be srun or mpirun" >&2; exit 2 ;;
esac

# The checkpoint `latest` names (empty if none): what this start resumes from, then what it reached.
latest() { cat "$run_dir/checkpoints/latest" 2>/dev/null || true; }
resumed_from=$(latest)

stop_requested=0
forward() {
    stop_requested=1
    echo "[mpirl] $1 received: asking the ranks to checkpoint and stop"
    kill -USR1 "$step" 2>/dev/null  # srun/mpirun pass USR1 on to every rank
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Requeue this job to resume from its checkpoint. SLURM may have requeued it itself already (a
# node failed: NODE_FAIL with --requeue), and then refuses ("Job is pending execution", while
# this script still runs in the job's completing state); that is no error.
requeue() {
    local out
    out=$(scontrol requeue "${SLURM_JOB_ID}" 2>&1) && return 0
    if [[ $out == *"pending execution"* ]] ||
        scontrol show job -o "${SLURM_JOB_ID}" 2>/dev/null | grep -qE 'JobState=(PENDING|REQUEUE)'; then
        echo "[mpirl] SLURM has requeued job ${SLURM_JOB_ID} already"
        return 0
    fi
    echo "[mpirl] error: scontrol requeue failed: $out" >&2
    return 1
}

"${launch[@]}" &
step=$!
# `wait` returns early when a trapped signal arrives; keep waiting for the step itself.
while :; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break
done

if [ "$stop_requested" = 1 ] && [ "$rc" = 0 ]; then
    echo "[mpirl] checkpoint written; requeueing job ${SLURM_JOB_ID} to resume from it"
    requeue || exit 1
    exit 0
fi
echo "[mpirl] training step ended with exit code $rc"
reached=$(latest)
# Failed (not stopped by a signal, which a cancel also sends) after writing a newer checkpoint.
if [ "$rc" != 0 ] && [ "$stop_requested" = 0 ] && [ "${MPIRL_REQUEUE_ON_FAILURE:-1}" = 1 ] &&
    [ -n "$reached" ] && [ "$reached" != "$resumed_from" ]; then
    echo "[mpirl] the step failed after checkpointing ($reached, resumed from ${resumed_from:-nothing});" \
        "requeueing job ${SLURM_JOB_ID} to resume from it"
    requeue || exit "$rc"
    exit 0
fi
exit "$rc"
