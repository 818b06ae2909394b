"""The greedy evaluations of a training run (rank 0 logs them): every ``eval_interval``
global env steps, the early stop, and the final evaluation the summary reports. Each is a
collective: the episodes are split over the ranks, the returns summed over them.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from mpirl import dist, envs, watchdog

if TYPE_CHECKING:
    from mpirl.trainer import Run


def periodic(run: Run) -> bool:
    """Collective: a greedy evaluation during training; True when it reached the target
    return and --early-stop is on (the same mean on every rank, so every rank stops alike)."""
    cfg, c = run.cfg, run.state.counters
    seed_base = cfg.seed + 1_000_000 + c.eval_round * cfg.eval_episodes
    mean, std, lo = evaluate_global(run, cfg.eval_episodes, seed_base, name="mpirl.eval")  # HVD
    c.eval_round += 1
    c.last_eval = mean
    if run.writer is not None:
        run.writer.write("eval", {"global_env_steps": c.global_env_steps, "updates": run.learner.updates,
                                  "eval_mean_return": mean, "eval_std_return": std, "eval_min_return": lo,
                                  "wall_time_s": time.perf_counter() - run.state.t_start})  # fmt: skip
    run.log(
        f"eval  {c.global_env_steps:>9,} | greedy return {mean:.1f} ± {std:.1f} (min {lo:.1f}) "
        f"over {cfg.eval_episodes} episodes"
    )
    if cfg.early_stop and run.target_return is not None and mean >= run.target_return:
        return _confirm_early_stop(run, run.target_return)
    return False


def _confirm_early_stop(run: Run, target: float) -> bool:
    """Collective: a periodic evaluation reached ``target``; stop only when the final evaluation
    (its own episodes and seeds) reaches it too, so that no run stops on one lucky evaluation and
    then ends unsolved (CartPole seed 2 did: 475+, then 457). The weights do not change after a
    stop, so the summary reuses this result."""
    cfg = run.cfg
    if cfg.final_eval_episodes > 0:
        mean, std = final(run)  # HVD: evaluation sums
        if mean < target:
            run.log(f"mpirl: evaluation reached the target return {target:g}, but the final evaluation gave "
                    f"{mean:.1f} over {cfg.final_eval_episodes} episodes; training goes on")  # fmt: skip
            return False
        run.state.final_eval = (mean, std)
    run.state.stopped_early = True
    run.log(f"mpirl: evaluation reached the target return {target:g}; stopping")
    return True


def final(run: Run) -> tuple[float, float]:
    """Collective: the final greedy evaluation, (mean, std): always the same episodes and seeds."""
    mean, std, _ = evaluate_global(run, run.cfg.final_eval_episodes, run.cfg.seed + 2_000_000, "mpirl.final_eval")
    return mean, std


def evaluate_global(run: Run, episodes: int, seed_base: int, name: str) -> tuple[float, float, float]:
    """Collective: ``episodes`` greedy episodes split over ranks (episode i on rank i % size);
    returns the global (mean, std, min) return (game scores), identical on every rank."""
    run.learner.sync_replicas()  # HVD (local SGD): evaluate the averaged weights, the ones a checkpoint saves
    ctx = run.ctx
    mine = [seed_base + i for i in range(ctx.rank, episodes, ctx.size)]
    policy = watchdog.beating("evaluation", run.learner.greedy)  # a heartbeat per env step
    rets = np.asarray(envs.evaluate(policy, run.cfg.env_id, mine, atari=envs.atari_options(run.cfg)), dtype=np.float64)
    local_min = rets.min() if len(rets) else np.inf
    s = dist.allreduce_sum(np.array([rets.sum(), (rets**2).sum(), len(rets)]), name=name)  # HVD: allreduce
    lo, _ = dist.allreduce_min_max(float(local_min), name=name + ".min")  # HVD: allreduce
    n = max(s[2], 1.0)
    mean = s[0] / n
    std = math.sqrt(max(s[1] / n - mean**2, 0.0))
    return float(mean), float(std), float(lo)
