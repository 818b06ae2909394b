"""Under mpirun -np 2: after K updates every rank holds bitwise-identical weights."""

import json
import os

import pytest
from mpi_launch import mpirun

WORKER = os.path.join(os.path.dirname(__file__), "workers", "train_and_report.py")
pytestmark = pytest.mark.mpi

BASE = dict(
    total_env_steps=1600,
    learning_starts_per_rank=200,
    batch_size_per_rank=32,
    hidden_sizes=[32, 32],
    eval_interval=0,
    final_eval_episodes=4,
    target_update_interval=20,
    num_envs_per_rank=4,  # 1600 env steps -> 150 updates at 2 ranks
    tau=1.0,  # hard copies here; the soft update (the default) has its own case below
    log_interval=800,
    tensorboard=False,
)


def _reports(tmp_path, overrides, np=2):
    cfg = {**BASE, **overrides, "run_dir": str(tmp_path / "run")}
    res = mpirun([WORKER, str(tmp_path), json.dumps(cfg)], np=np, timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(np)]
    return reports, res


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"prioritized": True, "dueling": True, "n_step": 1, "tau": 0.05, "target_update_interval": 1},
        {"fp16_allreduce": True, "backward_passes_per_step": 2, "double_dqn": False, "max_grad_norm": 0.5},
        {"backend": "torch"},
        {
            "backend": "torch",
            "prioritized": True,
            "dueling": True,
            "n_step": 1,
            "tau": 0.05,
            "target_update_interval": 1,
        },
        {
            "backend": "torch",
            "fp16_allreduce": True,
            "backward_passes_per_step": 2,
            "double_dqn": False,
            "max_grad_norm": 0.5,
        },
        {"backend": "mpi", "prioritized": True, "dueling": True, "n_step": 1, "tau": 0.05, "target_update_interval": 1},
        {"backend": "mpi", "fp16_allreduce": True, "backward_passes_per_step": 2, "double_dqn": False},
    ],
    ids=[
        "default",
        "per-dueling-soft",
        "fp16-bpps2",
        "torch-default",
        "torch-per-dueling-soft",
        "torch-fp16-bpps2",
        "mpi-per-dueling-soft",
        "mpi-fp16-bpps2",
    ],
)
def test_all_ranks_bitwise_identical_after_k_updates(tmp_path, overrides):
    reports, _ = _reports(tmp_path, overrides)
    s0 = reports[0]["summary"]
    # K updates: 200 iterations of 2 ranks x 4 envs; a training phase is due after iteration 50
    # (200 steps/rank) and each later one, and runs overlapped with the next env step, so the
    # one due after the last step does not run: 150
    assert s0["updates"] == 150
    assert {r["online_sha256"] for r in reports} == {reports[0]["online_sha256"]}
    assert {r["target_sha256"] for r in reports} == {reports[0]["target_sha256"]}
    assert reports[0]["checksum_min"] == reports[0]["checksum_max"]
    assert all(step == 150 for r in reports for step in r["optimizer_steps"])
    # Summaries are global figures, identical everywhere.
    assert reports[0]["summary"] == reports[1]["summary"]


def test_backends_train_bitwise_alike(tmp_path):
    """Horovod, plain MPI and torch (Gloo) average the same gradients to the same bits at two
    ranks (halving is exact, and a sum of two is the same in either order), so one seed gives one
    run whichever backend carries it: the backends differ in speed only."""
    runs = {}
    for b in ("horovod", "mpi", "torch"):
        (tmp_path / b).mkdir()
        runs[b] = _reports(tmp_path / b, {"backend": b})[0]
    for backend, reports in runs.items():
        assert len({r["online_sha256"] for r in reports}) == 1, backend
    assert len({reports[0]["online_sha256"] for reports in runs.values()}) == 1
    assert len({reports[0]["target_sha256"] for reports in runs.values()}) == 1


@pytest.mark.parametrize("backend", ["auto", "mpi"])
def test_world_of_three_oversubscribed(tmp_path, backend):
    # Three ranks: MPI's allreduce may pick another algorithm than at two; every rank must still
    # end with the same bits.
    reports, _ = _reports(tmp_path, {"total_env_steps": 1200, "backend": backend}, np=3)
    assert len({r["online_sha256"] for r in reports}) == 1
    assert reports[0]["summary"]["world_size"] == 3
