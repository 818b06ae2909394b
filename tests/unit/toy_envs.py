"""A tiny deterministic gymnasium env for collector tests (registered on import as ``TOY_ID``).

Its kind is fixed by the parity of the seed of its first (seeded) reset:

- kind 0 (even seed) terminates on its ``TERM_LEN``-th step;
- kind 1 (odd seed) never terminates; ``TimeLimit`` truncates it after ``TIME_LIMIT`` steps.

Observation ``[100 * kind + episode, t]`` (float32): ``episode`` counts the resets since the
last seeded one, ``t`` the steps taken in this episode. Reward of the step taken from ``t``
with action ``a``: ``reward(t, a) = (t - 1) * (1 + a)``: negative, zero, then growing past 1.
Defined in a module of its own so that every test registers it once. The collector's env state
holds its attributes (``kind``, ``episode``, ``t``, its RNG) as data, never the class itself.
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np

TOY_ID = "MpirlToyCollector-v0"
TOY_BOTH_ID = "MpirlToyCollectorBoth-v0"  # TimeLimit of TERM_LEN: kind 0 terminates and is truncated at once
TERM_LEN = 4  # kind 0: terminated on this step
TIME_LIMIT = 5  # kind 1: truncated by TimeLimit after this many steps


def reward(t: int, a: int) -> float:
    return float((t - 1) * (1 + a))


def episode_length(kind: int) -> int:
    return TERM_LEN if kind == 0 else TIME_LIMIT


class ToyEnv(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self) -> None:
        self.kind = 0
        self.episode = -1
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.array([100 * self.kind + self.episode, self.t], dtype=np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        if seed is not None:
            self.kind = seed % 2
            self.episode = 0
        else:
            self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        r = reward(self.t, int(action))
        self.t += 1
        terminated = self.kind == 0 and self.t >= TERM_LEN
        return self._obs(), r, terminated, False, {}


if TOY_ID not in gym.registry:
    gym.register(id=TOY_ID, entry_point=ToyEnv, max_episode_steps=TIME_LIMIT)
if TOY_BOTH_ID not in gym.registry:
    gym.register(id=TOY_BOTH_ID, entry_point=ToyEnv, max_episode_steps=TERM_LEN)
