"""Worker (run on every rank): a user's script, which calls ``mpirl.fit`` with the torch backend
and then simply returns, leaving the teardown to the interpreter's exit.

Usage: python -m mpi4py fit_then_return.py RUN_DIR
"""

import sys

from mpirl import Config, fit

cfg = Config(env_id="CartPole-v1", backend="torch", total_env_steps=800, num_envs_per_rank=2,
             learning_starts_per_rank=128, eval_interval=0, final_eval_episodes=0, checkpoint_interval=0,
             log_interval=100_000, tensorboard=False, overwrite=True, run_dir=sys.argv[1])  # fmt: skip
print(f"fit returned after {fit(cfg).global_env_steps} env steps", flush=True)
