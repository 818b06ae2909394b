"""The MinAtar paper's DQN (Young & Tian 2019, arXiv:1903.03176), written anew from its stated
settings, as a reference that does not share mpirl's or Stable-Baselines3's code.

    .venv/bin/python benchmarks/minatar_paper_dqn.py                          # Asterix, 1M frames, Adam
    .venv/bin/python benchmarks/minatar_paper_dqn.py --optimizer rmsprop --frames 2000000

Why (issue 15): with the recipe's 3-step returns, DQN stayed near random play on Asterix at 1M
env steps, in mpirl and in SB3 alike. This is the paper's algorithm step for step, so what it
learns here is what DQN with these settings learns on this MinAtar version: one env (the package's
``minatar.Environment``, all 6 actions, sticky actions 0.1), 1-step Q-learning targets from a
target network copied every 1,000 updates, Huber loss, one update of 32 uniform replay samples
per frame from a 100k replay once it holds 5,000 frames (uniform random actions until then),
eps 1 -> 0.1 over the 100k frames after that, gamma 0.99, the paper's network (conv 3x3x16,
128 units). ``--optimizer rmsprop`` is the paper's centered RMSprop (lr 2.5e-4, alpha 0.95,
momentum 0.95, eps 0.01); ``adam`` (the default) is Adam lr 2.5e-4, eps 3.125e-4 as mpirl's
recipe uses. One torch thread; about 1.4 ms per frame on this project's 2-core machine.

The measure is the paper's figure's: the mean return of the last 100 training episodes
(eps-greedy), every ``--log-every`` frames. Prints one JSON line per point and writes them all to
``--out`` (default ``benchmarks/results/minatar_paper_dqn/<game>_<optimizer>_s<seed>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# benchmarks/minatar.py would shadow the minatar package (see the comment there): drop this folder.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
from minatar import Environment  # noqa: E402

BATCH, REPLAY, TARGET_EVERY, START, EPS_FRAMES, EPS_END, GAMMA = 32, 100_000, 1000, 5000, 100_000, 0.1, 0.99


class PaperQNetwork(nn.Module):
    """Conv 3x3, 16 channels, stride 1 (10x10 -> 8x8), ReLU, 128 units, ReLU, one output per action."""

    def __init__(self, channels: int, n_actions: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 16, 3)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.out = nn.Linear(128, n_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=2.5e-4, alpha=0.95, centered=True, eps=0.01, momentum=0.95)
    return torch.optim.Adam(params, lr=2.5e-4, eps=3.125e-4)


def _log_point(t: int, returns: list[float], updates: int, t0: float) -> dict[str, Any]:
    """One point of the curve (the paper's measure: mean return of the last 100 training episodes)."""
    last = returns[-100:]
    point = {"frames": t, "train_return_last100": float(np.mean(last)) if last else None,
             "episodes": len(returns), "updates": updates, "wall_s": round(time.monotonic() - t0, 1)}  # fmt: skip
    print(json.dumps(point), flush=True)
    return point


def train(game: str, frames: int, optimizer: str, seed: int, log_every: int, out: str) -> list[dict[str, Any]]:
    """Run the paper's DQN for ``frames`` env steps; returns (and keeps writing) the curve."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    env = Environment(game)
    env.seed(seed)
    channels, n_actions = env.state_shape()[2], env.num_actions()
    q, target = PaperQNetwork(channels, n_actions), PaperQNetwork(channels, n_actions)
    target.load_state_dict(q.state_dict())
    opt = make_optimizer(optimizer, q.parameters())
    obs = np.zeros((REPLAY, channels, 10, 10), np.uint8)  # planes, channels first
    nxt = np.zeros_like(obs)
    act = np.zeros(REPLAY, np.int64)
    rew = np.zeros(REPLAY, np.float32)
    term = np.zeros(REPLAY, np.float32)
    size = pos = updates = t = 0
    returns: list[float] = []
    curve: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def planes() -> np.ndarray:
        return np.moveaxis(env.state(), -1, 0).astype(np.uint8)

    while t < frames:
        env.reset()
        s, ret, done = planes(), 0.0, False
        while not done and t < frames:
            eps = 1.0 if t < START else max(EPS_END, 1.0 - (1.0 - EPS_END) * (t - START) / EPS_FRAMES)
            if rng.random() < eps:
                a = int(rng.integers(n_actions))
            else:
                with torch.no_grad():
                    a = int(q(torch.from_numpy(s).float()[None]).argmax(1))
            r, done = env.act(a)
            s2 = planes()
            obs[pos], nxt[pos], act[pos], rew[pos], term[pos] = s, s2, a, r, float(done)
            pos, size = (pos + 1) % REPLAY, min(size + 1, REPLAY)
            s, ret, t = s2, ret + r, t + 1
            if t >= START:
                i = rng.integers(size, size=BATCH)
                with torch.no_grad():
                    best_next = target(torch.from_numpy(nxt[i]).float()).max(1).values
                    y = torch.from_numpy(rew[i]) + GAMMA * (1.0 - torch.from_numpy(term[i])) * best_next
                q_sa = q(torch.from_numpy(obs[i]).float()).gather(1, torch.from_numpy(act[i])[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(q_sa, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                updates += 1
                if updates % TARGET_EVERY == 0:
                    target.load_state_dict(q.state_dict())
            if t % log_every == 0:
                curve.append(_log_point(t, returns, updates, t0))
                with open(out, "w") as fh:
                    json.dump({"game": game, "optimizer": optimizer, "seed": seed, "frames": frames,
                               "curve": curve}, fh)  # fmt: skip
        if done:
            returns.append(ret)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--game", default="asterix", help="minatar.Environment name (asterix, breakout, ...)")
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--optimizer", choices=["adam", "rmsprop"], default="adam")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    name = f"{args.game}_{args.optimizer}_s{args.seed}.json"
    out = args.out or os.path.join(HERE, "results", "minatar_paper_dqn", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    train(args.game, args.frames, args.optimizer, args.seed, args.log_every, out)


if __name__ == "__main__":
    main()
