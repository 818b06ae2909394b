"""One Stable-Baselines3 DQN run on CartPole-v1 with the rl-baselines3-zoo hyperparameters,
evaluated and stopped exactly like an mpirl run; the SB3 side of ``solve_cartpole.py``.

    .venv/bin/python benchmarks/sb3_cartpole.py --seed 1 --run-dir runs/sb3-s1 [--budget 200000]

Install SB3 (a benchmark-only dependency) without letting pip replace the venv's torch:

    .venv/bin/pip install stable-baselines3 "torch==$(.venv/bin/python -c 'import torch;print(torch.__version__)')"

(or ``MPIRL_EXTRAS=test,bench launch/install.sh``, which installs mpirl's ``bench`` extra).

Hyperparameters: rl-baselines3-zoo ``hyperparams/dqn.yml``, ``CartPole-v1`` (the zoo runs one
env): MlpPolicy with net_arch [256, 256], lr 2.3e-3, batch 64, buffer 100,000, learning_starts
1,000, gamma 0.99, target_update_interval 10 (env steps), train_freq 256, gradient_steps 128,
exploration_fraction 0.16, exploration_final_eps 0.04, n_timesteps 5e4. Two deliberate changes:
- the budget is ``--budget`` env steps (default 150,000), not 5e4: at 5e4 SB3 often ends
  unsolved, and the run stops early anyway once an evaluation reaches the target;
- exploration_fraction is rescaled to the budget so that epsilon still decays over the zoo's
  0.16 x 5e4 = 8,000 env steps (a fraction of a longer budget would explore 4x longer).

Evaluation and stop, the same as mpirl's (see mpirl/trainer.py): every ``--eval-interval`` env
steps (5,000) a greedy (deterministic) evaluation of 20 episodes on fresh envs seeded
``seed + 1,000,000 + round * 20 + i`` (mpirl's seeds), played by ``mpirl.envs.evaluate``; training
stops once its mean reaches 475 (CartPole-v1's reward_threshold); then 20 fresh greedy episodes
seeded ``seed + 2,000,000 + i`` decide "solved". The run directory gets ``metrics.jsonl`` (records
``train``, ``eval``, ``final`` as mpirl writes them, through ``mpirl.metrics.MetricsWriter``),
``config.json`` and ``summary.json`` (mpirl's summary fields that apply).

Torch threads: ``--torch-threads`` (default: all cores, i.e. cores / 1 process, which is also
what torch picks by itself for an SB3 user).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402

from mpirl import envs  # noqa: E402
from mpirl.metrics import MetricsWriter  # noqa: E402

ENV_ID = "CartPole-v1"
TARGET_RETURN = 475.0  # CartPole-v1's reward_threshold, mpirl's default target
ZOO_N_TIMESTEPS = 50_000
ZOO_EXPLORATION_FRACTION = 0.16
# rl-baselines3-zoo hyperparams/dqn.yml, CartPole-v1 (without n_timesteps and exploration_fraction,
# which depend on the budget; see the module docstring).
ZOO_HYPERPARAMS: dict[str, Any] = {
    "learning_rate": 2.3e-3,
    "batch_size": 64,
    "buffer_size": 100_000,
    "learning_starts": 1_000,
    "gamma": 0.99,
    "target_update_interval": 10,
    "train_freq": 256,
    "gradient_steps": 128,
    "exploration_final_eps": 0.04,
    "policy_kwargs": {"net_arch": [256, 256]},
}
# mpirl/trainer.py seeds its evaluation episodes this way; the same seeds make the criterion identical.
EVAL_SEED_OFFSET = 1_000_000
FINAL_EVAL_SEED_OFFSET = 2_000_000


def sb3_missing() -> str:
    """An install hint when stable-baselines3 cannot be imported, else ''."""
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return (
            "stable-baselines3 is not installed (a benchmark-only dependency): "
            ".venv/bin/pip install 'stable-baselines3>=2.3' "
            "\"torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')\""
        )
    return ""


def exploration_fraction(budget: int) -> float:
    """The fraction of ``budget`` env steps that keeps the zoo's epsilon decay length (8,000 steps)."""
    return min(1.0, ZOO_EXPLORATION_FRACTION * ZOO_N_TIMESTEPS / budget)


def greedy_eval(model: Any, seed_base: int, episodes: int) -> tuple[float, float, float]:
    """Mean, std and min return of ``episodes`` deterministic episodes seeded ``seed_base + i``."""
    seeds = range(seed_base, seed_base + episodes)
    rets = np.asarray(envs.evaluate(lambda obs: model.predict(obs, deterministic=True)[0], ENV_ID, seeds))
    return float(rets.mean()), float(rets.std()), float(rets.min())


