"""mpirl across two nodes of the local cluster (hpc/slurm/local-cluster.sh start --nodes 2: two
network + UTS namespaces with their own hostname, address and slurmd, joined by a bridge).

What a user of a real cluster relies on: local ranks per node, TCP between nodes and shared
memory within one, checkpoints gathered to rank 0 across the link, identical replicas, and
faults on one node that end the job quickly, leave nothing behind and resume from the last
checkpoint. Skipped where the cluster that answers has fewer than two nodes (the two-node
cluster needs root and network namespaces; launch/test.sh falls back to one node without them).
"""

import json
import os
import re
import signal
import subprocess
import time

import pytest
from slurm_jobs import (
    REPO,
    SHORT,
    SLURM_DIR,
    Submitter,
    job_state,
    node_states,
    read,
    skip_unless_cluster,
    wait_job,
    wait_requeued_pending,
)

pytestmark = pytest.mark.slurm
skip_unless_cluster()
NODES = sorted(n for n in node_states() if re.fullmatch(r"mpirl-n\d+", n))
if len(NODES) < 2:
    pytest.skip(
        f"the SLURM cluster here has {len(node_states())} node(s); two-node tests need "
        "hpc/slurm/local-cluster.sh start --nodes 2 (root, network namespaces)",
        allow_module_level=True,
    )
N1, N2 = NODES[:2]
TWO_NODES = ["-N", "2", "--ntasks-per-node", "1"]
CLUSTER = os.path.join(SLURM_DIR, "local-cluster.sh")
PY = os.path.join(os.environ.get("MPIRL_VENV", os.path.join(REPO, ".venv")), "bin", "python")


@pytest.fixture
def submit(tmp_path):
    sub = Submitter(str(tmp_path))
    yield sub
    sub.close()


