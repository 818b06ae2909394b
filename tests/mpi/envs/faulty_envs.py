"""Test environments that fail on purpose, registered for `--env-module faulty_envs`.

FaultyCartPole-v0 is CartPole-v1 except on the rank named by MPIRL_TEST_FAULT_RANK (default 1),
after MPIRL_TEST_FAULT_AFTER steps of that env instance (default 300):
  MPIRL_TEST_FAULT=raise  -> step() raises RuntimeError("injected fault")
  MPIRL_TEST_FAULT=nan    -> rewards become NaN
"""

import os

import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class FaultyCartPole(CartPoleEnv):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
        self._armed = rank == os.environ.get("MPIRL_TEST_FAULT_RANK", "1")
        self._kind = os.environ.get("MPIRL_TEST_FAULT", "")
        self._after = int(os.environ.get("MPIRL_TEST_FAULT_AFTER", "300"))
        self._steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self._steps += 1
        if self._armed and self._steps > self._after:
            if self._kind == "raise":
                raise RuntimeError("injected fault")
            if self._kind == "nan":
                reward = float("nan")
        return obs, reward, terminated, truncated, info


gym.register(id="FaultyCartPole-v0", entry_point=FaultyCartPole, max_episode_steps=500)
