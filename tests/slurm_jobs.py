"""Helpers of the SLURM tests (tests/slurm/): is mpirl's local cluster up, submit a batch script,
read a job's state, wait for one."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_DIR = os.path.join(REPO, "hpc", "slurm")
LOCAL_MARKER = "written by mpirl hpc/slurm/local-cluster.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# A short CartPole run: small net, no evaluations before the final one.
SHORT = ["--learning-starts-per-rank", "200", "--hidden-sizes", "32,32", "--eval-interval", "0",
         "--final-eval-episodes", "4", "--no-tensorboard", "--log-interval", "800"]  # fmt: skip


def node_states() -> dict[str, str]:
    """Node name -> state (``idle``, ``down*``, ...) of the cluster that answers; {} if none."""
    if not shutil.which("sinfo"):
        return {}
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def cluster_up() -> bool:
    return shutil.which("sbatch") is not None and any(
        s.strip("*~#") in ("idle", "mixed", "allocated", "completing") for s in node_states().values()
    )


def local_or_allowed() -> bool:
    """Submit only to the local test cluster, unless MPIRL_TEST_SLURM=1 allows any cluster."""
    if os.environ.get("MPIRL_TEST_SLURM") == "1":
        return True
    try:
        with open("/etc/slurm/slurm.conf", encoding="utf-8") as fh:
            return LOCAL_MARKER in fh.read()
    except OSError:
        return False


def skip_unless_cluster() -> None:
    """Skip the calling test module where no cluster answers, or one that is not ours."""
    if not cluster_up():
        pytest.skip("no SLURM cluster here (hpc/slurm/local-cluster.sh start)", allow_module_level=True)
    if not local_or_allowed():
        pytest.skip(
            "a SLURM cluster answers, but not mpirl's local one; MPIRL_TEST_SLURM=1 to use it", allow_module_level=True
        )


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=10).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(job: str, until: Callable[[dict[str, str]], bool], timeout: float, poll: float = 1.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = job_state(job)
        if until(st):
            return st
        time.sleep(poll)
    pytest.fail(f"job {job} did not get there in {timeout:.0f}s: {job_state(job)}")


def wait_requeued_pending(job: str, timeout: float = 120) -> None:
    """Wait until a requeued job is pending again. SLURM then holds it for the job credential's
    lifetime (``AuthInfo=cred_expire``, 15 s on the local cluster, 120 s by default) before it
    may start: moving its start time to now made slurmd refuse the relaunch ("Job credential
    revoked") and the job ended for good, so the tests wait that short hold out."""
    wait_job(job, lambda s: s.get("JobState") == "PENDING", timeout, poll=0.5)


def read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else "(no output yet)"


class Submitter:
    """sbatch a script of hpc/slurm with MPIRL_HOME = this checkout, its output and run directory
    in ``tmp``; every job it submitted is cancelled at ``close``."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.jobs: list[str] = []

    def __call__(self, script: str, args: list[str], *sbatch_opts: str) -> tuple[str, str]:
        out_file = os.path.join(self.tmp, "job.out")
        env = {**os.environ, "MPIRL_HOME": REPO, "MPIRL_RUN_DIR": os.path.join(self.tmp, "run")}
        cmd = ["sbatch", "--parsable", f"--output={out_file}", *sbatch_opts, os.path.join(SLURM_DIR, script), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
        assert res.returncode == 0, res.stderr
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job, out_file

    def close(self) -> None:
        for job in self.jobs:  # never leave a job behind
            subprocess.run(["scancel", job], capture_output=True)
