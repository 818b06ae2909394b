"""Does mpirl's MinAtar observation carry what a game needs? A hand-written policy that reads only
the ``(C, 10, 10)`` planes mpirl's networks see (``mpirl.envs.make_env``) against random play.

    .venv/bin/python benchmarks/minatar_heuristic.py                 # Asterix, 30 episodes each
    .venv/bin/python benchmarks/minatar_heuristic.py --episodes 100

Why (issue 15): DQN at 1M env steps stays near random play on Asterix, in mpirl and in
Stable-Baselines3 alike. Both play the same env layer, so a fault there (a transposed plane, a
lost channel, a wrong action map) would fail both. A policy that scores far above random play
from those planes rules that out: what is missing is learning, not information.

The policy (Asterix: player, enemy, trail and gold planes; actions n, l, u, r, d): of the five
moves, take the one whose cell holds no enemy and has none beside it on its row (enemies move
sideways), preferring a cell with gold, then the one nearest to any gold (Manhattan distance).
Episode i is seeded ``--seed + i`` for both policies. Prints the mean ± std of the game score of
each, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# benchmarks/minatar.py would shadow the minatar package (see the comment there): drop this folder.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
from mpirl import envs  # noqa: E402

ENV = "MinAtar/Asterix-v1"
MOVES = {0: (0, 0), 1: (0, -1), 2: (-1, 0), 3: (0, 1), 4: (1, 0)}  # n l u r d as (dy, dx); rows 1..8
PLAYER, ENEMY, GOLD = 0, 1, 3  # Asterix's planes (trail, 2, unused)


def asterix_policy(obs: np.ndarray) -> int:
    """The move that keeps clear of enemies and heads for gold (see the module docstring)."""
    py, px = (int(v) for v in np.argwhere(obs[PLAYER])[0])
    enemy, gold = obs[ENEMY], np.argwhere(obs[GOLD])
    best, best_score = 0, -np.inf
    for action, (dy, dx) in MOVES.items():
        y, x = min(8, max(1, py + dy)), min(9, max(0, px + dx))
        score = -100.0 * enemy[y, x]
        score -= 50.0 * sum(enemy[y, xx] for xx in (x - 1, x + 1) if 0 <= xx < 10)
        score += 20.0 * obs[GOLD][y, x]
        if len(gold):
            score -= 0.5 * min(abs(gy - y) + abs(gx - x) for gy, gx in gold)
        if score > best_score:
            best, best_score = action, score
    return best


def play(policy, episodes: int, seed_base: int) -> list[float]:
    """Game scores of ``episodes`` episodes of ``policy(obs) -> action`` on mpirl's env."""
    env = envs.make_env(ENV)
    scores = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed_base + i)
        score, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            score += float(reward)
            done = terminated or truncated
        scores.append(score)
    env.close()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1000, help="episode i is seeded seed + i")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    result = {}
    for name, policy in (("heuristic", asterix_policy), ("random", lambda _obs: int(rng.integers(len(MOVES))))):
        scores = np.asarray(play(policy, args.episodes, args.seed))
        result[name] = {"mean": float(scores.mean()), "std": float(scores.std()), "episodes": args.episodes}
        print(f"{ENV} {name}: {scores.mean():.2f} ± {scores.std():.2f} over {args.episodes} episodes", flush=True)
    print(json.dumps({"env": ENV, **result, "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
