"""Run a command under mpirun with a hard timeout, from tests.

A deadlock fails the test instead of hanging it: the whole process group is killed at the
deadline and the output so far goes into the failure message.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest

MPIRUN = shutil.which("mpirun")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def mpi_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        # Containers often forbid the cross-memory-attach syscalls OpenMPI's shared memory uses.
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMPI_MCA_mpi_yield_when_idle="1",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
    )
    env.update(extra or {})
    return env


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """``kill -9`` a job started in its own session: mpirun and every process below it. Open MPI
    puts each rank in a process group of its own, so killing mpirun's group alone leaves the ranks
    running (and writing checkpoints or recordings) for a second or two, as a batch system's kill
    of the job would not."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd: Sequence[str], timeout: float, env: Optional[dict[str, str]] = None, cwd: Optional[str] = None) -> Result:
    """Run ``cmd`` in its own process group; kill the group and fail the test at ``timeout``."""
    import time

    t0 = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or mpi_env(), cwd=cwd, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout:.0f}s (deadlock?): {' '.join(cmd)}\n"
            f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        )
    return Result(proc.returncode, out, err, time.monotonic() - t0)


def spawn_mpirl(args: Sequence[str], np: int = 2, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """Start ``mpirun -np N python -m mpi4py -m mpirl.train ARGS`` in the background, in its own
    process group (for tests that signal or kill it); the caller must end it."""
    if MPIRUN is None:
        pytest.fail("mpirun not found: run the README's test command, which installs OpenMPI")
    cmd = [MPIRUN, "-np", str(np), "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "mpi4py", "-m",
           "mpirl.train", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(env),
                            start_new_session=True)  # fmt: skip


def mpirun(args: Sequence[str], np: int = 2, timeout: float = 240, env: Optional[dict[str, str]] = None,
           cwd: Optional[str] = None) -> Result:  # fmt: skip
    """``mpirun -np N python -m mpi4py ARGS`` (an exception on any rank aborts the job)."""
    if MPIRUN is None:
        pytest.fail("mpirun not found: run the README's test command, which installs OpenMPI")
    cmd = [MPIRUN, "-np", str(np), "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "mpi4py", *args]
    return run(cmd, timeout, env=mpi_env(env), cwd=cwd)


def latest_checkpoint(run_dir):
    """The checkpoint a run directory's ``checkpoints/latest`` names (a pathlib.Path)."""
    folder = run_dir / "checkpoints"
    return folder / (folder / "latest").read_text().strip()


def latest_step(run_dir) -> int:
    """The global env steps of the checkpoint ``checkpoints/latest`` names, read from the file
    (its ``global_env_steps`` attribute), not parsed from its name."""
    import h5py

    with h5py.File(latest_checkpoint(run_dir), "r") as f:
        return int(f.attrs["global_env_steps"])


def checkpoint_datasets(path) -> dict:
    """Every dataset of a checkpoint, read whole, by HDF5 path (for bitwise comparisons)."""
    import h5py

    out: dict = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
