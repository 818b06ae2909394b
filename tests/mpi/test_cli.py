"""The CLI as a user runs it: single process, under mpirun, and bad input on every rank."""

import json
import os
import sys

import pytest
from mpi_launch import MPIRUN, mpi_env, mpirun, run

pytestmark = pytest.mark.mpi
SHORT = ["--total-env-steps", "2000", "--learning-starts-per-rank", "200", "--hidden-sizes", "32,32",
         "--eval-interval", "1000", "--eval-episodes", "4", "--final-eval-episodes", "4", "--log-interval", "1000",
         "--no-tensorboard"]  # fmt: skip


def test_single_process_without_launcher(tmp_path):
    res = run([sys.executable, "-m", "mpirl.train", *SHORT, "--run-dir", str(tmp_path / "r")], timeout=180)
    assert res.returncode == 0, res.output[-4000:]
    assert "on 1 rank(s)" in res.stdout and "mpirl: done:" in res.stdout


def test_mpirun_two_ranks_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    res = mpirun(["-m", "mpirl.train", *SHORT, "--run-dir", str(run_dir), "--seed", "5"], timeout=240)
    assert res.returncode == 0, res.output[-4000:]
    assert res.stdout.count("mpirl: done:") == 1  # rank 0 alone logs
    assert "greedy eval" in res.stdout and "2 rank(s)" in res.stdout
    for name in ("config.json", "metrics.jsonl", "progress.csv", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_env_steps"] == 2000
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and "eval" in kinds and kinds[-1] == "final"
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 5
    rows = (run_dir / "progress.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert int(last[header.index("episodes")]) == summary["episodes"] > 0
    episodes = (run_dir / "episodes.csv").read_text().splitlines()  # every episode, both ranks
    assert episodes[0] == "global_env_steps,rank,env,return,length" and len(episodes) - 1 == summary["episodes"]
    assert {line.split(",")[1] for line in episodes[1:]} == {"0", "1"}
    # A second run into the same directory is refused, on every rank.
    res = mpirun(["-m", "mpirl.train", *SHORT, "--run-dir", str(run_dir)], timeout=120)
    assert res.returncode == 2 and "already holds a run" in res.stderr


def test_help_lists_options():
    res = run([sys.executable, "-m", "mpirl.train", "--help"], timeout=60)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps lines
    assert "--num-envs-per-rank INT environments in each rank's vector env shard (default: 8)" in text


def test_env_module_registers_user_env(tmp_path):
    pkg = tmp_path / "myenvs.py"
    pkg.write_text(
        "import gymnasium as gym\n"
        "gym.register(id='MyCartPole-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv',"
        " max_episode_steps=50)\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = mpirun(["-m", "mpirl.train", *SHORT, "--env", "MyCartPole-v0", "--env-module", "myenvs",
                  "--run-dir", str(tmp_path / "r")], timeout=180, env=env)  # fmt: skip
    assert res.returncode == 0, res.output[-3000:]
    assert "MyCartPole-v0" in res.stdout


def test_auto_without_horovod_trains_on_mpi_and_says_so(tmp_path):
    """Where Horovod is not installed (hidden here by a package that fails to import), `auto`
    under mpirun takes the MPI backend, the fastest on CPU tensors after it, with a line saying
    why; the run trains and finishes."""
    shim = tmp_path / "nohorovod" / "horovod"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('Horovod hidden by the test')\n")
    env = {"PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = mpirun(["-m", "mpirl.train", *SHORT, "--run-dir", str(tmp_path / "r")], timeout=180, env=env)
    assert res.returncode == 0, res.output[-3000:]
    assert "backend auto: Horovod is not available, so collectives go through MPI (mpi4py)" in res.output
    assert "backend mpi (MPI (" in res.stdout
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["replicas_identical"]


@pytest.mark.parametrize(("backend", "expect"), [("auto", "backend horovod (Horovod"), ("horovod", "backend horovod"),
                                                 ("torch", "backend torch (torch.distributed gloo")])  # fmt: skip
def test_dry_run_prints_each_ranks_device_backend_and_wait_mode(backend, expect):
    """`--dry-run`: each rank's device, backend and collective library, one allreduce, no training.
    The plain mpirun line (no launcher flags, no OMPI_MCA_mpi_yield_when_idle set): mpirl itself
    makes MPI yield while it waits, since 2 ranks fill this machine's cores."""
    env = mpi_env()
    env.pop("OMPI_MCA_mpi_yield_when_idle", None)
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "mpirl.train", "--dry-run",
           "--backend", backend]  # fmt: skip
    res = run(cmd, timeout=90, env=env)
    assert res.returncode == 0, res.output[-3000:]
    for rank in (0, 1):
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"rank {rank}:"))
        assert expect in line and "device cpu" in line, line
        if (os.cpu_count() or 1) <= 2:
            assert "OMPI_MCA_mpi_yield_when_idle=1" in line, line
    assert "an allreduce of 1 per rank gave 2 (ok)" in res.stdout
    assert "step " not in res.stdout  # no training
