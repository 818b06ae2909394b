"""SLURM batch jobs on a real SLURM (hpc/slurm/local-cluster.sh start brings one up here; CI
does). Skipped where sbatch is missing or no cluster answers."""

import json
import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["--learning-starts-per-rank", "200", "--hidden-sizes", "32,32", "--eval-interval", "0",
         "--final-eval-episodes", "4", "--no-tensorboard", "--log-interval", "800"]  # fmt: skip


def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split())


def _local_or_allowed() -> bool:
    """Submit only to the local test cluster, unless MPIRL_TEST_SLURM=1 allows any cluster."""
    if os.environ.get("MPIRL_TEST_SLURM") == "1":
        return True
    try:
        with open("/etc/slurm/slurm.conf", encoding="utf-8") as fh:
            return "written by mpirl hpc/slurm/local-cluster.sh" in fh.read()
    except OSError:
        return False


if not _cluster_up():
    pytest.skip("no SLURM cluster here (hpc/slurm/local-cluster.sh start)", allow_module_level=True)
if not _local_or_allowed():
    pytest.skip(
        "a SLURM cluster answers, but not mpirl's local one; MPIRL_TEST_SLURM=1 to use it", allow_module_level=True
    )


def _job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=10).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


@pytest.fixture
def submit(tmp_path):
    jobs: list[str] = []

    def _submit(script: str, args: list[str], *sbatch_opts: str) -> tuple[str, str]:
        out_file = tmp_path / "job.out"
        env = {**os.environ, "MPIRL_HOME": REPO, "MPIRL_RUN_DIR": str(tmp_path / "run")}
        cmd = ["sbatch", "--parsable", f"--output={out_file}", *sbatch_opts, os.path.join(REPO, "hpc/slurm", script),
               *args]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
        assert res.returncode == 0, res.stderr
        job = res.stdout.strip().split(";")[0]
        jobs.append(job)
        return job, str(out_file)

    yield _submit
    for job in jobs:  # never leave a job behind
        subprocess.run(["scancel", job], capture_output=True)


def _wait(job: str, until, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _job_state(job)
        if until(st):
            return st
        time.sleep(1)
    pytest.fail(f"job {job} did not get there in {timeout:.0f}s: {_job_state(job)}")


def test_short_run_completes_with_checkpoint(submit, tmp_path):
    job, out = submit("train.sbatch", ["--total-env-steps", "2000", *SHORT])
    st = _wait(job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    log = open(out).read()
    assert st["JobState"] == "COMPLETED", log[-3000:]
    assert "on 2 rank(s)" in log and "mpirl: done: CartPole-v1, 2 rank(s), 2,000 env steps" in log
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").is_file()
    assert json.loads((run / "summary.json").read_text())["global_env_steps"] == 2000


def test_preempted_job_checkpoints_requeues_and_resumes(submit, tmp_path):
    total = 12_000
    job, out = submit("train.sbatch", ["--total-env-steps", str(total), *SHORT])
    progress = tmp_path / "run" / "progress.csv"
    deadline = time.monotonic() + 240
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, open(out).read()[-3000:] if os.path.exists(out) else "no output"
        time.sleep(1)
    # What SLURM does before a time limit (--signal=B:USR1@...): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    st = _wait(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1", 600)
    log = open(out).read()
    assert "USR1 received" in log and "requeueing job" in log, log[-3000:]
    assert "(restart 1)" in log
    resumed = [ln for ln in log.splitlines() if ln.startswith("mpirl: resumed from")]
    assert len(resumed) == 1 and "exact resume" in resumed[0]
    stopped_at = int(resumed[0].split(" at ")[1].split(" env steps")[0].replace(",", ""))
    assert 0 < stopped_at < total  # the counter continued, it did not restart
    assert f"mpirl: done: CartPole-v1, 2 rank(s), {total:,} env steps" in log
    assert st["ExitCode"] == "0:0"
