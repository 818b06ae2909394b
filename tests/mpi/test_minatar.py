"""MinAtar end to end under mpirun (issue 15): 2 ranks train the MinAtar network on uint8 planes,
checkpoint, resume bitwise exactly (the games' state saved as data, sticky actions on), and
``mpirl.evaluate`` plays the checkpoint (``--video`` too where moviepy is installed); in float32
and in bf16 autocast (``--precision bf16``) alike."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi_launch import checkpoint_datasets as _datasets
from mpi_launch import latest_checkpoint as _latest
from mpi_launch import mpirun

from mpirl import evaluate

pytestmark = pytest.mark.mpi
pytest.importorskip("minatar", reason="the minatar extra is not installed")

# A few thousand steps of Breakout at the recipe's shape (4 envs/rank, hard target copies),
# with a small replay and batch so that it runs in seconds on 2 cores.
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "minatar-dqn.toml"
ARGS = ["--config", str(RECIPE), "--env", "MinAtar/Breakout-v1", "--buffer-size-per-rank", "3000",
        "--learning-starts-per-rank", "300", "--batch-size-per-rank", "32", "--target-update-interval", "50",
        "--eps-decay-steps", "2000", "--eval-interval", "0", "--final-eval-episodes", "0", "--log-interval", "2000",
        "--checkpoint-interval", "0", "--no-tensorboard"]  # fmt: skip


def _counters(path):
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["counters"])


def _train(run_dir, steps, *extra):
    res = mpirun(["-m", "mpirl.train", *ARGS, "--total-env-steps", str(steps), "--run-dir", str(run_dir), *extra],
                 np=2, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.output[-4000:]
    return res


# bf16 with one-step targets is the recipe as it stands; float32 with 3-step returns keeps the
# resume of the n-step queues (pending steps of (4, 10, 10) planes, saved as data) under test
@pytest.mark.parametrize("precision, n_step", [("bf16", 1), ("fp32", 3)])
def test_breakout_trains_checkpoints_resumes_exactly_and_plays(tmp_path, capsys, precision, n_step):
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ("--precision", precision, "--n-step", str(n_step))
    res = _train(straight, 3000, *flags)
    assert "4 gymnasium envs/rank" in res.stdout, res.stdout[:2000]  # auto: no EnvPool for MinAtar
    assert f", {precision}, torch threads" in res.stdout, res.stdout[:2000]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["replicas_identical"] and summary["updates"] > 0 and summary["global_env_steps"] == 3000
    with h5py.File(_latest(straight), "r") as f:
        assert list(f.attrs["obs_shape"]) == [4, 10, 10]
        assert f["model/online/body.0.weight"].shape == (16, 4, 3, 3)  # the MinAtar network
        assert f["model/online/fc.0.weight"].shape == (128, 1024)
        for r in ("0", "1"):
            obs = f["ranks"][r]["replay"]["obs"]
            assert obs.dtype == np.uint8 and obs.shape[1:] == (4, 10, 10)  # planes, no frame references
            assert f["ranks"][r]["env_state"].size > 0  # the games' state, as data

    _train(split, 1500, *flags)
    res = _train(split, 3000, "--resume", "auto", *flags)
    assert "exact resume" in res.stdout, res.stdout[-2000:]
    a, b = _datasets(_latest(straight)), _datasets(_latest(split))
    ca, cb = (_counters(_latest(r)) for r in (straight, split))
    assert ca == cb and ca["global_env_steps"] == 3000
    assert sorted(a) == sorted(b)
    for key in a:  # weights, optimizer, replay, the games with their RNGs and last actions
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs after resume")

    # mpirl.evaluate in this process: what a user's `python -m mpirl.evaluate` runs, without a
    # second interpreter's start-up (torch, minatar) on the test's clock
    assert evaluate.main([str(straight), "--episodes", "3", "--json"]) == 0
    played = json.loads(capsys.readouterr().out)
    assert played["env_id"] == "MinAtar/Breakout-v1" and played["episodes"] == 3 and played["mean"] >= 0

    videos = tmp_path / "videos"
    video_args = [str(straight), "--episodes", "1", "--video", str(videos)]
    try:
        import moviepy  # noqa: F401
    except ImportError:  # the package is optional: a one-line error naming it
        with pytest.raises(SystemExit, match=r"^mpirl.evaluate: error: --video needs moviepy \(pip install moviepy\)$"):
            evaluate.main(video_args)
    else:
        assert evaluate.main(video_args) == 0
        assert list(videos.glob("*.mp4"))
