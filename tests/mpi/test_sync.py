"""Local SGD (--sync-every K > 1) under mpirun -np 2: replicas diverge between averaging points,
are identical right after each one (the mean of what the ranks held), agree on every counter,
end identical, resume exactly, and stop alike on non-finite gradients."""

import json
import os

import h5py
import numpy as np
import pytest
from mpi_launch import mpirun

pytestmark = pytest.mark.mpi
HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "workers", "sync_report.py")

BASE = dict(
    total_env_steps=1600,
    learning_starts_per_rank=200,
    batch_size_per_rank=32,
    hidden_sizes=[16, 16],
    eval_interval=0,
    final_eval_episodes=2,
    target_update_interval=20,
    num_envs_per_rank=4,  # 1600 env steps -> 150 updates at 2 ranks
    tau=1.0,  # hard copies at window crossings (the default is a soft update)
    log_interval=800,
    tensorboard=False,
    sync_every=4,
)


def _reports(tmp_path, overrides, np=2):
    out = tmp_path / f"out-np{np}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    cfg = {**BASE, **overrides, "run_dir": str(out / "run")}
    res = mpirun([WORKER, str(out), json.dumps(cfg)], np=np, timeout=240)
    assert res.returncode == 0, res.output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]


def test_replicas_diverge_between_and_are_the_mean_at_averaging_points(tmp_path):
    r0, r1 = _reports(tmp_path, {})
    assert r0["local_sgd"] and r1["local_sgd"]
    # 200 iterations of 2 ranks x 4 envs, updates due after iteration 50 on, each run with the next
    # env step (none after the last): 150 update() calls; averaging after every 4th, and the 2
    # left over before the final checkpoint.
    assert len(r0["updates"]) == len(r1["updates"]) == 150
    assert [s["window"] for s in r0["syncs"]] == [4] * 37 + [2]
    assert [s["window"] for s in r1["syncs"]] == [s["window"] for s in r0["syncs"]]
    for i, (u0, u1) in enumerate(zip(r0["updates"], r1["updates"])):
        assert u0["since_sync"] == u1["since_sync"] == (i + 1) % 4
        if u0["since_sync"] == 0:
            assert u0["params"] == u1["params"], f"update {i}: replicas differ right after averaging"
        else:
            # Different env shards -> different replay samples -> different local steps.
            assert u0["params"] != u1["params"], f"update {i}: replicas identical between averagings"
        assert u0["target"] == u1["target"], f"update {i}: target networks differ"
    for j, (s0, s1) in enumerate(zip(r0["syncs"], r1["syncs"])):
        assert s0["before"] != s1["before"]
        assert s0["after"] == s1["after"], f"averaging {j}: replicas differ afterwards"
        mean = (np.asarray(s0["before"], dtype=np.float32) + np.asarray(s1["before"], dtype=np.float32)) / 2
        np.testing.assert_allclose(np.asarray(s0["after"], dtype=np.float32), mean, rtol=1e-6, atol=1e-7)
    # The final state: networks and Adam state identical, counters agreed and complete.
    for key in ("online_sha256", "target_sha256", "adam_sha256"):
        assert r0[key] == r1[key], key
    assert r0["adam_steps"] == r1["adam_steps"] == [150.0] * len(r0["adam_steps"])
    assert r0["summary"] == r1["summary"]
    assert r0["summary"]["updates"] == 150 and r0["summary"]["skipped_updates"] == 0
    assert r0["summary"]["replicas_identical"] is True


def test_one_rank_sync_every_is_sync_every_1(tmp_path):
    """Nobody to average with: K > 1 on one rank is exactly K = 1 (and issues no collective)."""
    k4 = _reports(tmp_path, {"total_env_steps": 800, "final_eval_episodes": 0}, np=1)[0]
    k1 = _reports(tmp_path, {"total_env_steps": 800, "final_eval_episodes": 0, "sync_every": 1}, np=1)[0]
    assert not k4["local_sgd"] and not k4["syncs"]
    for key in ("online_sha256", "target_sha256", "adam_sha256"):
        assert k4[key] == k1[key], key


def _cli(run_dir, steps, *extra):
    args = ["-m", "mpirl.train", "--total-env-steps", str(steps), "--learning-starts-per-rank", "200",
            "--hidden-sizes", "16,16", "--log-interval", "800", "--no-tensorboard", "--target-update-interval", "20",
            "--tau", "1", "--num-envs-per-rank", "4",
            "--final-eval-episodes", "2", "--sync-every", "4", "--run-dir", str(run_dir), *extra]  # fmt: skip
    res = mpirun(args, timeout=240)
    assert res.returncode == 0, res.output[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_cli_run_ends_with_identical_replicas(tmp_path):
    # PER, soft target updates, 2 backward passes, evaluations and a mid-run checkpoint: every
    # path that averages (window end, evaluation, checkpoint, end of run) and K=4 with bpps=2.
    s = _cli(tmp_path / "run", 2000, "--prioritized", "--tau", "0.05", "--target-update-interval", "1",
             "--backward-passes-per-step", "2", "--eval-interval", "800", "--eval-episodes", "2",
             "--checkpoint-interval", "1000")  # fmt: skip
    assert s["replicas_identical"] is True and s["world_size"] == 2
    assert s["updates"] == 200 and s["skipped_updates"] == 0  # none after the last env step
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("backend", ["horovod", "mpi", "torch"])
def test_resume_continues_exactly(tmp_path, backend):
    """A checkpoint holds averaged weights and Adam state, and the averaging schedule restarts at
    each save, so a resumed run continues as the uninterrupted one did (CPU, same world size)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--checkpoint-interval", "800", "--final-eval-episodes", "0", "--backend", backend)
    a = _cli(straight, 1600, *common)
    _cli(split, 800, *common)
    b = _cli(split, 1600, *common, "--resume", "auto")
    assert a["param_checksum"] == b["param_checksum"] and a["updates"] == b["updates"] > 100
    assert _state(straight) == _state(split)


def _state(run_dir):
    """The latest checkpoint's networks and optimizer state, as bytes by dataset path."""
    folder = run_dir / "checkpoints"
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.startswith(("model/", "optimizer/")):
            out[name] = obj[()].tobytes()

    with h5py.File(folder / (folder / "latest").read_text().strip(), "r") as f:
        f.visititems(visit)
    assert any(k.startswith("optimizer/") for k in out)
    return out


def test_nonfinite_on_one_rank_stops_every_rank_alike(tmp_path):
    """NaN rewards on rank 1 only: its local gradients are non-finite, rank 0's are not; both
    count the same skipped updates (agreed at the averaging) and stop with exit 3 together."""
    env = {"MPIRL_TEST_FAULT": "nan", "MPIRL_TEST_FAULT_AFTER": "250", "MPIRL_TEST_FAULT_RANK": "1",
           "PYTHONPATH": os.path.join(HERE, "envs") + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    args = ["-m", "mpirl.train", "--env", "FaultyCartPole-v0", "--env-module", "faulty_envs",
            "--total-env-steps", "400000", "--learning-starts-per-rank", "200", "--buffer-size-per-rank", "400",
            "--hidden-sizes", "16,16", "--eval-interval", "0", "--final-eval-episodes", "0", "--no-tensorboard",
            "--checkpoint-interval", "0", "--max-nonfinite-updates", "6", "--sync-every", "4",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    res = mpirun(args, env=env, timeout=180)
    assert res.returncode == 3, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2, res.stderr[-3000:]
    assert lines[0] == lines[1] and "6 updates in a row had a non-finite gradient on some rank" in lines[0]
