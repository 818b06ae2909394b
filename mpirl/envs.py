"""Gymnasium vector-env shards per rank: checking, seeding, episode tracking, greedy evaluation.

gymnasium 1.x autoreset (next-step mode, the default): when sub-env ``e`` ends at step t, the
step returns its real final observation; the *next* call to ``step`` resets it, ignores the
action and returns the reset observation with reward 0. That step is not a transition, so
callers mask it out with ``prev_done`` (see ``EpisodeTracker``). No ``final_observation``
info key is used (that was gymnasium 0.29).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import gymnasium as gym
import numpy as np


class EnvError(ValueError):
    """An environment that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class EnvInfo:
    """What the model and replay need to know about an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    n_actions: int
    reward_threshold: Optional[float]
    max_episode_steps: Optional[int]


def import_env_modules(modules: Sequence[str]) -> None:
    """Import user modules so their ``gymnasium.register`` calls run."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is a user error here
            raise EnvError(f"--env-module {name}: import failed: {type(exc).__name__}: {exc}") from None


def _make_one(env_id: str) -> gym.Env:
    try:
        return gym.make(env_id)
    except gym.error.Error as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EnvError(f"unknown or unusable environment {env_id!r}: {msg}") from None
    except (ModuleNotFoundError, ImportError) as exc:
        raise EnvError(f"environment {env_id!r} needs a package that is not installed: {exc}") from None


def inspect_env(env_id: str) -> EnvInfo:
    """Build one env, check its spaces, close it. Raises EnvError for what mpirl cannot train."""
    env = _make_one(env_id)
    try:
        act, obs = env.action_space, env.observation_space
        if not isinstance(act, gym.spaces.Discrete):
            raise EnvError(f"{env_id}: DQN needs a Discrete action space, got {act}")
        if not isinstance(obs, gym.spaces.Box):
            raise EnvError(f"{env_id}: observation space must be a Box (vector or image), got {obs}")
        if len(obs.shape) not in (1, 3):
            raise EnvError(f"{env_id}: observation shape {obs.shape} is neither a vector nor a (C, H, W) image")
        dtype = np.dtype(np.uint8) if obs.dtype == np.uint8 else np.dtype(np.float32)
        spec = env.spec
        return EnvInfo(
            env_id=env_id,
            obs_shape=tuple(int(s) for s in obs.shape),
            obs_dtype=dtype,
            n_actions=int(act.n),
            reward_threshold=None if spec is None else spec.reward_threshold,
            max_episode_steps=None if spec is None else spec.max_episode_steps,
        )
    finally:
        env.close()


def shard_seeds(seed: int, rank: int, num_envs: int) -> list[int]:
    """Env ``i`` of rank ``r`` gets ``seed + r * num_envs + i``: distinct over ranks and envs."""
    return [seed + rank * num_envs + i for i in range(num_envs)]


def make_vector(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """A synchronous vector env in next-step autoreset mode.

    Sync, not async: a rank already owns a core, and worker processes per env would
    oversubscribe the node. The env steps are cheap next to the update.
    """
    fns: list[Callable[[], gym.Env]] = [lambda: _make_one(env_id) for _ in range(num_envs)]
    kwargs: dict[str, Any] = {}
    if "autoreset_mode" in inspect.signature(gym.vector.SyncVectorEnv.__init__).parameters:
        kwargs["autoreset_mode"] = gym.vector.AutoresetMode.NEXT_STEP
    return gym.vector.SyncVectorEnv(fns, **kwargs)


def vector_state(vec: gym.vector.VectorEnv) -> Optional[dict[str, Any]]:
    """Picklable state of a sync vector env (its sub-envs with their RNGs, and which envs
    autoreset on the next step), or None when a sub-env cannot be pickled (e.g. emulators)."""
    import pickle

    state = {"envs": getattr(vec, "envs", None), "autoreset": getattr(vec, "_autoreset_envs", None)}
    if state["envs"] is None or state["autoreset"] is None:
        return None
    try:
        pickle.dumps(state)
    except Exception:  # an env holding handles, C objects, ...
        return None
    return state


def restore_vector_state(vec: gym.vector.VectorEnv, state: dict[str, Any]) -> None:
    """Put sub-envs saved by ``vector_state`` back into a fresh vector env of the same size."""
    old = vec.envs  # type: ignore[attr-defined]
    if len(state["envs"]) != len(old):
        raise ValueError(f"saved env shard has {len(state['envs'])} envs, this one {len(old)}")
    for env in old:
        env.close()
    vec.envs = list(state["envs"])  # type: ignore[attr-defined]
    vec._autoreset_envs = np.array(state["autoreset"], dtype=bool)  # type: ignore[attr-defined]


class EpisodeTracker:
    """Per-env running returns/lengths and the autoreset mask of a vector env shard."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.prev_done = np.zeros(num_envs, dtype=bool)

    def step(
        self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> tuple[np.ndarray, list[float], list[int]]:
        """Account one vector step. Returns (valid mask, finished returns, finished lengths)."""
        valid = ~self.prev_done
        self.returns[self.prev_done] = 0.0
        self.lengths[self.prev_done] = 0
        self.returns[valid] += rewards[valid]
        self.lengths[valid] += 1
        done = (terminated | truncated) & valid
        finished_r = self.returns[done].tolist()
        finished_l = self.lengths[done].tolist()
        self.prev_done = done
        return valid, finished_r, finished_l


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    seeds: Sequence[int],
    max_steps: int = 108_000,
) -> list[float]:
    """Play one greedy episode per seed (batched over a vector env); return their returns."""
    if not seeds:
        return []
    envs = make_vector(env_id, len(seeds))
    try:
        obs, _ = envs.reset(seed=list(seeds))  # type: ignore[arg-type]  # vector envs take one seed per env
        returns = np.zeros(len(seeds))
        active = np.ones(len(seeds), dtype=bool)
        for _ in range(max_steps):
            obs, rew, term, trunc, _ = envs.step(policy(obs))
            returns[active] += rew[active]
            active &= ~(term | trunc)
            if not active.any():
                break
        return returns.tolist()
    finally:
        envs.close()