def make_callback(writer: MetricsWriter, seed: int, eval_interval: int, eval_episodes: int, log_interval: int) -> Any:
    """An SB3 callback that evaluates every ``eval_interval`` env steps, logs like mpirl and
    stops training once an evaluation's mean reaches the target."""
    from stable_baselines3.common.callbacks import BaseCallback

    class EvalStop(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.eval_round = 0
            self.last_eval = float("nan")
            self.stopped_early = False
            self.t_start = 0.0
            self.t_last, self.steps_last, self.updates_last = 0.0, 0, 0

        def _on_training_start(self) -> None:
            # Like mpirl's wall_time_s: from the start of the training loop (set-up excluded).
            self.t_start = self.t_last = time.perf_counter()

        def _on_step(self) -> bool:
            steps = self.num_timesteps  # one env: one call per env step
            now = time.perf_counter()
            if log_interval > 0 and steps % log_interval == 0:
                ups = self.model._n_updates
                recent = [ep["r"] for ep in self.model.ep_info_buffer or []]
                writer.write("train", {
                    "global_env_steps": steps, "updates": ups, "episodes": self.model._episode_num,
                    "wall_time_s": now - self.t_start, "sps": (steps - self.steps_last) / max(now - self.t_last, 1e-9),
                    "updates_per_s": (ups - self.updates_last) / max(now - self.t_last, 1e-9),
                    "mean_return": float(np.mean(recent)) if recent else math.nan,
                    "epsilon": getattr(self.model, "exploration_rate", math.nan), "eval_mean_return": self.last_eval,
                })  # fmt: skip
                self.t_last, self.steps_last, self.updates_last = now, steps, ups
            if eval_interval > 0 and steps % eval_interval == 0:
                seed_base = seed + EVAL_SEED_OFFSET + self.eval_round * eval_episodes
                mean, std, lo = greedy_eval(self.model, seed_base, eval_episodes)
                self.eval_round += 1
                self.last_eval = mean
                writer.write("eval", {
                    "global_env_steps": steps, "updates": self.model._n_updates, "eval_mean_return": mean,
                    "eval_std_return": std, "eval_min_return": lo, "wall_time_s": time.perf_counter() - self.t_start,
                })  # fmt: skip
                if mean >= TARGET_RETURN:
                    self.stopped_early = True
                    return False  # SB3 ends learn() here
            return True

    return EvalStop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--run-dir", required=True, help="where metrics.jsonl, config.json, summary.json go")
    ap.add_argument("--budget", type=int, default=150_000, help="most env steps (training stops earlier when solved)")
    ap.add_argument("--eval-interval", type=int, default=5_000, help="env steps between greedy evaluations")
    ap.add_argument("--eval-episodes", type=int, default=20)
    ap.add_argument("--final-eval-episodes", type=int, default=20)
    ap.add_argument("--log-interval", type=int, default=10_000, help="env steps between 'train' records")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: all cores (cores / 1 process)")
    args = ap.parse_args()
    hint = sb3_missing()
    if hint:
        sys.exit(f"sb3_cartpole: {hint}")

    import gymnasium as gym
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN

    threads = args.torch_threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    os.makedirs(args.run_dir, exist_ok=True)
    hyper = {**ZOO_HYPERPARAMS, "exploration_fraction": exploration_fraction(args.budget)}
    write_json(os.path.join(args.run_dir, "config.json"), {
        "algo": "stable-baselines3 DQN", "env_id": ENV_ID, "seed": args.seed, "budget_env_steps": args.budget,
        "eval_interval": args.eval_interval, "eval_episodes": args.eval_episodes, "target_return": TARGET_RETURN,
        "torch_threads": threads, "hyperparams": hyper, "sb3_version": stable_baselines3.__version__,
        "torch_version": torch.__version__,
    })  # fmt: skip
    writer = MetricsWriter(args.run_dir, tensorboard=False)
    try:
        model = DQN("MlpPolicy", gym.make(ENV_ID), seed=args.seed, device="cpu", verbose=0, **hyper)
        cb = make_callback(writer, args.seed, args.eval_interval, args.eval_episodes, args.log_interval)
        t0 = time.perf_counter()
        model.learn(total_timesteps=args.budget, callback=cb)
        wall = time.perf_counter() - t0
        f_mean, f_std = math.nan, math.nan
        if args.final_eval_episodes > 0:
            f_mean, f_std, _ = greedy_eval(model, args.seed + FINAL_EVAL_SEED_OFFSET, args.final_eval_episodes)
        summary = {
            "env_id": ENV_ID, "run_dir": args.run_dir, "world_size": 1, "global_env_steps": int(model.num_timesteps),
            "updates": int(model._n_updates), "episodes": int(model._episode_num), "wall_time_s": wall,
            "final_eval_mean": f_mean, "final_eval_std": f_std, "final_eval_episodes": args.final_eval_episodes,
            "target_return": TARGET_RETURN, "solved": bool(f_mean >= TARGET_RETURN),
            "stopped_early": cb.stopped_early, "torch_threads": threads,
        }  # fmt: skip
        writer.write("final", summary)
    finally:
        writer.close()
    write_json(os.path.join(args.run_dir, "summary.json"), summary)
    print(
        f"sb3: done: {ENV_ID}, seed {args.seed}, {summary['global_env_steps']:,} env steps, {summary['updates']:,} "
        f"updates in {wall:.1f} s; greedy eval {f_mean:.1f} ± {f_std:.1f} (solved: {summary['solved']})"
    )


if __name__ == "__main__":
    main()
