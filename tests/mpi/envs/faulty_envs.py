"""Test environments that fail on purpose, registered for `--env-module faulty_envs`.

FaultyCartPole-v0 is CartPole-v1 except on the rank named by MPIRL_TEST_FAULT_RANK (default 1),
after MPIRL_TEST_FAULT_AFTER steps of that env instance (default 300):
  MPIRL_TEST_FAULT=raise  -> step() raises RuntimeError("injected fault")
  MPIRL_TEST_FAULT=nan    -> rewards become NaN
  MPIRL_TEST_FAULT=hang   -> step() never returns (sleeps in Python: the GIL stays free)
  MPIRL_TEST_FAULT=hang_gil -> step() never returns and holds the GIL (libc sleep through ctypes.PyDLL)
A hanging step first creates the file MPIRL_TEST_FAULT_MARK (if set), so a test can time the stall.
"""

import ctypes
import os
import time

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
            if self._kind in ("hang", "hang_gil"):
                if os.environ.get("MPIRL_TEST_FAULT_MARK"):
                    open(os.environ["MPIRL_TEST_FAULT_MARK"], "w").close()
                while self._kind == "hang":
                    time.sleep(1.0)
                ctypes.PyDLL(None).sleep(100_000)  # PyDLL keeps the GIL during the call
        return obs, reward, terminated, truncated, info


gym.register(id="FaultyCartPole-v0", entry_point=FaultyCartPole, max_episode_steps=500)
