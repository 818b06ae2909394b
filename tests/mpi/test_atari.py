"""Atari end to end under mpirun: ALE preprocessing, frame-stack replay, checkpoint and resume."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpi_launch import checkpoint_datasets as _datasets
from mpi_launch import latest_checkpoint as _latest
from mpi_launch import mpirun

pytestmark = pytest.mark.mpi
pytest.importorskip("ale_py", reason="the atari extra (ale-py) is not installed")

# A few hundred steps of Pong with the Nature CNN; tiny budgets so it runs in CI on 2 cores.
ARGS = ["--env", "ALE/Pong-v5", "--num-envs-per-rank", "2", "--buffer-size-per-rank", "600",
        "--learning-starts-per-rank", "100", "--batch-size-per-rank", "16", "--train-every", "2",
        "--target-update-interval", "10", "--eval-interval", "0", "--final-eval-episodes", "0",
        "--log-interval", "400", "--checkpoint-interval", "0", "--no-tensorboard", "--dueling",
        # ALE's saved state lacks the last emulator action that a sticky action repeats: a
        # bitwise comparison with an uninterrupted run needs them off (see envs.vector_state).
        "--sticky-actions", "0"]  # fmt: skip
GYM = ["--env-backend", "gymnasium"]  # the exact-resume path (auto picks EnvPool for ALE games where installed)


def _train(run_dir, steps, *extra, np=2):
    res = mpirun(["-m", "mpirl.train", *ARGS, "--total-env-steps", str(steps), "--run-dir", str(run_dir), *extra],
                 np=np, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.output[-4000:]
    return res


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_pong_trains_checkpoints_and_resumes_exactly(tmp_path, backend):
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = _train(straight, 1200, "--backend", backend, *GYM)
    assert "device cpu" in res.stdout and "replicas" not in res.stderr
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["replicas_identical"] and summary["updates"] > 0 and summary["global_env_steps"] == 1200

    with h5py.File(_latest(straight), "r") as f:
        assert list(f.attrs["obs_shape"]) == [4, 84, 84]
        assert "model/online/body.0.weight" in f  # the Nature CNN
        for r in ("0", "1"):
            rep = f["ranks"][r]["replay"]
            meta = json.loads(f["ranks"][r].attrs["meta"])["replay"]
            # Transitions hold 4 frame references each; every frame is stored once, uint8, compressed.
            assert rep["obs"].dtype == np.int64 and rep["obs"].shape[1:] == (4,)
            assert rep["frames"].dtype == np.uint8 and rep["frames"].shape[1:] == (84, 84)
            assert rep["frames"].compression == "lzf"
            assert rep["frames"].shape[0] == min(meta["frames_total"], meta["frame_capacity"])
            assert rep["frames"].shape[0] < 1.2 * rep["actions"].shape[0] + 40

    _train(split, 600, "--backend", backend, *GYM)
    res = _train(split, 1200, "--resume", "auto", "--backend", backend, *GYM)
    assert "exact resume" in res.stdout, res.stdout[-2000:]
    a, b = _datasets(_latest(straight)), _datasets(_latest(split))
    assert sorted(a) == sorted(b)
    for key in a:  # the env states too: emulators, wrappers' frames, RNGs, byte for byte
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs after resume")

    out = subprocess.run([sys.executable, "-m", "mpirl.evaluate", str(straight), "--episodes", "1", "--json"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr
    played = json.loads(out.stdout)
    assert played["episodes"] == 1 and -21 <= played["mean"] <= 21  # Pong scores, not clipped sums


def test_resume_at_another_world_size_keeps_the_weights(tmp_path):
    run = tmp_path / "run"
    _train(run, 600, *GYM)
    res = _train(run, 900, "--resume", "auto", *GYM, np=1)
    assert "world size changed 2 -> 1: frame-stack replay starts empty" in res.stdout
    with h5py.File(_latest(run), "r") as f:
        assert f.attrs["world_size"] == 1 and f.attrs["global_env_steps"] == 900


def test_envpool_pong_trains_checkpoints_and_resumes(tmp_path):
    """EnvPool env shards at 2 ranks: training, the frame-stack replay, a checkpoint without env
    state, and a resume that restarts the episodes (said in the log) while the weights, the
    optimizer, the replay and the counters continue exactly."""
    pytest.importorskip("envpool", reason="EnvPool is not installed (Python >= 3.11 and the test extra)")
    run = tmp_path / "run"
    res = _train(run, 600, "--env-backend", "auto")
    assert "2 envpool envs/rank" in res.stdout, res.stdout[:2000]
    before = _datasets(_latest(run))
    assert all(before[f"ranks/{r}/env_state"].size == 0 for r in ("0", "1"))  # nothing to snapshot
    assert before["ranks/0/replay/frames"].shape[0] > 0
    res = _train(run, 900, "--resume", "auto", "--checkpoint-interval", "0")
    assert "EnvPool envs cannot be snapshotted: env shards restart" in res.stdout, res.stdout[-2000:]
    assert "resumed from" in res.stdout and "at 600 env steps" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_env_steps"] == 900 and summary["replicas_identical"]
