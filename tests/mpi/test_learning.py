"""DQN learns: 2 ranks improve CartPole far beyond random play (about 20) in a short run;
the full acceptance run (solve at 475) is marked slow."""

import json

import pytest
from mpi_launch import mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_learn_cartpole_quickly(tmp_path, backend):
    run_dir = tmp_path / "run"
    args = ["--seed", "1", "--total-env-steps", "30000", "--eval-interval", "0", "--final-eval-episodes", "10",
            "--backend", backend]  # fmt: skip
    res = mpirun(["-m", "mpirl.train", *args, "--no-tensorboard", "--run-dir", str(run_dir)], timeout=400)
    assert res.returncode == 0, res.output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_mean"] > 100.0, summary


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "torch"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_defaults_solve_cartpole_two_ranks(tmp_path, seed, backend):
    run_dir = tmp_path / "run"
    res = mpirun(["-m", "mpirl.train", "--seed", str(seed), "--no-tensorboard", "--run-dir", str(run_dir),
                  "--backend", backend], timeout=400)  # fmt: skip
    assert res.returncode == 0, res.output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_mean"] >= 475.0 and summary["solved"], summary
