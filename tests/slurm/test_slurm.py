"""SLURM batch jobs on a real SLURM (hpc/slurm/local-cluster.sh start brings one up here; CI
does). Skipped where sbatch is missing or no cluster answers."""

import json
import subprocess
import time

import pytest
from slurm_jobs import SHORT, Submitter, read, skip_unless_cluster, wait_job, wait_requeued_pending

pytestmark = pytest.mark.slurm
skip_unless_cluster()


@pytest.fixture
def submit(tmp_path):
    sub = Submitter(str(tmp_path))
    yield sub
    sub.close()


def test_short_run_completes_with_checkpoint(submit, tmp_path):
    job, out = submit("train.sbatch", ["--total-env-steps", "2000", *SHORT])
    st = wait_job(job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    log = read(out)
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
        assert time.monotonic() < deadline, read(out)[-3000:]
        time.sleep(1)
    # What SLURM does before a time limit (--signal=B:USR1@...): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    wait_requeued_pending(job)
    st = wait_job(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1", 600)
    log = read(out)
    assert "USR1 received" in log and "requeueing job" in log, log[-3000:]
    assert "(restart 1)" in log
    resumed = [ln for ln in log.splitlines() if ln.startswith("mpirl: resumed from")]
    assert len(resumed) == 1 and "exact resume" in resumed[0]
    stopped_at = int(resumed[0].split(" at ")[1].split(" env steps")[0].replace(",", ""))
    assert 0 < stopped_at < total  # the counter continued, it did not restart
    assert f"mpirl: done: CartPole-v1, 2 rank(s), {total:,} env steps" in log
    assert st["ExitCode"] == "0:0"
