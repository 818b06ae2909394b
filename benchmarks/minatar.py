"""MinAtar side by side (issue 15): mpirl at 1 and 2 ranks and Stable-Baselines3 DQN, the same
network, env-step budget, seeds and hyperparameters, on Breakout and SpaceInvaders.

    .venv/bin/python benchmarks/minatar.py                  # the comparison: 2 games x 3 seeds x 3 variants
    .venv/bin/python benchmarks/minatar.py --merge A/minatar.json B/minatar.json   # pool seed sets, table + p
    .venv/bin/python benchmarks/minatar.py --quick          # smoke run: 1 seed, 3k steps, 10 final episodes (~2.5 min)
    .venv/bin/python benchmarks/minatar.py --games MinAtar/Breakout-v1 --seeds 1 2 3 4 5 --budget 300000

Every run trains ``--budget`` global env steps (default 100,000, a tenth of the recipe's 1M: the
whole comparison in under an hour on 2 cores) with the recipe
``configs/minatar-dqn.toml``: mpirl through ``launch/mpirun.sh`` at 1 and 2 ranks (weak scaling:
2 ranks step 2 x 4 envs and average 2 x 128 samples per update), SB3 in its own process with the
recipe's values at one rank's scale: one env, an update of 128 samples every 4 env steps
(``train_freq`` 4), the same network (``MinAtarFeatures`` below + a linear Q head =
``mpirl.model.MinAtarQNetwork``), Adam lr 5e-4 / eps 3.125e-4, the recipe's n-step returns
(one-step targets), a hard target copy every 1,000 env steps, replay 100k from 5,000 steps, eps
1 -> 0.1 over 50k steps, gradient clip 10, Huber loss. What SB3 lacks: double DQN and bf16
autocast (mpirl's recipe uses both; ``mpirl-2+precision=fp32`` runs mpirl in float32). Both play
the same env (``mpirl.envs.make_env``: (C, 10, 10) uint8 planes, sticky actions p = 0.1).

Evaluation, alike for all: greedy episodes every 25,000 env steps (20, seeded as mpirl's trainer
seeds them), then 30 fresh greedy episodes seeded ``seed + 2,000,000 + i`` give the final return.
Per variant and game: the final return's mean ± std over seeds, the exact two-sided rank-sum
(Mann-Whitney U) p-value of its returns against SB3's (is a gap more than seed noise?), the wall
time (process start to exit, measured from outside: interpreter and MPI start-up, evaluations and
mpirl's checkpoints included) and its ratio to SB3's. Variants run interleaved (for each game and seed: sb3, mpirl-1,
mpirl-2) so that the machine's noise hits all alike. Learning curves: one PNG per game
(``mpirl.plot``: median and min-max band over seeds per variant) from the run directories kept
under ``<results>/minatar-curves/<game>/<variant>/s<seed>``; figures in ``<results>/minatar.json``.

Torch threads: 1 per process (SB3 too, ``--sb3-threads``): mpirl's launcher binds a rank to a core,
and on this 2-core machine a second intra-op thread for a network this small cost more than it
gave (an update of 128 samples took 6 ms on 1 thread and 23 ms on 2 with the machine busy).

Wall time of the default comparison on this project's 2-core machine: 51.6 minutes for 2 games x
3 seeds (2026-11-29, run at ``nice -15`` while other jobs kept the load at 2-5; BENCHMARKS.md).
Per game and seed about 190-240 s (SB3) + 175-200 s (mpirl-1) + 95-140 s (mpirl-2).
(Start-up, evaluation and checkpoint add 15-25 s per run.) Needs stable-baselines3 (the
``bench`` extra) and minatar (the ``minatar`` extra), and matplotlib for the PNGs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# This file shares its name with the minatar package: with its folder first on sys.path (as Python
# puts a script's), `import minatar` would import this file. The folder goes last: common.py is found,
# the package wins.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE] + [HERE]
from common import QUICK_RESULTS, REPO, RESULTS, fresh_dir, machine, read_json, run_mpirl, run_timed, write_json  # noqa: E402

from mpirl import config, envs  # noqa: E402
from mpirl.metrics import MetricsWriter  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "minatar-dqn.toml")
GAMES = ["MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1"]
# uniform random play, sticky actions 0.1, 300 episodes each (measured 2026-11-29; BENCHMARKS.md)
RANDOM_RETURN = {"MinAtar/Breakout-v1": 0.50, "MinAtar/SpaceInvaders-v1": 2.91}
VARIANTS = ["sb3", "mpirl-1", "mpirl-2"]
QUICK_BUDGET = 3_000
# global env steps per run: SB3 and mpirl at 1 and 2 ranks, both games, 3 seeds in ~21 min here
COMPARE_BUDGET = 100_000
GOAL_RATIO = 0.5  # issue 15: mpirl at 2 ranks in at most half of SB3's wall time
EVAL_SEED_OFFSET, FINAL_EVAL_SEED_OFFSET = 1_000_000, 2_000_000  # mpirl/trainer.py's evaluation seeds


def recipe(budget: int, quick: bool) -> config.Config:
    """The recipe's options for a budget; --quick shortens the warm-up and evaluates sooner."""
    values = config.load_toml(RECIPE)
    values["total_env_steps"] = budget
    if quick:
        values.update(learning_starts_per_rank=500, eps_decay_steps=budget // 2, eval_interval=budget // 2,
                      log_interval=budget // 4, final_eval_episodes=10)  # fmt: skip
    return config.Config(**values).validate()


def mpirl_args(cfg: config.Config) -> list[str]:
    """The CLI of an mpirl run with ``cfg``'s run length and evaluation (the rest is the recipe)."""
    return ["--config", RECIPE, "--total-env-steps", str(cfg.total_env_steps), "--learning-starts-per-rank",
            str(cfg.learning_starts_per_rank), "--eps-decay-steps", str(cfg.eps_decay_steps), "--eval-interval",
            str(cfg.eval_interval), "--log-interval", str(cfg.log_interval), "--torch-threads", "1",
            "--checkpoint-interval", "0"]  # fmt: skip


def sb3_hyperparams(cfg: config.Config) -> dict[str, Any]:
    """SB3 DQN's arguments for the recipe at one rank's scale (one env stands for the rank's envs:
    an update every ``num_envs_per_rank`` env steps, target copies counted in env steps)."""
    steps_per_update = cfg.num_envs_per_rank * cfg.train_every
    return {
        "learning_rate": cfg.lr, "buffer_size": cfg.buffer_size_per_rank,
        "learning_starts": cfg.learning_starts_per_rank, "batch_size": cfg.batch_size_per_rank,
        "gamma": cfg.gamma, "train_freq": steps_per_update,
        "gradient_steps": cfg.gradient_steps, "n_steps": cfg.n_step, "tau": cfg.tau,
        "target_update_interval": cfg.target_update_interval * steps_per_update,
        "exploration_initial_eps": cfg.eps_start, "exploration_final_eps": cfg.eps_end,
        "exploration_fraction": min(1.0, cfg.eps_decay_steps / cfg.total_env_steps),
        "max_grad_norm": cfg.max_grad_norm,
    }  # fmt: skip


def make_features_extractor() -> Any:
    """SB3 features extractor = mpirl's MinAtarQNetwork without its head (conv 3x3x16, 128 units)."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from torch import nn

    class MinAtarFeatures(BaseFeaturesExtractor):
        def __init__(self, observation_space: Any) -> None:
            super().__init__(observation_space, features_dim=128)
            c, h, w = observation_space.shape
            self.net = nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(16 * (h - 2) * (w - 2), 128), nn.ReLU())  # fmt: skip

        def forward(self, obs: Any) -> Any:
            return self.net(obs.float())  # 0/1 planes, unscaled as in mpirl

    return MinAtarFeatures


def sb3_run(env_id: str, seed: int, run_dir: str, budget: int, quick: bool, threads: int) -> None:
    """One SB3 run in this process: trains, evaluates like mpirl, writes mpirl's run-dir files."""
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(threads)
    cfg = recipe(budget, quick)
    hyper = sb3_hyperparams(cfg)
    write_json(os.path.join(run_dir, "config.json"), {"algo": "stable-baselines3 DQN", "env_id": env_id, "seed": seed,
               "budget_env_steps": budget, "hyperparams": hyper, "sb3_version": stable_baselines3.__version__,
               "torch_threads": threads})  # fmt: skip
    writer = MetricsWriter(run_dir, tensorboard=False)

    def greedy_eval(model: Any, seed_base: int, episodes: int) -> tuple[float, float, float]:
        rets = np.asarray(envs.evaluate(lambda obs: model.predict(obs, deterministic=True)[0], env_id,
                                        range(seed_base, seed_base + episodes)))  # fmt: skip
        return float(rets.mean()), float(rets.std()), float(rets.min())

    class Evaluate(BaseCallback):
        """mpirl's records: 'train' every log_interval env steps, 'eval' every eval_interval."""

        def _on_training_start(self) -> None:
            self.t0, self.round, self.last = time.perf_counter(), 0, math.nan

        def _on_step(self) -> bool:
            steps, wall = self.num_timesteps, time.perf_counter() - self.t0
            if steps % cfg.log_interval == 0:
                recent = [ep["r"] for ep in self.model.ep_info_buffer or []]
                writer.write("train", {"global_env_steps": steps, "updates": self.model._n_updates, "wall_time_s": wall,
                                       "mean_return": float(np.mean(recent)) if recent else math.nan,
                                       "eval_mean_return": self.last})  # fmt: skip
            if cfg.eval_interval and steps % cfg.eval_interval == 0:
                base = seed + EVAL_SEED_OFFSET + self.round * cfg.eval_episodes
                mean, std, lo = greedy_eval(self.model, base, cfg.eval_episodes)
                self.round, self.last = self.round + 1, mean
                writer.write("eval", {"global_env_steps": steps, "updates": self.model._n_updates,
                                      "eval_mean_return": mean, "eval_std_return": std, "eval_min_return": lo,
                                      "wall_time_s": wall})  # fmt: skip
            return True

    try:
        model = DQN("CnnPolicy", envs.make_env(env_id), seed=seed, device="cpu", verbose=0, **hyper,
                    policy_kwargs={"features_extractor_class": make_features_extractor(), "net_arch": [],
                                   "normalize_images": False, "optimizer_kwargs": {"eps": cfg.adam_eps}})  # fmt: skip
        t0 = time.perf_counter()
        model.learn(total_timesteps=budget, callback=Evaluate())
        wall = time.perf_counter() - t0
        f_mean, f_std, _ = greedy_eval(model, seed + FINAL_EVAL_SEED_OFFSET, cfg.final_eval_episodes)
        summary = {"env_id": env_id, "run_dir": run_dir, "world_size": 1, "global_env_steps": int(model.num_timesteps),
                   "updates": int(model._n_updates), "episodes": int(model._episode_num), "wall_time_s": wall,
                   "final_eval_mean": f_mean, "final_eval_std": f_std, "final_eval_episodes": cfg.final_eval_episodes,
                   "target_return": None}  # fmt: skip
        writer.write("final", summary)
    finally:
        writer.close()
    write_json(os.path.join(run_dir, "summary.json"), summary)


def run_variant(variant: str, env_id: str, seed: int, run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``variant``; its summary.json plus the outside wall time (``total_wall_s``)."""
    cfg = recipe(args.budget, args.quick)
    if variant == "sb3":
        run_dir = fresh_dir(run_dir)
        cmd = [sys.executable, os.path.abspath(__file__), "--sb3-run", env_id, str(seed), run_dir,
               "--budget", str(args.budget), "--sb3-threads", str(args.sb3_threads),
               *(["--quick"] if args.quick else [])]  # fmt: skip
        _, wall = run_timed(cmd, timeout=args.timeout)
        return {**read_json(os.path.join(run_dir, "summary.json")), "total_wall_s": wall}
    name, *flags = variant.split("+")  # mpirl-2+no-double-dqn+train-every=2: the recipe with those options
    ranks = int(name.split("-")[1])
    extra = [part for flag in flags for part in ("--" + flag).split("=", 1)]
    opts = [*mpirl_args(cfg), "--env", env_id, "--seed", str(seed), *extra]
    return run_mpirl(ranks, opts, timeout=args.timeout, run_dir=run_dir)


def rank_sum_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``a`` and ``b`` (final returns over seeds)
    come from one distribution: exact, by enumerating every split of the pooled midranks (ties
    kept), so it holds for the few seeds a benchmark affords. Seeds do not pair across libraries
    (each draws its own random streams), which is why this compares the two sets, not seed by seed."""
    pooled = sorted(a + b)
    rank = {v: (pooled.index(v) + 1 + len(pooled) - pooled[::-1].index(v)) / 2 for v in pooled}  # midranks
    ranks = [rank[v] for v in a + b]
    expected = len(a) * (len(pooled) + 1) / 2
    observed = abs(sum(ranks[: len(a)]) - expected)
    splits = [abs(sum(c) - expected) for c in itertools.combinations(ranks, len(a))]
    return sum(d >= observed - 1e-9 for d in splits) / len(splits)


def summarise(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per game and variant: final return mean ± std over seeds, median wall time, ratio to SB3,
    and the rank-sum test's p-value against SB3's returns."""
    out = []
    for env_id, by_variant in rows.items():
        sb3 = by_variant.get("sb3") or []
        sb3_wall = statistics.median(r["total_wall_s"] for r in sb3) if sb3 else None
        for variant, rs in by_variant.items():
            if not rs:
                continue
            finals = [r["final_eval_mean"] for r in rs]
            wall = statistics.median(r["total_wall_s"] for r in rs)
            p = rank_sum_p(finals, [r["final_eval_mean"] for r in sb3]) if sb3 and variant != "sb3" else None
            out.append({"env_id": env_id, "variant": variant, "seeds": [r["seed"] for r in rs],
                        "final_return_mean": float(np.mean(finals)), "final_return_std": float(np.std(finals)),
                        "p_vs_sb3": p, "median_wall_s": wall, "wall_vs_sb3": wall / sb3_wall if sb3_wall else None,
                        "random_return": RANDOM_RETURN.get(env_id), "rows": rs})  # fmt: skip
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    """The Markdown table of ``summarise``'s results."""
    print("| game | variant | final greedy return (mean ± std over seeds) | rank-sum p vs SB3 | median wall s "
          "| wall vs SB3 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = "-" if r["wall_vs_sb3"] is None else f"{r['wall_vs_sb3']:.2f}x"
        p = "-" if r.get("p_vs_sb3") is None else f"{r['p_vs_sb3']:.2f}"
        print(f"| {r['env_id']} | {r['variant']} | {r['final_return_mean']:.2f} ± {r['final_return_std']:.2f} "
              f"({len(r['seeds'])} seeds) | {p} | {r['median_wall_s']:.1f} | {ratio} |")  # fmt: skip


def merge(paths: list[str]) -> None:
    """Pool the per-seed rows of several earlier results files (one seed set each, say) and
    print the table over all of them, p-values included."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in paths:
        for r in read_json(path)["results"]:
            rows.setdefault(r["env_id"], {}).setdefault(r["variant"], []).extend(r["rows"])
    sb3_first = {g: dict(sorted(v.items(), key=lambda kv: kv[0] != "sb3")) for g, v in rows.items()}  # as runs order
    print_table(summarise(sb3_first))


def plot(curves: str, env_id: str, variants: list[str], results_dir: str) -> Optional[str]:
    """One PNG of ``env_id``'s learning curves (a label per variant); its path, or None."""
    game = env_id.split("/")[-1]
    dirs = [os.path.join(curves, game, v) for v in variants if os.path.isdir(os.path.join(curves, game, v))]
    if not dirs:
        return None
    out = os.path.join(results_dir, f"minatar_{game.split('-')[0].lower()}.png")
    labels = [os.path.basename(d) for d in dirs]
    cmd = [sys.executable, "-m", "mpirl.plot", *dirs, "--label", *labels, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(proc.stdout.strip() or proc.stderr.strip(), flush=True)
    return out if proc.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--games", nargs="+", default=GAMES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help="sb3, mpirl-<ranks>[+option[=value]...]")
    ap.add_argument(
        "--budget", type=int, default=COMPARE_BUDGET, help="global env steps per run (default 100,000); 0: the recipe's"
    )
    ap.add_argument("--sb3-threads", type=int, default=1, help="torch threads of SB3 (mpirl: 1 per rank)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: seed 1, {QUICK_BUDGET:,} steps, results in runs/")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--out", default=None, help="results folder; default: benchmarks/results (--quick: runs/...)")
    ap.add_argument("--json", default=None, help="default: <out>/minatar.json; '' to skip")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the table over these results files' seeds")
    ap.add_argument("--sb3-run", nargs=3, metavar=("ENV", "SEED", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budget = args.seeds[:1], QUICK_BUDGET if args.budget == COMPARE_BUDGET else args.budget
    if not args.budget:
        args.budget = int(config.load_toml(RECIPE)["total_env_steps"])
    if args.merge:
        merge(args.merge)
        return
    if args.sb3_run:
        env_id, seed, run_dir = args.sb3_run
        sb3_run(env_id, int(seed), run_dir, args.budget, args.quick, args.sb3_threads)
        return
    hint = _missing("sb3" in args.variants)
    if hint:
        sys.exit(f"minatar: {hint}")
    results_dir = args.out or (QUICK_RESULTS if args.quick else RESULTS)  # smoke figures never land in results/
    curves = os.path.join(results_dir, "minatar-curves")
    print(f"machine: {machine()}\nbudget: {args.budget:,} global env steps per run, seeds {args.seeds}", flush=True)
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {g: {v: [] for v in args.variants} for g in args.games}
    failures: list[str] = []
    t_start = time.perf_counter()
    for env_id in args.games:
        for seed in args.seeds:
            for variant in args.variants:  # interleaved: noise hits every variant alike
                run_dir = os.path.join(curves, env_id.split("/")[-1], variant, f"s{seed}")
                try:
                    s = run_variant(variant, env_id, seed, run_dir, args)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # report it, go on with the others
                    failures.append(f"{env_id} {variant} seed {seed}: {exc}")
                    print(f"{env_id} {variant} seed {seed}: FAILED: {exc}", flush=True)
                    continue
                s["seed"] = seed
                rows[env_id][variant].append(s)
                print(f"{env_id} {variant} seed {seed}: {s['total_wall_s']:.1f} s wall, {s['global_env_steps']:,} env "
                      f"steps, {s['updates']:,} updates, final greedy return {s['final_eval_mean']:.2f} ± "
                      f"{s['final_eval_std']:.2f}", flush=True)  # fmt: skip
    results = summarise(rows)
    pngs = {g: plot(curves, g, args.variants, results_dir) for g in args.games}
    print_table(results)
    total = time.perf_counter() - t_start
    print(f"total wall time: {total:.0f} s", flush=True)
    json_path = os.path.join(results_dir, "minatar.json") if args.json is None else args.json
    if json_path:
        write_json(json_path, {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "sb3_run"},
                               "recipe": RECIPE, "sb3_hyperparams": sb3_hyperparams(recipe(args.budget, args.quick)),
                               "goal_ratio": GOAL_RATIO, "total_wall_s": total, "results": results, "plots": pngs,
                               "failures": failures})  # fmt: skip
    if failures:
        sys.exit(f"minatar: {len(failures)} run(s) failed")


def _missing(sb3: bool) -> str:
    """What is missing for this comparison ('' when nothing): minatar, and for ``sb3`` an SB3
    whose DQN has n-step returns (``n_steps``, SB3 >= 2.7)."""
    try:
        import minatar  # noqa: F401
    except ImportError:
        return "minatar is not installed: pip install 'mpirl[minatar]'"
    if not sb3:
        return ""
    try:
        import inspect

        from stable_baselines3 import DQN
    except ImportError:
        return "stable-baselines3 is not installed: pip install 'mpirl[bench]' (pin torch: see sb3_cartpole.py)"
    if "n_steps" not in inspect.signature(DQN.__init__).parameters:
        return "stable-baselines3 >= 2.7 is needed (its DQN's n_steps): pip install -U 'stable-baselines3>=2.7'"
    return ""


if __name__ == "__main__":
    main()
