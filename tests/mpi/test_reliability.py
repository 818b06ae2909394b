"""Failures end the job fast and loudly, and never cost the last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from mpi_launch import kill_job, latest_step, mpirun, spawn_mpirl

pytestmark = pytest.mark.mpi
ENVS = os.path.join(os.path.dirname(__file__), "envs")
BASE = ["--learning-starts-per-rank", "200", "--hidden-sizes", "32,32", "--eval-interval", "0",
        "--final-eval-episodes", "0", "--log-interval", "800", "--no-tensorboard",
        "--checkpoint-interval", "400"]  # fmt: skip
BACKENDS = ["horovod", "mpi", "torch"]  # every proof here runs on each (torch: Gloo on the CPU)


def _fault_env(kind, after=300, rank=1):
    return {"PYTHONPATH": ENVS + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPIRL_TEST_FAULT": kind,
            "MPIRL_TEST_FAULT_AFTER": str(after), "MPIRL_TEST_FAULT_RANK": str(rank)}  # fmt: skip


def _leftovers(marker):
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [p for p in out.stdout.split() if int(p) != os.getpid()]


def _latest_loads(run):
    folder = run / "checkpoints"
    path = folder / (folder / "latest").read_text().strip()
    out = subprocess.run([sys.executable, "-m", "mpirl.inspect", str(path)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    with h5py.File(path, "r") as f:
        for name in f["model/online"]:
            assert np.isfinite(f["model/online"][name][()]).all()
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_on_rank_1_aborts_job_fast_with_message(tmp_path, backend):
    run = tmp_path / "run-exc"
    t0 = time.monotonic()
    res = mpirun(["-m", "mpirl.train", *BASE, "--env", "FaultyCartPole-v0", "--env-module", "faulty_envs",
                  "--total-env-steps", "400000", "--run-dir", str(run), "--backend", backend],
                 env=_fault_env("raise", after=400), timeout=120)  # fmt: skip
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60  # start-up + 800 steps + abort
    assert "mpirl: rank 1 failed: RuntimeError: injected fault" in res.stderr
    assert not _leftovers(str(run))
    _latest_loads(run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_of_one_rank_ends_job_within_30s(tmp_path, backend):
    run = tmp_path / "run-kill"
    proc = spawn_mpirl([*BASE, "--total-env-steps", "400000", "--run-dir", str(run), "--backend", backend])
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        victim = None
        for pid in _leftovers(str(run)):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if b"OMPI_COMM_WORLD_RANK=1\0" in fh.read():
                        victim = int(pid)
            except OSError:
                continue
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f}s to end after rank 1 died"
    assert "rank 1" in err and ("signal 9" in err or "Killed" in err), err[-2000:]
    # A rank whose collective failed because rank 1 died says so, naming it (Gloo reports the
    # lost peer at once; under Horovod mpirun usually ends rank 0 before it can say anything).
    failed = [ln for ln in err.splitlines() if ln.startswith("mpirl: rank 0 failed")]
    assert all("rank 1 (pid" in ln and "died first" in ln for ln in failed), failed
    time.sleep(0.5)
    assert not _leftovers(str(run))
    _latest_loads(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["hang", "hang_gil"])
def test_env_step_that_never_returns_on_rank_1_ends_job_naming_it(tmp_path, kind, backend):
    """hang: step() sleeps in Python; the watchdog thread names rank 1 and its phase, MPI_Abort(5).
    hang_gil: step() blocks in C holding the GIL, so the thread cannot run; the SIGALRM backstop
    prints rank 1's stacks and ends it, and mpirun names it."""
    run, mark = tmp_path / f"run-{kind}", tmp_path / "stalled"
    res = mpirun(["-m", "mpirl.train", *BASE, "--env", "FaultyCartPole-v0", "--env-module", "faulty_envs",
                  "--total-env-steps", "400000", "--run-dir", str(run), "--backend", backend, "--stall-timeout", "5"],
                 env={**_fault_env(kind, after=300), "MPIRL_TEST_FAULT_MARK": str(mark)}, timeout=180)  # fmt: skip
    stalled_for = time.time() - mark.stat().st_mtime  # from the first hanging step to the job's end
    assert stalled_for < 30, f"the job ended {stalled_for:.0f} s after the stall"
    if kind == "hang":
        assert res.returncode == 5, res.output[-3000:]
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
        assert len(lines) == 1, res.stderr[-3000:]
        assert lines[0].startswith("mpirl: error: rank 1 made no progress for 5 s in phase 'env step' (iteration ")
        assert lines[0].endswith("global env steps); ending the job (--stall-timeout 5)")
        assert "in step\n    time.sleep(1.0)" in res.stderr  # rank 1's main thread, where it hangs
    else:
        # Horovod: 128 + SIGALRM. Gloo sees rank 1's sockets close and rank 0 aborts the job too,
        # which can reach mpirun before rank 1's exit status does (then: signal 9, 137).
        assert res.returncode == 128 + 14 or (backend == "torch" and res.returncode == 128 + 9), res.output[-3000:]
        assert "process rank 1 with PID" in res.stderr and "exited on signal" in res.stderr, res.stderr[-3000:]
        assert 'faulty_envs.py", line' in res.stderr  # faulthandler's dump shows where it hangs
        assert "mpirl: error: rank 0 waited" not in res.stderr  # the grace let rank 1 go first
    assert not _leftovers(str(run))


