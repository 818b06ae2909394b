"""Bad input under `mpirun -np 2`: one line `mpirl: error: ...` from every rank, exit code 2,
mpirun returns (no hang), and nothing is created for the rejected run."""

import os
import sys

import pytest
from mpi_launch import MPIRUN, mpirun, run

pytestmark = pytest.mark.mpi

CASES = [
    # environments
    (["--env", "NoSuchEnv-v0"], "unknown or unusable environment 'NoSuchEnv-v0'"),
    (["--env", "Pendulum-v1"], "DQN needs a Discrete action space"),
    (["--env", "Blackjack-v1"], "observation space must be a Box"),
    (["--env", "FrozenLake-v1"], "observation space must be a Box"),
    (["--env-module", "no_such_module_xyz"], "--env-module no_such_module_xyz: import failed"),
    # unknown options and types
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--seed", "abc"], "--seed must be an integer"),
    (["--total-env-steps", "1.5"], "--total-env-steps must be an integer"),
    (["--lr", "fast"], "--lr must be a number"),
    (["--dueling", "maybe"], "--dueling must be a boolean"),
    (["--hidden-sizes", "64,x"], "--hidden-sizes must be a list of integers"),
    (["--lr-scaling", "cubic"], "--lr-scaling must be one of none, linear, sqrt"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda"),
    # ranges
    (["--num-envs-per-rank", "0"], "--num-envs-per-rank must be positive"),
    (["--buffer-size-per-rank", "-5"], "--buffer-size-per-rank must be positive"),
    (["--batch-size-per-rank", "0"], "--batch-size-per-rank must be positive"),
    (["--n-step", "0"], "--n-step must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--per-alpha", "1.5"], "--per-alpha must be in [0, 1]"),
    (["--per-beta0", "-0.1"], "--per-beta0 must be in [0, 1]"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--eps-start", "2"], "--eps-start must be in [0, 1]"),
    (["--hidden-sizes", "64,0"], "--hidden-sizes must be positive widths"),
    (["--target-update-interval", "0"], "--target-update-interval must be positive"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval must be >= 0"),
    (["--sync-every", "0"], "--sync-every must be positive"),
    # combinations
    (["--buffer-size-per-rank", "32"], "--buffer-size-per-rank (32) is smaller than --batch-size-per-rank (128)"),
    (["--learning-starts-per-rank", "10"], "--learning-starts-per-rank (10) is below --batch-size-per-rank (128)"),
    (["--learning-starts-per-rank", "200000"], "exceeds --buffer-size-per-rank (100000)"),
    (["--expect-world-size", "3"], "this job has 2 rank(s), 3 expected"),
    (["--sync-every", "4", "--fp16-allreduce"], "--fp16-allreduce compresses gradients, which --sync-every > 1"),
    # Atari options
    (["--frame-stack", "0"], "--frame-stack must be positive, got 0"),
    (["--sticky-actions", "1.5"], "--sticky-actions must be in [0, 1], got 1.5"),
    (["--clip-rewards", "maybe"], "--clip-rewards must be one of auto, on, off"),
    # files
    (["--config", "/nonexistent/run.toml"], "config file not found: /nonexistent/run.toml"),
    (["--resume", "/nonexistent/ckpt.h5"], "checkpoint not found: /nonexistent/ckpt.h5"),
    # non-finite and out-of-range values
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2137483648], got -1"),
    (["--seed", str(2**70)], f"--seed must be in [0, 2137483648], got {2**70}"),
    (["--n-step", "300", "--learning-starts-per-rank", "4000"], "--n-step must be at most 255"),
    (["--n-step", "200"], "fewer steps than --n-step (200) before the first update"),
    (["--total-env-steps", "2000", "--learning-starts-per-rank", "1000"], "the run could never update"),
    (["--buffer-size-per-rank", "1000000000"], "--buffer-size-per-rank: the replay needs 43.77 GiB per rank x 2"),
    # backends and devices
    (["--backend", "mpich"], "--backend must be one of auto, horovod, mpi, torch, gloo, nccl"),
    (["--backend", "nccl", "--device", "cpu"], "--backend nccl needs CUDA tensors"),
    (["--device", "cuda"], "--device cuda asked for, but torch sees no CUDA device"),
    # the same checks on the torch backend, whose ranks agree through Gloo
    (["--backend", "torch", "--expect-world-size", "3"], "this job has 2 rank(s), 3 expected"),
    (["--backend", "torch", "--resume", "/nonexistent/ckpt.h5"], "checkpoint not found: /nonexistent/ckpt.h5"),
    (["--backend", "torch", "--env", "Pendulum-v1"], "DQN needs a Discrete action space"),
    # and on the MPI backend, whose ranks agree through MPI's own collectives
    (["--backend", "mpi", "--expect-world-size", "3"], "this job has 2 rank(s), 3 expected"),
]


@pytest.fixture
def bad_tomls(tmp_path):
    (tmp_path / "malformed.toml").write_text("seed = = 1\n")
    (tmp_path / "unknown.toml").write_text("sed = 1\n")
    (tmp_path / "wrongtype.toml").write_text('num_envs_per_rank = "four"\n')
    return tmp_path


def _check(tmp_path, args, message):
    run_dir = tmp_path / "r"
    res = mpirun(["-m", "mpirl.train", "--run-dir", str(run_dir), *args], timeout=90)
    assert res.returncode == 2, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2, res.stderr[-3000:]  # one line from each rank
    assert all(message in ln for ln in lines), lines
    assert not run_dir.exists()  # nothing was created for a rejected run


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_on_every_rank(tmp_path, args, message):
    _check(tmp_path, args, message)


@pytest.mark.parametrize(
    "name, message",
    [
        ("malformed.toml", "malformed TOML in"),
        ("unknown.toml", "unknown option 'sed' in"),
        ("wrongtype.toml", "--num-envs-per-rank must be an integer, got 'four'"),
    ],
)
def test_bad_toml_exits_2_on_every_rank(bad_tomls, name, message):
    _check(bad_tomls, ["--config", str(bad_tomls / name)], message)


FAKE_CUDA = os.path.join(os.path.dirname(__file__), "workers", "fake_cuda.py")


@pytest.mark.parametrize(
    "backend, message", [("horovod", "built without GPU operations"), ("mpi", "carries CPU tensors")]
)
def test_a_backend_that_cannot_carry_cuda_tensors_refuses_cuda_at_start(tmp_path, backend, message):
    """On a GPU host whose Horovod was built without NCCL (no nvcc), --backend horovod on CUDA
    stops at start on every rank, naming the fix; never Horovod's internal error at the first
    allreduce. The MPI backend (CPU tensors only) does the same. CUDA is faked (torch.cuda
    reports one device): the refusal comes before any GPU work."""
    run_dir = tmp_path / "r"
    res = mpirun([FAKE_CUDA, "--device", "cuda", "--backend", backend, "--run-dir", str(run_dir)], timeout=90)
    assert res.returncode == 2, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all(message in ln and "--backend torch" in ln for ln in lines)
    assert "ReadyEvent" not in res.output and not run_dir.exists()


@pytest.mark.parametrize("backend", ["horovod", "mpi", "torch"])
def test_ranks_started_with_different_options_stop_on_every_rank(tmp_path, backend):
    """An MPMD launch (or a rank given other flags) used to hang or crash in a Horovod shape
    error: the ranks now compare their options first and all stop, naming the ones that differ."""
    run_dir = tmp_path / "r"
    common = ["-m", "mpi4py", "-m", "mpirl.train", "--run-dir", str(run_dir), "--backend", backend]
    py = sys.executable
    cmd = [MPIRUN, "-np", "1", "--oversubscribe", py, *common, "--hidden-sizes", "32,32", ":",
           "-np", "1", "--oversubscribe", py, *common, "--hidden-sizes", "64", "--seed", "7"]  # fmt: skip
    res = run(cmd, timeout=90)
    assert res.returncode == 2, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all("different options (--hidden-sizes, --seed)" in ln for ln in lines), lines
    assert not run_dir.exists()
