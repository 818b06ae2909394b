"""Shared helpers for the benchmarks: run mpirl under the local launcher, read its summary."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "mpirun.sh")
RESULTS = os.path.join(REPO, "benchmarks", "results")
VENV_PYTHON = os.path.join(os.environ.get("MPIRL_VENV", os.path.join(REPO, ".venv")), "bin", "python")
# Where --quick (smoke) runs put their results by default: runs/ is git-ignored, so smoke figures
# never overwrite or join the committed ones.
QUICK_RESULTS = os.path.join(REPO, "runs", "bench-quick")


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def run_timed(
    cmd: Sequence[str], env: Optional[dict[str, str]] = None, timeout: float = 900, cwd: Optional[str] = None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to its exit; return the process and its wall time in seconds, measured
    from outside (interpreter start-up and imports included). Raises on a non-zero exit."""
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the parent folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)


def worktree(rev: str) -> str:
    """A git worktree of ``rev`` of this repository (in a temporary folder), for benchmarks
    that compare a commit with the current code in one run."""
    path = tempfile.mkdtemp(prefix="mpirl-rev-")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", path, rev], check=True)
    return path


def fresh_dir(path: str) -> str:
    """Remove ``path`` if it exists (a run refuses a folder that holds a run, and metrics.jsonl
    is appended to) and create its parent; return the absolute path."""
    path = os.path.abspath(path)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def rss_mib(pid: Union[int, str] = "self") -> float:
    """Resident memory (VmRSS) of process ``pid``, MiB; NaN when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_mpirl(
    np: int,
    args: Sequence[str],
    env: Optional[dict[str, str]] = None,
    timeout: float = 900,
    run_dir: Optional[str] = None,
    tree: Optional[str] = None,
    core: Optional[int] = None,
    plain: bool = False,
) -> dict:
    """Run ``python -m mpirl.train ARGS`` on ``np`` ranks; return summary.json plus the
    launcher-measured wall time (``total_wall_s``, start-up included).

    ``run_dir``: keep the run directory there (replaced if it exists; its checkpoints are
    deleted after the run, only the logs are kept); default: a temporary one. ``core``: run
    the whole job on this one core (taskset; mpirun's own binding off, since it would pick
    core 0 whatever the taskset), so that concurrent jobs do not share a core. ``plain``: the
    command a user types, ``mpirun -np N python -m mpi4py -m mpirl.train``, instead of
    launch/mpirun.sh (no binding, wait-mode or other flags of ours; as root, the root allowance)."""
    with tempfile.TemporaryDirectory(prefix="mpirl-bench-") as tmp:
        target = fresh_dir(run_dir) if run_dir else os.path.join(tmp, "run")
        pin = [] if core is None else ["taskset", "-c", str(core)]
        unbind = [] if core is None else ["--oversubscribe"]  # launch/mpirun.sh: --bind-to none
        launcher = [LAUNCH, "-np", str(np), *unbind, "--", "python"]
        if plain:
            launcher = ["mpirun", "-np", str(np), *unbind, VENV_PYTHON, "-m", "mpi4py"]
            env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(env or {})}
        cmd = [*pin, *launcher, "-m", "mpirl.train", *args, "--run-dir", target, "--no-tensorboard"]
        # tree: another checkout of mpirl (e.g. a git worktree of an older commit) whose
        # package `python -m` then imports first, being the working directory.
        _, wall = run_timed(cmd, env=env, timeout=timeout, cwd=tree)
        summary = read_json(os.path.join(target, "summary.json"))
        if run_dir:  # the curves are what is kept; checkpoints are megabytes of replay
            shutil.rmtree(os.path.join(target, "checkpoints"), ignore_errors=True)
    summary["total_wall_s"] = wall
    return summary