def _inspect(run_dir) -> dict:
    out = subprocess.run([PY, "-m", "mpirl.inspect", "--json", "--verify", str(run_dir)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _node_procs(node: str) -> list[str]:
    """Every process of a node but its slurmd, as 'pid command line'."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=10).stdout.split()
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        if cmd and not cmd.startswith("slurmd"):
            found.append(f"{pid} {cmd}")
    return found


def _transports(out: str) -> set[tuple[str, str, str]]:
    """(from node, to node, Open MPI BTL) of every peer a rank talked to, from btl_base_verbose's
    "[host:pid] mca: bml: Using tcp btl for send to [[job,0],2] on node mpirl-n2"; checks that
    nodes talk over TCP and a node's ranks among themselves over shared memory (or self)."""
    found = re.findall(r"\[([^:\]]+):\d+\] mca: bml: Using (\w+) btl for send to \S+ on node (\S+)", out)
    pairs = {(src, dst, btl) for src, btl, dst in found}
    for src, dst, btl in pairs:
        assert btl in (("tcp",) if src != dst else ("vader", "self")), f"{src} -> {dst} over {btl}"
    return pairs


def _wait_progress(run_dir, out: str, rows: int, timeout: float = 240) -> None:
    progress = run_dir / "progress.csv"
    deadline = time.monotonic() + timeout
    while not (progress.exists() and len(progress.read_text().splitlines()) >= rows):
        assert time.monotonic() < deadline, read(out)[-3000:]
        time.sleep(0.5)


def _resumed_at(log: str) -> int:
    resumed = [ln for ln in log.splitlines() if ln.startswith("mpirl: resumed from")]
    assert len(resumed) == 1 and "exact resume" in resumed[0], log[-3000:]
    return int(resumed[0].split(" at ")[1].split(" env steps")[0].replace(",", ""))


def test_four_ranks_on_two_nodes_local_ranks_and_transports():
    """srun --mpi=pmix, 2 ranks per node: local ranks count per node, and Open MPI sends over
    TCP between the nodes and through shared memory (vader) within one."""
    cmd = ["srun", "--mpi=pmix", "-N", "2", "--ntasks-per-node", "2", "--kill-on-bad-exit=1",
           "--export=ALL,OMPI_MCA_btl_base_verbose=30,OMPI_MCA_btl_vader_single_copy_mechanism=none",
           PY, "-m", "mpi4py", "-m", "mpirl.train", "--dry-run", "--expect-world-size", "4"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    found = re.finditer(r"rank (\d+): host (\S+), local rank (\d+) of (\d+)", out)
    ranks = {int(m[1]): (m[2], int(m[3]), int(m[4])) for m in found}
    assert ranks == {0: (N1, 0, 2), 1: (N1, 1, 2), 2: (N2, 0, 2), 3: (N2, 1, 2)}, out[-3000:]
    assert "an allreduce of 1 per rank gave 4 (ok)" in out
    pairs = _transports(out)
    assert {(N1, N2, "tcp"), (N2, N1, "tcp")} <= pairs, out[-4000:]
    assert (N1, N1, "vader") in pairs or (N2, N2, "vader") in pairs, out[-4000:]


@pytest.mark.parametrize("backend", ["auto", "mpi"])
def test_two_node_job_checkpoints_on_rank0_with_identical_replicas(submit, tmp_path, backend):
    job, out = submit("train.sbatch", ["--total-env-steps", "2000", "--checkpoint-interval", "1000", *SHORT,
                                       "--backend", backend], *TWO_NODES)  # fmt: skip
    st = wait_job(job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    log = read(out)
    assert st["JobState"] == "COMPLETED", log[-3000:]
    assert st["NodeList"] == f"{N1[:-1]}[{N1[-1]}-{N2[-1]}]" and st["NumNodes"] == "2", st
    assert "2 task(s) on 2 node(s)" in log and "mpirl: done: CartPole-v1, 2 rank(s), 2,000 env steps" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas_identical"] is True and summary["global_env_steps"] == 2000
    ck = _inspect(tmp_path / "run")  # rank 0's file holds both ranks' replay shards, checksums verified
    assert ck["world_size"] == 2 and len(ck["shards"]) == 2 and all(s["transitions"] > 0 for s in ck["shards"]), ck


def test_preemption_across_nodes_requeues_and_resumes(submit, tmp_path):
    total = 12_000
    job, out = submit("train.sbatch", ["--total-env-steps", str(total), *SHORT], *TWO_NODES)
    _wait_progress(tmp_path / "run", out, rows=3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    wait_requeued_pending(job)
    st = wait_job(job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1", 300)
    log = read(out)
    assert "USR1 received" in log and "(restart 1)" in log, log[-3000:]
    assert 0 < _resumed_at(log) < total
    assert f"mpirl: done: CartPole-v1, 2 rank(s), {total:,} env steps" in log and st["ExitCode"] == "0:0"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["replicas_identical"] is True


def _run_until_checkpointed(submit, tmp_path, total: int, *extra: str) -> tuple[str, str]:
    job, out = submit("train.sbatch", ["--total-env-steps", str(total), "--checkpoint-interval", "2000", *SHORT,
                                       *extra], *TWO_NODES)  # fmt: skip
    run = tmp_path / "run"
    _wait_progress(run, out, rows=2)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline, read(out)[-3000:]
        time.sleep(0.5)
    return job, out


def _ends_within(job: str, t0: float, limit_s: float = 30, nodes: tuple[str, ...] = ()) -> float:
    """Seconds from t0 until the job no longer runs and nothing of it is left on ``nodes`` (both
    nodes by default; every process of a node but its slurmd counts); fails past ``limit_s``."""
    nodes = nodes or (N1, N2)
    left: dict[str, list[str]] = {}
    while time.monotonic() - t0 < limit_s:
        left = {n: _node_procs(n) for n in nodes}
        if job_state(job).get("JobState") != "RUNNING" and not any(left.values()):
            return time.monotonic() - t0
        time.sleep(0.5)
    pytest.fail(f"after {limit_s:.0f}s: job {job_state(job).get('JobState')}, still running: {left}")


def _resumes_and_completes(job: str, out: str, total: int) -> str:
    wait_requeued_pending(job)
    st = wait_job(job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED") and s.get("Restarts") == "1", 300)
    log = read(out)
    assert st["JobState"] == "COMPLETED" and "(restart 1)" in log, log[-3000:]
    assert 0 < _resumed_at(log) < total  # from the last checkpoint, its step counter continuing
    assert f"mpirl: done: CartPole-v1, 2 rank(s), {total:,} env steps" in log
    return log


def test_ranks_killed_on_one_node_end_the_job_then_it_resumes(submit, tmp_path):
    """kill -9 of the second node's rank (the OOM killer's way): the job ends within 30 s with
    nothing of it left on either node; it had checkpointed, so run-step.sh requeues it."""
    total = 12_000
    job, out = _run_until_checkpointed(submit, tmp_path, total)
    victims = [p for p in _node_procs(N2) if "mpirl.train" in p and str(tmp_path) in p]  # this job's rank
    assert victims, _node_procs(N2)
    t0 = time.monotonic()
    for p in victims:
        os.kill(int(p.split()[0]), signal.SIGKILL)
    ended_s = _ends_within(job, t0)
    log = _resumes_and_completes(job, out, total)
    assert "the step failed after checkpointing" in log, log[-3000:]
    print(f"job ended {ended_s:.1f}s after its rank on {N2} was killed")


def test_node_lost_ends_the_job_then_slurm_requeues_it(submit, tmp_path):
    """local-cluster.sh kill-node: every process of the second node dies (slurmd, slurmstepd,
    rank), as in a crash. SLURM marks the node down (two failing ping rounds of MessageTimeout
    + 1-3 s each after SlurmdTimeout: 12-20 s here), ends the job and requeues it; the surviving
    rank, which has waited in the allreduce since, ends at its watchdog's next check after SLURM's
    SIGTERM. So the job ends within 30 s (17 s measured; the limit leaves room for load) with
    nothing left on either node, and resumes once the node is back."""
    total = 12_000
    job, out = _run_until_checkpointed(submit, tmp_path, total)
    t0 = time.monotonic()
    subprocess.run(["bash", CLUSTER, "kill-node", N2], check=True, capture_output=True, timeout=60)
    ended_s = _ends_within(job, t0, limit_s=35)
    states = node_states()
    assert states.get(N2, "").startswith("down"), states
    subprocess.run(["bash", CLUSTER, "start", "--nodes", str(len(NODES))], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    _resumes_and_completes(job, out, total)
    print(f"job ended {ended_s:.1f}s after {N2} was lost")


def test_slurmd_lost_ends_the_job_then_it_resumes(submit, tmp_path):
    """Only the second node's slurmd dies (its ranks and slurmstepd run on): SLURM marks the node
    down as if it were lost and requeues the job. The ranks, told to stop, checkpoint and exit
    (23 s after the kill, measured); nothing of the job may be left on either node, and it resumes
    from that checkpoint once slurmd is back. The run is long enough to be training still when
    SLURM notices: 150k steps took about 50 s on the Intel machine but ended first on a faster
    one (the job done, its node left 'completing*'), so 400k (about 2 minutes there)."""
    total = 400_000
    job, out = _run_until_checkpointed(submit, tmp_path, total)
    t0 = time.monotonic()
    subprocess.run(["bash", CLUSTER, "kill-slurmd", N2], check=True, capture_output=True, timeout=30)
    ended_s = _ends_within(job, t0, limit_s=35)
    states = node_states()
    assert states.get(N2, "").startswith("down"), (states, read(out)[-3000:])
    subprocess.run(["bash", CLUSTER, "start", "--nodes", str(len(NODES))], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    log = _resumes_and_completes(job, out, total)
    assert "mpirl: stop signal received; checkpointing at" in log, log[-3000:]
    assert f"SLURM has requeued job {job} already" in log and "requeue failed" not in log, log[-3000:]
    print(f"job ended {ended_s:.1f}s after {N2}'s slurmd was killed")


def _gone_within(node: str, t0: float, limit_s: float, what: str = "") -> float:
    """Seconds from t0 until no process of ``node`` (but its slurmd) whose command line holds
    ``what`` is left; fails past ``limit_s``."""
    while time.monotonic() - t0 < limit_s:
        if not [p for p in _node_procs(node) if what in p]:
            return time.monotonic() - t0
        time.sleep(0.5)
    pytest.fail(f"after {limit_s:.0f}s still running on {node}: {_node_procs(node)}")


@pytest.mark.slow
def test_partitioned_node_ends_the_job_and_its_cut_off_rank_ends_itself(submit, tmp_path):
    """cut-link: the second node's link goes down (packets vanish, no reset) while its processes
    run on. SLURM marks the node down and requeues the job, and the first node's rank, which has
    waited in the allreduce since, ends at SLURM's SIGTERM. The cut-off rank is never signalled: its
    watchdog ends it at --stall-timeout + the grace (20 + 30 s here), before the link is mended.
    The step's slurmstepd, which could not report to SLURM meanwhile, ends once the link is back,
    and SLURM may drain the node ("Kill task failed": that step did not end at its signals within
    UnkillableStepTimeout), which an admin undoes with State=RESUME; then the job resumes.
    Slow (about 4 minutes), and the drain is SLURM's own timing: MPIRL_SLOW_TESTS=1 runs it."""
    total = 150_000
    job, out = _run_until_checkpointed(submit, tmp_path, total, "--stall-timeout", "20")
    t0 = time.monotonic()
    subprocess.run(["bash", CLUSTER, "cut-link", N2], check=True, capture_output=True, timeout=30)
    try:
        ended_s = _ends_within(job, t0, limit_s=35, nodes=(N1,))
        assert node_states().get(N2, "").startswith("down"), node_states()
        cut_off_s = _gone_within(N2, t0, limit_s=20 + 30 + 15, what="mpirl.train")
        stranded = {p.split()[0] for p in _node_procs(N2)}  # the old step's slurmstepd
    finally:
        subprocess.run(["bash", CLUSTER, "mend-link", N2], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 180  # the requeued job may start on the node meanwhile: old pids only
    while stranded & {p.split()[0] for p in _node_procs(N2)}:
        assert time.monotonic() < deadline, f"still on {N2} 3 minutes after the link came back: {_node_procs(N2)}"
        time.sleep(1)
    if "drain" in node_states().get(N2, ""):
        subprocess.run(["scontrol", "update", f"NodeName={N2}", "State=RESUME"], check=True, timeout=30)
    _resumes_and_completes(job, out, total)
    print(f"job ended on {N1} {ended_s:.1f}s after {N2}'s link was cut; its rank on {N2} {cut_off_s:.1f}s after")


def test_mpirun_across_nodes_without_ssh(tmp_path):
    """mpirun on the host (the login node) starts its daemons on the nodes through
    hpc/slurm/on-node.sh (Open MPI's rsh launcher with nsenter as the agent): no ssh daemon."""
    run = tmp_path / "run"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = ["mpirun", "--mca", "plm_rsh_agent", os.path.join(SLURM_DIR, "on-node.sh"), "--host", f"{N1},{N2}",
           "-np", "2", "--mca", "btl_base_verbose", "30", "-x", "OMPI_MCA_btl_vader_single_copy_mechanism=none",
           "-x", "OMPI_MCA_mpi_yield_when_idle=1", PY, "-m", "mpi4py", "-m", "mpirl.train",
           "--total-env-steps", "1000", "--run-dir", str(run), *SHORT]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert {(N1, N2, "tcp"), (N2, N1, "tcp")} <= _transports(out), out[-4000:]  # one rank on each node
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True, summary