def test_healthy_run_and_resume_with_a_short_stall_timeout_finish(tmp_path):
    """Checkpoints, evaluations and a resume's restore stay within a 3 s --stall-timeout."""
    run = tmp_path / "run"
    args = [*BASE, "--eval-interval", "800", "--eval-episodes", "4", "--final-eval-episodes", "4",
            "--stall-timeout", "3", "--run-dir", str(run)]  # fmt: skip
    for steps, extra in ((2400, []), (3200, ["--resume", "auto"])):
        res = mpirun(["-m", "mpirl.train", *args, "--total-env-steps", str(steps), *extra], timeout=180)
        assert res.returncode == 0, res.output[-3000:]
        assert "made no progress" not in res.stderr and "waited" not in res.stderr
    assert "resumed from" in res.stdout


def test_nan_rewards_on_one_rank_skip_updates_then_stop_on_every_rank(tmp_path):
    run = tmp_path / "run-nan"
    res = mpirun(["-m", "mpirl.train", *BASE, "--env", "FaultyCartPole-v0", "--env-module", "faulty_envs",
                  "--total-env-steps", "400000", "--max-nonfinite-updates", "5", "--buffer-size-per-rank", "400",
                  "--run-dir", str(run)], env=_fault_env("nan", after=250), timeout=180)  # fmt: skip
    assert res.returncode == 3, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all("5 updates in a row had a non-finite averaged gradient" in ln for ln in lines)
    _latest_loads(run)  # weights in the newest checkpoint are finite


def test_unusable_run_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "800", "--run-dir", str(blocker / "run")],
                 timeout=90)  # fmt: skip
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all("is not usable: Not a directory" in ln for ln in lines), res.stderr[-2000:]


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_at_start_is_a_clear_error(tiny_fs):
    (tiny_fs / "filler").write_bytes(b"\0" * (2_700_000))
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "800", "--run-dir", str(tiny_fs / "run")],
                 timeout=90)  # fmt: skip
    assert res.returncode == 2
    assert "is not usable: No space left on device" in res.stderr, res.stderr[-2000:]


def test_disk_filling_up_keeps_previous_checkpoint_and_fails_the_end(tiny_fs):
    run = tiny_fs / "run"
    # Replay grows ~40 B/transition per rank: early checkpoints fit in 3 MiB, later ones do not.
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "60000", "--checkpoint-interval", "4000",
                  "--keep-checkpoints", "1", "--run-dir", str(run)], timeout=300)  # fmt: skip
    assert res.returncode == 4, res.output[-3000:]
    assert "not enough free space" in res.stdout and "the previous checkpoint is kept" in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error: the final checkpoint")]
    assert len(lines) == 2
    assert not list((run / "checkpoints").glob("*.tmp"))  # the failed write left nothing behind
    path = _latest_loads(run)
    assert int(h5py.File(path, "r").attrs["global_env_steps"]) < 60000
    assert "mpirl: done: CartPole-v1, 2 rank(s), 60,000 env steps" in res.stdout  # training went on


def test_two_jobs_on_one_run_dir_the_second_is_refused_then_takes_over_a_dead_one(tmp_path):
    """A run directory belongs to one job: a second job started on it while the first runs stops
    at once (exit 2 on every rank, naming the holder's host and pid) and writes nothing there; once
    the first is killed (its lock left behind), a resume takes the directory over."""
    run = tmp_path / "run"
    first = spawn_mpirl([*BASE, "--total-env-steps", "400000", "--run-dir", str(run), "--checkpoint-interval", "2000"])
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first job did not checkpoint"
            time.sleep(0.2)
        config = (run / "config.json").read_bytes()
        second = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "400000", "--run-dir", str(run),
                         "--resume", "auto"], timeout=120)  # fmt: skip
        assert second.returncode == 2, second.output[-3000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("mpirl: error:")]
        assert len(lines) == 2 and all("is in use by another job (host" in ln for ln in lines), second.stderr[-2000:]
        assert (run / "config.json").read_bytes() == config and first.poll() is None
    finally:
        kill_job(first)
        first.communicate()
    latest = latest_step(run)
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", str(latest + 800), "--run-dir", str(run),
                  "--resume", "auto"], timeout=180)  # fmt: skip
    assert res.returncode == 0 and "resumed from" in res.stdout, res.output[-3000:]
    assert not (run / ".mpirl-lock").exists()  # released at the end
